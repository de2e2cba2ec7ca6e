#!/usr/bin/env bash
# Wheels that `python -m benchmarks.run gpu` needs beyond torch, transformers, safetensors, pyarrow, numpy and
# pillow, downloaded into .whl/ (git-ignored) to carry to a GPU machine that cannot reach a package index:
#   there:  pip install --no-index --find-links .whl pydantic diffusers pytest && pip install --no-deps -e .
# Wheels are for this interpreter's Python and platform; extra arguments go to `pip download`, e.g.
#   benchmarks/wheels.sh --python-version 3.11 --platform manylinux2014_x86_64
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
download() { "$PYTHON" -m pip download --quiet --only-binary=:all: --dest .whl "$@"; }
download "pydantic>=2.6" "pytest>=8" "${@}"                        # configs, the tests marked gpu; with their deps
# the numerical oracle: its other requirements (huggingface-hub, numpy, pillow, ...) come with transformers
download --no-deps "diffusers==0.42.1" importlib_metadata zipp "${@}"
ls .whl
