#!/usr/bin/env bash
# One data-parallel CloudMask run over several nodes:  DATA_STORE=/path/store sbatch slurm/train_multinode.sh
#
# `srun -n $SLURM_NTASKS` starts one `cloudmask train` per task; the tasks find each other from SLURM's
# variables (block distribution, ports from the job id) and train one model with MultiWorkerMirroredStrategy.
# Task 0 writes the run directory RESULTS_DIR/EXPERIMENT/<job id>_0 (on a file system every node sees); the
# others write nothing there. Layouts (docs/distributed.md):
#   one task per GPU   --ntasks-per-node=<GPUs> --gpus-per-task=1   (the default below)
#   one task per node  --ntasks-per-node=1 --gres=gpu:<GPUs>        (each task mirrors over its node's GPUs)
# USR1 (300 s before the time limit) or TERM: every task stops at the same step, the chief keeps the last
# finished epoch, the job requeues itself and resumes the run.
#
# Environment (as slurm/train.sh, plus):
#   DATA_STORE   patch store made by `cloudmask data prepare` (required: each task reads only its rows of it)
#   RUN_DIR      continue this run directory instead of starting RESULTS_DIR/EXPERIMENT/<job id>_0
#   CONFIG, RESULTS_DIR, EXPERIMENT, BASE_SEED (the run's seed here), CONTAINER, IMAGE, MAX_REQUEUES, EXTRA_ARGS
#SBATCH --job-name=cloudmask-mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%j.out
set -uo pipefail

me=train_multinode.sh
# sbatch runs a spooled copy of this script: lib.sh is sourced from the submitted original's directory
job_script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
lib=$(dirname "$(echo "${job_script:-$0}" | head -n 1)")/lib.sh  # an array's first task lists every task
# shellcheck source=slurm/lib.sh
. "$lib" || { echo "[$me] error: $lib not found: submit the script from its checkout" >&2; exit 2; }
common_settings
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit with sbatch"
tasks=${SLURM_NTASKS:-1}
[ -n "${DATA_STORE:-}" ] || die "DATA_STORE is not set: prepare a store with \`cloudmask data prepare RAW STORE\`"

run_dir=${RUN_DIR:-$RESULTS_DIR/$EXPERIMENT/${SLURM_JOB_ID}_0}
mkdir -p "$(dirname "$run_dir")" || die "cannot create $(dirname "$run_dir"); set RESULTS_DIR"

binds=("$RESULTS_DIR" "$DATA_STORE" "$(dirname "$run_dir")")
[ -n "${CONFIG:-}" ] && binds+=("$(dirname "$CONFIG")")
cloudmask_command "${binds[@]}"

args=(train --out "$run_dir")
if [ -f "$run_dir/config.yaml" ]; then
    say "job $SLURM_JOB_ID (restart $restarts): resuming $run_dir on $tasks tasks"
    args+=(--resume)
else
    say "job $SLURM_JOB_ID: $tasks tasks on ${SLURM_JOB_NUM_NODES:-1} node(s), seed $BASE_SEED, run directory $run_dir"
    args+=(--store "$DATA_STORE" --set distribute.strategy=multi_worker --set "seed=$BASE_SEED")
    [ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is a word list by design
[ -n "${EXTRA_ARGS:-}" ] && args+=($EXTRA_ARGS)

# srun passes USR1/TERM on to every task; block distribution fills a node's ranks before the next node's, the
# order in which cloudmask numbers its workers
say "srun -n $tasks ${cloudmask[*]} ${args[*]}"
run_forwarding_signals srun -n "$tasks" --distribution=block --kill-on-bad-exit=1 "${cloudmask[@]}" "${args[@]}"
say "srun exited with $rc"
requeue_if_checkpointed "$run_dir" "RUN_DIR=$run_dir sbatch slurm/train_multinode.sh"
exit "$rc"
