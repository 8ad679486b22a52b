#!/usr/bin/env bash
# The JAX lane: Keras 3 on JAX in its own environment without TensorFlow (.venv-jax), as on the GPU machine that
# can be borrowed (JAX, no TensorFlow). Runs tests/test_gpu_suite.py (the GPU suite at toy size, the longest: one
# worker runs it while the other takes the rest, test by test), tests/test_jax_lane.py (bench end to end +
# check-log, resume, throughput from a device-resident store) and the energy tests (simulated NVML, one whole run)
# with KERAS_BACKEND=jax. .ci/run calls it after the TensorFlow suite.
#   ./scripts/ci/jax_lane.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CLOUDMASK_VENV=${CLOUDMASK_JAX_VENV:-$PWD/.venv-jax}
# shellcheck source=scripts/env.sh
source scripts/env.sh
cloudmask_env jax,test
export KERAS_BACKEND=jax
read -ra xdist <<<"$(cloudmask_xdist_args worksteal)"
# every test of these files, the slow-marked whole run of test_telemetry.py too (pyproject's addopts leave it out)
exec python -m pytest -o cache_dir="$CLOUDMASK_VENV/.pytest_cache" ${xdist[@]+"${xdist[@]}"} -m "slow or not slow" \
    tests/test_gpu_suite.py tests/test_jax_lane.py tests/test_telemetry.py "$@"
