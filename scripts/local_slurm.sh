#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for trying slurm/*.sh and for the test suite.
#
#   scripts/local_slurm.sh start DIR   write DIR/slurm.conf, start slurmctld + slurmd, wait until the node is idle
#   scripts/local_slurm.sh stop DIR    stop both daemons by the PIDs in DIR
#
# Then: export SLURM_CONF=DIR/slurm.conf and use sbatch/squeue/scontrol as usual.
# Needs root and Debian's slurm-wlm (apt-get install slurm-wlm). No munged: Slurm before 23.11 (Debian 12's
# 22.05) uses auth/none, which runs every job as root; later releases use auth/slurm with a key written to
# DIR/slurm.key, which runs jobs as the user who submitted them. Never use this configuration on a shared
# machine. Ports: SLURMCTLD_PORT (6817), SLURMD_PORT (6818).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

stop() {
    local pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

start() {
    for cmd in slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin
        command -v "$cmd" >/dev/null 2>&1 || { echo "$0: $cmd not found: apt-get install slurm-wlm" >&2; exit 1; }
    done
    [ "$(id -u)" = 0 ] || { echo "$0: slurmd must run as root here" >&2; exit 1; }
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10240 ))  # MB; leave room for the OS
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    local auth=none version
    version=$(slurmctld -V | awk '{print $2}')  # "slurm 26.05.5"
    if [ "$(printf '%s\n' "$version" 23.11 | sort -V | head -n 1)" = 23.11 ]; then
        auth=slurm
        [ -s "$dir/slurm.key" ] || { head -c 1024 /dev/urandom > "$dir/slurm.key"; chmod 600 "$dir/slurm.key"; }
    fi
    cat > "$dir/slurm.conf" <<EOF
ClusterName=cloudmask-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/$auth
CredType=cred/$auth
# a requeued job restarts after cred_expire s (default 120); one started sooner is killed (credential revoked)
AuthInfo=cred_expire=10
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=3600
KillWait=30
DependencyParameters=kill_invalid_depend
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -i
    slurmd -N localhost
    for _ in $(seq 1 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "$0: the node did not become idle in 30 s; logs in $dir/log" >&2
    stop
    exit 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
