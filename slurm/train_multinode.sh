#!/usr/bin/env bash
# Multi-node variant of slurm/train.sh: one data-parallel run over several nodes, launched with srun
# (one task per node; every task drives the node's GPUs). Same environment variables as slurm/train.sh.
#
# Status: the launcher shape is fixed here, but `cloudmask train` does not yet run as several cooperating
# workers. Keras 3's fit() fails under TensorFlow's MultiWorkerMirroredStrategy (keras-team/keras#20585,
# tensorflow/tensorflow#72388; reproduced here with Keras 3.15 / TF 2.21), so the multi-node path needs the JAX
# backend (keras.distribution) or a custom TensorFlow loop: docs/slurm.md "Multi-node".
# Until then this script refuses to start rather than run N independent copies that would race on one run
# directory. Use slurm/train.sh (one node, one or more GPUs) for measurements today.
#SBATCH --job-name=cloudmask-mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%j.out
set -euo pipefail

if ! cloudmask train --help 2>/dev/null | grep -q -- "--distributed"; then
    echo "[train_multinode.sh] error: this cloudmask has no multi-worker training yet; use slurm/train.sh" >&2
    exit 2
fi
exec srun --kill-on-bad-exit=1 cloudmask train --distributed slurm \
    --out "${RESULTS_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/results}/${EXPERIMENT:-default}/${SLURM_JOB_ID}_0" \
    ${DATA_DIR:+--data "$DATA_DIR"} ${CONFIG:+--config "$CONFIG"} --set "seed=${BASE_SEED:-0}"
