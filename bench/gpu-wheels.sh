#!/usr/bin/env bash
# The Python packages bench/gpu.py imports that the GPU machines lack, as wheels for their Python
# (CPython 3.12, x86-64 Linux), downloaded into .whl/ (ignored by git; it travels with the checkout
# as a carried folder). The machines have torch, transformers, tokenizers, safetensors, numpy,
# pyyaml and tqdm, no network, and no pydantic. Versions are the ones the
# project's tests run with.
#
#   bench/gpu-wheels.sh [DEST]            # default .whl; needs pip and the package registry
#
# Then on the GPU machine, from the repository root, one command (bench/gpu-run.sh) installs them
# into a scratch folder and runs the benchmark (docs/full-size.md).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-python3}
wheels=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic needs >= 4.16; the machines' may be older (shadowed in the scratch folder only)
)
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -1 "$dest"/*.whl
du -sh "$dest"
