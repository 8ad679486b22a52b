#!/usr/bin/env bash
# Quick start, tests: the project's test suite. Creates .venv on first use. Extra arguments go to pytest.
# By default the slow tests (the README bench end to end, the real SLURM cluster, minute-long runs) are left out;
# --all runs them too, -m slow runs only them (CI runs both passes).
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cloudmask_env tf,test
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
    if [ "$a" = "--all" ]; then args+=(-m "slow or not slow"); else args+=("$a"); fi
done
exec python -m pytest ${args[@]+"${args[@]}"}
