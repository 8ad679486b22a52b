#!/usr/bin/env bash
# Build the Apptainer image cloudmask.sif.
#
#   scripts/build_sif.sh [OUT.sif]                       from containers/cloudmask.def (pulls the NGC base)
#   scripts/build_sif.sh --from-docker IMAGE [OUT.sif]   from a local Docker/Podman image (docker-daemon://)
#
# Needs apptainer (or singularity) on PATH; building from the def usually needs root or --fakeroot, which this
# script passes when not root. Run from anywhere; paths are relative to the repository root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

runtime=""
for candidate in apptainer singularity; do
    if command -v "$candidate" >/dev/null 2>&1; then runtime=$candidate; break; fi
done
if [ -z "$runtime" ]; then
    echo "build_sif.sh: error: neither apptainer nor singularity is installed; on a cluster try" \
         "'module load apptainer', or build the Docker image (containers/Dockerfile) and convert it" \
         "where apptainer exists: scripts/build_sif.sh --from-docker cloudmask-bench:TAG" >&2
    exit 2
fi

fakeroot=()
[ "$(id -u)" = 0 ] || fakeroot=(--fakeroot)

if [ "${1:-}" = "--from-docker" ]; then
    image=${2:?usage: $0 --from-docker IMAGE [OUT.sif]}
    out=${3:-cloudmask.sif}
    echo "building $out from the local image $image"
    exec "$runtime" build "$out" "docker-daemon://$image"
fi

out=${1:-cloudmask.sif}
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
cd "$root"  # %files paths in the def are relative to the repository root
echo "building $out from containers/cloudmask.def with $runtime"
exec "$runtime" build "${fakeroot[@]}" "$out" containers/cloudmask.def
