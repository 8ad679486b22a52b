#!/usr/bin/env bash
# Quick start, tests: the project's test suite. Creates .venv on first use. Extra arguments go to pytest.
# By default the slow tests (the README bench end to end, the real SLURM cluster, minute-long runs) are left out;
# --all runs them too, -m slow runs only them (CI runs both passes).
# The tests run on pytest-xdist workers: one per CPU core, at most 4 and one per 6 GiB of available memory (a test
# and the `cloudmask` it starts may take up to 6 GiB), each test file on one worker (--dist loadfile: a module's
# fixtures are made once, one local SLURM cluster at a time). CLOUDMASK_TEST_WORKERS=N chooses; 1, or -n/-p no:xdist
# among the arguments, leaves the choice to pytest (1: one process, as `python -m pytest` runs).
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
cloudmask_env tf,test
cd "$(dirname "$0")/.."

default_workers() {
    local cores mem_gib
    cores=$(nproc 2>/dev/null || echo 1)
    mem_gib=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 6)
    local n=$((cores < 4 ? cores : 4))
    [ $((mem_gib / 6)) -lt "$n" ] && n=$((mem_gib / 6))
    echo $((n > 1 ? n : 1))
}

args=()
workers=${CLOUDMASK_TEST_WORKERS:-$(default_workers)}
for a in "$@"; do
    case $a in
        --all) args+=(-m "slow or not slow") ;;
        -n|-n[0-9]*|--numprocesses*|no:xdist|--pdb) workers=1; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done
if [ "$workers" -gt 1 ]; then args=(-n "$workers" --dist loadfile ${args[@]+"${args[@]}"}); fi
# pytest's own cache (--lf, --ff) lives in the environment, so the checkout keeps only .venv and Python's caches
exec python -m pytest -o cache_dir="$(python -c 'import sys; print(sys.prefix)')/.pytest_cache" ${args[@]+"${args[@]}"}
