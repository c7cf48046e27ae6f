#!/usr/bin/env bash
# A scratch environment for the peer comparisons (bench/eval_vs_lmeval.py, bench/train_vs_trainer.py):
# lm-evaluation-harness and accelerate (which transformers.Trainer needs) are installed into
# .bench-env/, never into the project's .venv. The scratch venv sees the project's packages (torch,
# transformers, ...) through a .pth file, so nothing big is downloaded twice and the versions under
# comparison are exactly the project's.
#
#   bench/peers-env.sh [PROJECT_VENV]     # default .venv; prints the scratch interpreter's path
#
# Idempotent: a second call only prints the path.
set -euo pipefail
cd "$(dirname "$0")/.."
project_venv=${1:-.venv}
scratch=.bench-env
LM_EVAL_SPEC=${LM_EVAL_SPEC:-lm-eval==0.4.13}
ACCELERATE_SPEC=${ACCELERATE_SPEC:-accelerate>=1.0}

py="$project_venv/bin/python"
[ -x "$py" ] || { echo "no interpreter at $py (run make install, or pass the project's venv)" >&2; exit 1; }
if [ ! -f "$scratch/.installed" ]; then
    "$py" -m venv --without-pip "$scratch" 2>/dev/null || "$py" -m venv "$scratch"
    site=$("$scratch/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    project_site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The project's packages come after the scratch ones: what pip installs here wins, the project's
    # own environment is never written to.
    echo "$(cd "$project_site" && pwd)" > "$site/_project_venv.pth"
    "$py" -m pip --python "$scratch/bin/python" install --quiet "$LM_EVAL_SPEC" "$ACCELERATE_SPEC" >&2
    touch "$scratch/.installed"
fi
echo "$scratch/bin/python"
