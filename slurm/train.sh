#!/usr/bin/env bash
# One seeded CloudMask training run per array task:  sbatch --array=1-5 slurm/train.sh
#
# Seed = BASE_SEED + SLURM_ARRAY_TASK_ID. Each task writes RESULTS_DIR/EXPERIMENT/<array job id>_<task id>/,
# so no two tasks share a directory. 300 s before the time limit SLURM sends USR1 (as does a user's
# `scancel --signal=USR1 JOB`): the run checkpoints at the next batch, the task requeues itself, and the requeued
# task resumes the same run directory from its last finished epoch. `scancel JOB` (TERM) checkpoints and stays
# cancelled; `scontrol requeue JOB` continues it. docs/slurm.md lists every signal command.
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

me=train.sh
# sbatch runs a spooled copy of this script: lib.sh is sourced from the submitted original's directory
job_script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
lib=$(dirname "$(echo "${job_script:-$0}" | head -n 1)")/lib.sh  # an array's first task lists every task
# shellcheck source=slurm/lib.sh
. "$lib" || { echo "[$me] error: $lib not found: submit the script from its checkout" >&2; exit 2; }
common_settings
job=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local$$}}
task=${SLURM_ARRAY_TASK_ID:-0}

seed=$((BASE_SEED + task))
run_dir=$RESULTS_DIR/$EXPERIMENT/${job}_${task}
mkdir -p "$RESULTS_DIR/$EXPERIMENT" || die "cannot create $RESULTS_DIR/$EXPERIMENT; set RESULTS_DIR"

binds=("$RESULTS_DIR")
[ -n "${DATA_DIR:-}" ] && binds+=("$DATA_DIR")
[ -n "${CONFIG:-}" ] && binds+=("$(dirname "$CONFIG")")
cloudmask_command "${binds[@]}"

args=(train --out "$run_dir")
if grep -qs '"status": "success"' "$run_dir/results.json"; then  # requeued after it finished: nothing to do
    say "task $task (restart $restarts): $run_dir already finished; nothing to resume"
    exit 0
elif [ -f "$run_dir/config.yaml" ]; then
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

job_step
say "${step[*]} ${cloudmask[*]} ${args[*]}"
run_forwarding_signals "${step[@]}" "${cloudmask[@]}" "${args[@]}"
say "cloudmask exited with $rc"
requeue_if_checkpointed "$run_dir" "cloudmask train --resume --out $run_dir"
exit "$rc"
