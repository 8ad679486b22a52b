#!/usr/bin/env bash
# The GPU measurement suite (scripts/measure/gpu_suite.py; docs/performance.md, H200 section) in one command:
#   scripts/measure/gpu_suite.sh --out DIR [--cpu --small] [--budget-s S]
# Runs Keras on JAX. Where Keras is not installed (the lent GPU machine has JAX, h5py, numpy, pynvml, no Keras
# and no TensorFlow), the wheels fetched here beforehand by scripts/measure/gpu_wheels.sh are installed from .whl/
# into /tmp/cloudmask-site first, without touching the machine's own packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
if ! "$python" -c 'import keras, mlperf_logging' 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: keras or mlperf-logging is missing and .whl/ holds no wheels; run scripts/measure/gpu_wheels.sh" \
             "on a machine with PyPI first" >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cloudmask-site .whl/*.whl
    export PYTHONPATH=/tmp/cloudmask-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
exec "$python" scripts/measure/gpu_suite.py "$@"
