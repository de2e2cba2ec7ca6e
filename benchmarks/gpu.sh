#!/usr/bin/env bash
# On the GPU machine: install the wheels benchmarks/wheels.sh fetched (.whl/) into a folder of their own, then run
# `python -m benchmarks.run gpu` with this script's arguments, e.g. `bash benchmarks/gpu.sh --out "$OUT"`.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${VQBATCH_WHEEL_SITE:-/tmp/vqbatch-wheels}
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m benchmarks.run gpu "$@"
