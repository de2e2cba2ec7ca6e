#!/usr/bin/env bash
# The wheels `python -m benchmarks.run gpu` needs that the GPU machine's image lacks, downloaded into .whl/
# (git-ignored) for a machine that cannot reach a package index. That image already holds torch, transformers,
# safetensors, pyarrow, numpy, pillow, pytest, typing-extensions and diffusers' other requirements, so each wheel is
# fetched alone (--no-deps) and shadows nothing there. They are built for the image's Python (3.12 on x86-64 Linux);
# PYTHON_VERSION=3.11 benchmarks/wheels.sh fetches them for another. There, benchmarks/gpu.sh installs and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version "${PYTHON_VERSION:-3.12}" --implementation cp "${PLATFORMS[@]/#/--platform=}" \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 diffusers==0.42.1
ls .whl
