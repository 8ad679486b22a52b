#!/usr/bin/env bash
# One seeded CloudMask training run per array task:  sbatch --array=1-5 slurm/train.sh
#
# Seed = BASE_SEED + SLURM_ARRAY_TASK_ID. Each task writes RESULTS_DIR/EXPERIMENT/<array job id>_<task id>/,
# so no two tasks share a directory. 300 s before the time limit SLURM sends USR1 (and `scancel --signal=TERM`
# or preemption sends TERM): the run checkpoints at the next batch, the task requeues itself, and the requeued
# task resumes the same run directory from its last finished epoch.
#
# Environment (all optional; `sbatch --export=ALL,VAR=value` or export before sbatch):
#   CONFIG       YAML config for new runs (cloudmask schema or the reference's flat file)
#   DATA_DIR     dataset root (training/+inference/ or one-day/+ssts/)
#   RESULTS_DIR  parent of experiment directories (default: $SLURM_SUBMIT_DIR/results)
#   EXPERIMENT   experiment name, a directory under RESULTS_DIR (default: default)
#   BASE_SEED    seed of task 0 (default: 0, so tasks 1-5 get seeds 1-5)
#   CONTAINER    apptainer | singularity | none (default: apptainer; none runs `cloudmask` from PATH)
#   IMAGE        the .sif image (default: $SLURM_SUBMIT_DIR/cloudmask.sif)
#   STAGE        1: copy the dataset to node-local disk ($SLURM_TMPDIR, else $TMPDIR, else /tmp) first
#   MAX_REQUEUES give up requeueing after this many restarts (default: 20)
#   EXTRA_ARGS   more arguments for `cloudmask train` (e.g. "--set train.epochs=50")
#
# Site options (partition, account, gres) belong on the sbatch command line or in a copy of this file; see
# docs/slurm.md.
#SBATCH --job-name=cloudmask
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%A_%a.out
set -uo pipefail

say() { echo "[train.sh $(date '+%F %T')] $*"; }
die() { say "error: $*" >&2; exit 2; }

submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
job=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local$$}}
task=${SLURM_ARRAY_TASK_ID:-0}
RESULTS_DIR=${RESULTS_DIR:-$submit_dir/results}
EXPERIMENT=${EXPERIMENT:-default}
BASE_SEED=${BASE_SEED:-0}
CONTAINER=${CONTAINER:-apptainer}
IMAGE=${IMAGE:-$submit_dir/cloudmask.sif}
MAX_REQUEUES=${MAX_REQUEUES:-20}
restarts=${SLURM_RESTART_COUNT:-0}

[[ $BASE_SEED =~ ^-?[0-9]+$ ]] || die "BASE_SEED=$BASE_SEED is not an integer"
seed=$((BASE_SEED + task))
run_dir=$RESULTS_DIR/$EXPERIMENT/${job}_${task}
mkdir -p "$RESULTS_DIR/$EXPERIMENT" || die "cannot create $RESULTS_DIR/$EXPERIMENT; set RESULTS_DIR"

case $CONTAINER in
    apptainer | singularity)
        command -v "$CONTAINER" >/dev/null || die "$CONTAINER not found; load its module or set CONTAINER=none"
        [ -f "$IMAGE" ] || die "IMAGE=$IMAGE not found; build it with scripts/build_sif.sh or set IMAGE"
        binds=$RESULTS_DIR
        [ -n "${DATA_DIR:-}" ] && binds+=,$DATA_DIR
        [ -n "${CONFIG:-}" ] && binds+=,$(dirname "$CONFIG")
        cloudmask=("$CONTAINER" run --nv --bind "$binds" "$IMAGE")
        ;;
    none)
        command -v "${CLOUDMASK:-cloudmask}" >/dev/null || die "cloudmask not on PATH; activate its environment"
        cloudmask=("${CLOUDMASK:-cloudmask}")
        ;;
    *) die "CONTAINER=$CONTAINER: use apptainer, singularity or none" ;;
esac

args=(train --out "$run_dir")
if [ -f "$run_dir/config.yaml" ]; then
    say "task $task (restart $restarts): resuming $run_dir"
    args+=(--resume)
else
    say "task $task: seed $seed = BASE_SEED $BASE_SEED + task $task; run directory $run_dir"
    args+=(--set "seed=$seed")
    [ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
    [ -n "${DATA_DIR:-}" ] && args+=(--data "$DATA_DIR")
fi
if [ "${STAGE:-0}" = 1 ]; then
    args+=(--stage-to "${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/cloudmask-${job}_${task}")
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is a word list by design
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)

# The signal reaches this shell only (B: in --signal); pass it on, then wait for the checkpoint to be written.
child=""
# shellcheck disable=SC2317  # called by the traps below
forward() {
    say "received $1: asking the run to checkpoint"
    [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

say "${cloudmask[*]} ${args[*]}"
"${cloudmask[@]}" "${args[@]}" &
child=$!
while true; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait returned early because a trapped signal arrived
done
say "cloudmask exited with $rc"

# 138 = 128 + USR1, 143 = 128 + TERM: the run stopped cleanly at a checkpoint and can be continued.
if [ "$rc" = 138 ] || [ "$rc" = 143 ]; then
    state=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -1)
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        say "not a SLURM job: continue with: cloudmask train --resume --out $run_dir"
    elif [ "$state" = JobState=CANCELLED ]; then
        say "the job was cancelled: not requeued (continue later with --resume --out $run_dir)"
    elif [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        say "already restarted $restarts times (MAX_REQUEUES): not requeued"
    elif scontrol requeue "$SLURM_JOB_ID"; then
        say "requeued job $SLURM_JOB_ID; the next start resumes $run_dir"
        exit 0
    else
        say "scontrol requeue failed: continue with: cloudmask train --resume --out $run_dir"
    fi
fi
exit "$rc"
