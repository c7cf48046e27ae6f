#!/usr/bin/env bash
# On a GPU machine (no network, Python 3.12 with torch and transformers): install the carried wheels
# of bench/gpu-wheels.sh into a scratch folder and run bench/gpu.py at Pythia-1.4B. The JSON record
# and the log go to $OUT (the device tool's output folder) or to the folder given.
#
#   bash bench/gpu-run.sh [OUT_DIR] [-- extra bench/gpu.py arguments]
#
# About five minutes on an H100 (model built on the GPU, two arms x 7 steps of 32 x 2048 tokens,
# stage-4 perplexity, one UAT and one HotFlip step, a 17 GB checkpoint written and read back).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/monolm-gpu-bench}}
shift || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
site=${MONOLM_BENCH_SITE:-/tmp/monolm-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
set -o pipefail
python3 bench/gpu.py --out "$out/gpu.json" --tmp "${TMPDIR:-/tmp}" "$@" 2>&1 | tee "$out/gpu.log"
