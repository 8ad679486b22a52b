#!/usr/bin/env bash
# CI stage for the containers: build containers/Dockerfile for real and run the benchmark inside it.
#
# The NGC base cannot be pulled here (no registry access), so the Dockerfile is built with BASE_IMAGE set to a
# local stand-in: a debootstrap Debian rootfs + Python + tensorflow-cpu (containers/ci-base.Dockerfile).
# Uses podman (rootful, runc, cgroupfs, lowered ulimits: the settings this kind of machine needs).
# Needs root and Debian's podman, runc and debootstrap. Work files: $CONTAINER_CI_DIR (default
# /tmp/cloudmask-container-ci); the Debian rootfs image is reused when it is already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${CONTAINER_CI_DIR:-/tmp/cloudmask-container-ci}
mkdir -p "$work/storage" "$work/results"
cd "$root"

for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin
    command -v "$tool" >/dev/null 2>&1 || { echo "container_ci.sh: $tool not found (apt-get install $tool)" >&2; exit 1; }
done

cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$work/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$work/storage/root"
runroot = "$work/storage/run"
CONF
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf

ca=/etc/ssl/certs/ca-certificates.crt  # pip's traffic may go through a TLS-intercepting proxy
cert=()
[ -f "$ca" ] && cert=(-v "$ca:/etc/ssl/certs/host-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/certs/host-ca.crt)

step() { echo "== container_ci: $* ($(date +%T))"; }
t0=$(date +%s)

if ! podman image exists localhost/debian-min:bookworm; then
    step "debootstrap a Debian bookworm rootfs"
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" "${mirror:-http://deb.debian.org/debian}" >"$work/debootstrap.log"
    tar -C "$work/rootfs" -c . | podman import - localhost/debian-min:bookworm >/dev/null
    rm -rf "$work/rootfs"
fi

step "build the stand-in base (Debian + Python + tensorflow-cpu)"
podman build --pull=never --network host "${cert[@]}" -f containers/ci-base.Dockerfile \
    -t localhost/cloudmask-ci-base:latest containers
t_base=$(date +%s)

step "build containers/Dockerfile on it"
podman build --pull=never --network host "${cert[@]}" \
    --build-arg BASE_IMAGE=localhost/cloudmask-ci-base:latest \
    --build-arg CLOUDMASK_VERSION="$(cat VERSION)" \
    --build-arg GIT_REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -f containers/Dockerfile -t localhost/cloudmask-bench:ci .
t_image=$(date +%s)

step "cloudmask doctor in the image (no GPU here: warnings, no failure)"
podman run --rm --network none localhost/cloudmask-bench:ci doctor

step "cloudmask bench on tiny synthetic data, as a non-root user"
chmod 1777 "$work/results"
out=/results/bench-$(date +%s)
podman run --rm --network none --shm-size=1g -u 1000:1000 -v "$work/results:/results" localhost/cloudmask-bench:ci \
    bench --out "$out" --set bench.train_files=5 --set bench.test_files=1 --set model.filters=4 \
    --set model.depth=2 --set train.batch_size=8 --set train.micro_batch_size=null --set train.epochs=1 \
    --set infer.batch_size=8 --set telemetry.idle_seconds=0
status=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$work/results/${out#/results/}/results.json")
[ "$status" = success ] || { echo "container_ci: bench in the container ended with status $status" >&2; exit 1; }
podman run --rm --network none -v "$work/results:/results" localhost/cloudmask-bench:ci check-log "$out"
t_end=$(date +%s)
echo "container_ci: OK: base $((t_base - t0)) s, image $((t_image - t_base)) s, runs $((t_end - t_image)) s," \
     "total $((t_end - t0)) s"
