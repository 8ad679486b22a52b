#!/usr/bin/env bash
# N cooperating cloudmask workers on this machine (TF_CONFIG on localhost), for trying multi-worker training
# without SLURM and for measuring CPU-worker scaling:
#
#   scripts/local_workers.sh N COMMAND...     e.g.  scripts/local_workers.sh 2 cloudmask train --store S --out R \
#                                                       --set distribute.strategy=multi_worker
#
# Worker 0 (the chief) prints to this terminal; worker i's output goes to $WORKER_LOGS/worker-i.log (default: a
# new temporary directory, named at the start). Ports PORT..PORT+N-1 (PORT default 23400) must be free.
# Exits with the first non-zero exit status of the workers (0 when all succeed); Ctrl-C stops all of them.
# Needs bash >= 5.1 (wait -n -p).
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 N COMMAND..." >&2; exit 2; }
n=$1
shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "$0: N=$n is not a positive integer" >&2; exit 2; }
port=${PORT:-23400}
logs=${WORKER_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/cloudmask-workers.XXXXXX")}
mkdir -p "$logs"

workers=""
for ((i = 0; i < n; i++)); do
    workers+="${workers:+, }\"localhost:$((port + i))\""
done
config() { echo "{\"cluster\": {\"worker\": [$workers]}, \"task\": {\"type\": \"worker\", \"index\": $1}}"; }

pids=()
# shellcheck disable=SC2317  # called by the trap
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop_all INT TERM
[ "$n" -gt 1 ] && echo "[local_workers.sh] $n workers on ports $port-$((port + n - 1)); workers 1-$((n - 1)) log to $logs" >&2
for ((i = 1; i < n; i++)); do
    TF_CONFIG=$(config "$i") "$@" >"$logs/worker-$i.log" 2>&1 &
    pids+=($!)
done
TF_CONFIG=$(config 0) "$@" &
pids=("$!" "${pids[@]}")

rc=0
while [ ${#pids[@]} -gt 0 ]; do  # in the order they finish
    status=0
    finished=""
    wait -n -p finished "${pids[@]}" || status=$?
    [ -n "$finished" ] || { stop_all; wait; exit "${status:-1}"; }  # interrupted (Ctrl-C)
    remaining=()
    for pid in "${pids[@]}"; do [ "$pid" = "$finished" ] || remaining+=("$pid"); done
    pids=("${remaining[@]}")
    if [ "$status" != 0 ] && [ "$rc" = 0 ]; then
        rc=$status
        stop_all  # the others would wait for the failed worker until distribute.timeout_s
    fi
done
exit "$rc"
