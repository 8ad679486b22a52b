#!/usr/bin/env bash
# Shared by slurm/train.sh and slurm/train_multinode.sh (sourced, not run): the cloudmask command for the chosen
# container, running it with USR1/TERM passed on, and requeueing a run that stopped at a checkpoint.
# The sourcing script sets `me` (its name, for messages).
# shellcheck disable=SC2034,SC2154  # variables set here are for the sourcing script, which sets `me`

say() { echo "[$me $(date '+%F %T')] $*"; }
die() { say "error: $*" >&2; exit 2; }

# common_settings: the environment both scripts read (defaults as documented in slurm/train.sh).
common_settings() {
    submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
    RESULTS_DIR=${RESULTS_DIR:-$submit_dir/results}
    EXPERIMENT=${EXPERIMENT:-default}
    BASE_SEED=${BASE_SEED:-0}
    CONTAINER=${CONTAINER:-apptainer}
    IMAGE=${IMAGE:-$submit_dir/cloudmask.sif}
    MAX_REQUEUES=${MAX_REQUEUES:-20}
    restarts=${SLURM_RESTART_COUNT:-0}
    [[ $BASE_SEED =~ ^-?[0-9]+$ ]] || die "BASE_SEED=$BASE_SEED is not an integer"
}

# cloudmask_command BIND...: the array `cloudmask` (apptainer/singularity with the paths bound, or from PATH).
cloudmask_command() {
    case $CONTAINER in
        apptainer | singularity)
            command -v "$CONTAINER" >/dev/null || die "$CONTAINER not found; load its module or set CONTAINER=none"
            [ -f "$IMAGE" ] || die "IMAGE=$IMAGE not found; build it with scripts/build_sif.sh or set IMAGE"
            cloudmask=("$CONTAINER" run --nv --bind "$(IFS=,; echo "$*")" "$IMAGE")
            ;;
        none)
            command -v "${CLOUDMASK:-cloudmask}" >/dev/null || die "cloudmask not on PATH; activate its environment"
            cloudmask=("${CLOUDMASK:-cloudmask}")
            ;;
        *) die "CONTAINER=$CONTAINER: use apptainer, singularity or none" ;;
    esac
}

# job_step: the prefix that runs one command as its own job step (srun) inside a SLURM job, so that
# `scancel --signal=USR1|TERM JOB` (which signals job steps, not the batch shell) reaches it; empty outside SLURM.
# The CPUs are passed on explicitly: srun in SLURM 22.05+ no longer inherits --cpus-per-task from sbatch.
job_step() {
    step=()
    if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
        step=(srun --ntasks=1 --nodes=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
    fi
}

# run_forwarding_signals COMMAND...: run it, passing USR1/TERM on; its exit status in `rc`.
# The time limit's signal reaches the batch shell only (B: in --signal); srun hands it to the run, which
# checkpoints at its next batch.
run_forwarding_signals() {
    child=""
    # shellcheck disable=SC2317  # called by the traps below
    forward() {
        say "received $1: asking the run to checkpoint"
        [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null
    }
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    "$@" &
    child=$!
    while true; do
        wait "$child"
        rc=$?
        kill -0 "$child" 2>/dev/null || break  # wait returned early because a trapped signal arrived
    done
}

# requeue_if_checkpointed RUN_DIR HOW_TO_CONTINUE: after exit status `rc`, requeue the job when the run stopped
# at a checkpoint because of USR1 (138 = 128 + USR1: the time limit, or a user's `scancel --signal=USR1`);
# exits 0 once requeued. TERM (143: `scancel JOB`, preemption) stops without a requeue: a cancel must stay
# cancelled, and SLURM requeues a job preempted with PreemptMode=REQUEUE by itself.
requeue_if_checkpointed() {
    case $rc in
        138) ;;
        143) say "stopped by TERM (scancel or preemption): checkpoint kept, not requeued" \
                 "(continue with: scontrol requeue ${SLURM_JOB_ID:-JOB}, or $2)"
             return 0 ;;
        *) return 0 ;;
    esac
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        say "not a SLURM job: continue with: $2"
    elif [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        say "already restarted $restarts times (MAX_REQUEUES): not requeued"
    elif scontrol requeue "$SLURM_JOB_ID"; then
        say "requeued job $SLURM_JOB_ID; the next start resumes $1"
        exit 0
    else
        say "scontrol requeue failed: continue with: $2"
    fi
}
