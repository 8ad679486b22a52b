#!/usr/bin/env bash
# Quick start, main job: the benchmark end to end (train + infer) on built-in synthetic SLSTR-like data.
# Creates .venv on first use. Extra arguments go to `cloudmask bench` (e.g. --data DIR, --set train.epochs=5).
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cloudmask_env tf
echo "(cloudmask lives in .venv: '. .venv/bin/activate' or .venv/bin/cloudmask to run it yourself)" >&2
exec cloudmask bench "$@"
