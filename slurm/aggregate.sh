#!/usr/bin/env bash
# The report over an experiment (or a grid of experiments), after its array jobs:
#   sbatch --dependency=afterany:<array job id> slurm/aggregate.sh RESULTS_DIR/EXPERIMENT
# `cloudmask submit` and `cloudmask grid submit` do this for you. Failed, interrupted and missing repeats are
# listed in the report; the job fails only if the report itself cannot be written.
# Environment: CONTAINER (apptainer | singularity | none), IMAGE (the .sif), as for slurm/train.sh.
#SBATCH --job-name=cm-report
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output=logs/aggregate-%j.out
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch slurm/aggregate.sh EXPERIMENT_DIR [DIR ...]" >&2; exit 2; }
CONTAINER=${CONTAINER:-apptainer}
IMAGE=${IMAGE:-${SLURM_SUBMIT_DIR:-$PWD}/cloudmask.sif}
case $CONTAINER in
    apptainer | singularity) cloudmask=("$CONTAINER" run --bind "$(IFS=,; echo "$*")" "$IMAGE") ;;
    none) cloudmask=("${CLOUDMASK:-cloudmask}") ;;
    *) echo "CONTAINER=$CONTAINER: use apptainer, singularity or none" >&2; exit 2 ;;
esac

echo "[aggregate.sh $(date '+%F %T')] ${cloudmask[*]} report $*"
exec "${cloudmask[@]}" report "$@" --out "$1/report"
