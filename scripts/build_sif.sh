#!/usr/bin/env bash
# Build the Apptainer image cloudmask.sif.
#
#   scripts/build_sif.sh [BUILD_OPTION ...] [OUT.sif]    from containers/cloudmask.def (pulls the NGC base)
#   scripts/build_sif.sh --from-docker IMAGE [OUT.sif]   from a local Docker/Podman image (docker-daemon://)
#
# BUILD_OPTIONs go to `apptainer build`, e.g. an older NGC tag for an older site driver:
#   scripts/build_sif.sh --build-arg BASE=nvcr.io/nvidia/tensorflow:24.09-tf2-py3 cloudmask.sif
# or s3:// data and Zarr stores in the image: --build-arg EXTRAS=report,cloud. The def's %arguments lists them.
# The checkout's git revision is baked in (GIT_REVISION overrides it). Needs apptainer (or singularity) on PATH;
# building from the def needs root or --fakeroot, which this script passes when not root. Run from anywhere;
# paths are relative to the repository root.
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

if [ "${1:-}" = "--from-docker" ]; then
    image=${2:?usage: $0 --from-docker IMAGE [OUT.sif]}
    out=${3:-cloudmask.sif}
    echo "building $out from the local image $image"
    exec "$runtime" build "$out" "docker-daemon://$image"
fi

options=("$@")
out=cloudmask.sif
if [ $# -gt 0 ] && [[ ${options[-1]} == *.sif ]]; then
    out=${options[-1]}
    unset 'options[-1]'
fi
[ -e "$out" ] && { echo "build_sif.sh: error: $out exists; remove it or name another file" >&2; exit 2; }
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
fakeroot=()
[ "$(id -u)" = 0 ] || fakeroot=(--fakeroot)
revision=${GIT_REVISION:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}

cd "$root"  # %files paths in the def are relative to the repository root
echo "building $out from containers/cloudmask.def with $runtime (revision $revision)"
exec "$runtime" build "${fakeroot[@]}" --build-arg GIT_REVISION="$revision" ${options[@]+"${options[@]}"} \
    "$out" containers/cloudmask.def
