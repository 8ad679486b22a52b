#!/usr/bin/env bash
# Fetch into .whl/ the wheels the GPU machine lacks (Keras and its small dependencies, mlperf-logging) for its
# Python 3.12 on x86-64 Linux; scripts/measure/gpu_suite.sh installs them there. The versions are the JAX lane's.
#   scripts/measure/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=(keras==3.15.1 namex==0.1.0 optree==0.20.0 mlperf-logging==4.1.68)
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
ls -l .whl
