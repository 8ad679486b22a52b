#!/usr/bin/env bash
# Quick start, tests: the project's test suite. Creates .venv on first use. Extra arguments go to pytest.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cloudmask_env tf,test
cd "$(dirname "$0")/.."
exec python -m pytest "$@"
