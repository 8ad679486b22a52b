#!/usr/bin/env bash
# Quick start, tests: the project's test suite. Creates .venv on first use. Extra arguments go to pytest.
# By default the slow tests (the README bench end to end, the real SLURM cluster, minute-long runs) are left out;
# --all runs them too, -m slow runs only them (CI runs both passes).
# The tests run on pytest-xdist workers, one per core (cloudmask_xdist_args in env.sh); CLOUDMASK_TEST_WORKERS=1,
# or -n / -p no:xdist / --pdb among the arguments, runs them as plain `python -m pytest` does.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cloudmask_env tf,test
cd "$(dirname "$0")/.."

read -ra xdist <<<"$(cloudmask_xdist_args loadfile)"
args=()
for a in "$@"; do
    case $a in
        --all) args+=(-m "slow or not slow") ;;
        -n|-n[0-9]*|--numprocesses*|no:xdist|--pdb) xdist=(); args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done
# pytest's own cache (--lf, --ff) lives in the environment, so the checkout keeps only .venv and Python's caches
exec python -m pytest -o cache_dir="$(python -c 'import sys; print(sys.prefix)')/.pytest_cache" \
    ${xdist[@]+"${xdist[@]}"} ${args[@]+"${args[@]}"}
