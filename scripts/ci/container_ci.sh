#!/usr/bin/env bash
# CI stage for the containers: build both recipes for real and run the benchmark inside them.
#
#   scripts/ci/container_ci.sh                       Docker image (podman), its cloud variant, then Apptainer
#   scripts/ci/container_ci.sh --base-archive FILE   only the stand-in base, saved as a docker-archive (for
#                                                    scripts/ci/apptainer_ci.sh)
#
# The NGC base cannot be pulled here (no registry access), so the images are built with the base set to a
# local stand-in: a debootstrap Debian rootfs + Python + tensorflow-cpu (containers/ci-base.Dockerfile).
# Docker path: containers/Dockerfile built with podman (rootful, runc, cgroupfs, lowered ulimits: the settings
# this kind of machine needs), doctor, `submit --dry-run` finding the slurm/ scripts the installed package
# carries, and a tiny bench as a non-root user, check-log; then the same Dockerfile with EXTRAS=report,cloud
# training from s3:// on a local S3 server (scripts/local_s3.py), and the default image's one-line error for
# the same URL. Apptainer path: scripts/ci/apptainer_ci.sh (OUT = $work/apptainer).
# Needs root and Debian's podman, runc and debootstrap. Work files: $CONTAINER_CI_DIR (default
# /tmp/cloudmask-container-ci); the Debian rootfs image is reused when it is already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
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
tiny=(--set model.filters=4 --set model.depth=2 --set train.batch_size=8 --set train.micro_batch_size=null
      --set train.epochs=1 --set infer.batch_size=8 --set telemetry.idle_seconds=0)

step() { echo "== container_ci: $* ($(date +%T))"; }

build_base() {
    if ! podman image exists localhost/debian-min:bookworm; then
        step "debootstrap a Debian bookworm rootfs"
        local mirror
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        rm -rf "$work/rootfs"
        debootstrap --variant=minbase bookworm "$work/rootfs" "${mirror:-http://deb.debian.org/debian}" \
            >"$work/debootstrap.log"
        tar -C "$work/rootfs" -c . | podman import - localhost/debian-min:bookworm >/dev/null
        rm -rf "$work/rootfs"
    fi
    step "build the stand-in base (Debian + Python + tensorflow-cpu)"
    podman build --pull=never --network host "${cert[@]}" -f containers/ci-base.Dockerfile \
        -t localhost/cloudmask-ci-base:latest containers
}

# build_image TAG EXTRAS: containers/Dockerfile on the stand-in base
build_image() {
    podman build --pull=never --network host "${cert[@]}" \
        --build-arg BASE_IMAGE=localhost/cloudmask-ci-base:latest \
        --build-arg CLOUDMASK_VERSION="$(cat VERSION)" \
        --build-arg GIT_REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg EXTRAS="$2" -f containers/Dockerfile -t "$1" .
}

# result_status RUN_DIR: the status in its results.json
result_status() {
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$1/results.json"
}

# cloud_check: the image with the cloud extra trains from s3:// (a local S3 server, reached over the host's
# network); the default image refuses the URL in one line that says how to build the variant.
cloud_check() {
    # shellcheck source=scripts/env.sh
    source "$root/scripts/env.sh"
    cloudmask_env tf,test  # moto's server and boto3 (already there after the test suite)
    local data=$work/results/s3-data ready=$work/s3.url server url out err
    rm -rf "$data" "$ready"
    cloudmask data synth --out "$data" --train 6 --test 2 -q
    python "$root/scripts/local_s3.py" "$data" open-data --ready "$ready" >"$work/s3.log" 2>&1 &
    server=$!
    # shellcheck disable=SC2064  # the PID is known now
    trap "kill $server 2>/dev/null || true" EXIT
    for _ in $(seq 1 120); do [ -s "$ready" ] && break; kill -0 "$server" || break; sleep 0.5; done
    [ -s "$ready" ] || { cat "$work/s3.log" >&2; echo "container_ci: the S3 server did not start" >&2; exit 1; }
    url=$(cat "$ready")
    out=/results/s3-train-$(date +%s)
    podman run --rm --network host --shm-size=1g -u 1000:1000 -v "$work/results:/results" \
        localhost/cloudmask-bench:ci-cloud \
        train --data s3://open-data/ds --set data.remote.endpoint_url="$url" --out "$out" -q "${tiny[@]}"
    [ "$(result_status "$work/results/${out#/results/}")" = success ] \
        || { echo "container_ci: training from s3:// in the container did not succeed" >&2; exit 1; }
    podman run --rm --network none -v "$work/results:/results" localhost/cloudmask-bench:ci check-log "$out"
    err=$(podman run --rm --network host localhost/cloudmask-bench:ci train --data s3://open-data/ds \
        --set data.remote.endpoint_url="$url" --out /tmp/never 2>&1 >/dev/null) && {
        echo "container_ci: the image without the cloud extra accepted s3:// data" >&2; exit 1; }
    echo "$err"
    if [ "$(wc -l <<<"$err")" != 1 ] || ! grep -q "EXTRAS=report,cloud" <<<"$err"; then
        echo "container_ci: expected one error line naming EXTRAS=report,cloud" >&2
        exit 1
    fi
    kill "$server"
    wait "$server" || true
    trap - EXIT
}

if [ "${1:-}" = "--base-archive" ]; then
    archive=${2:?usage: $0 --base-archive FILE}
    build_base
    rm -f "$archive"
    podman save --format docker-archive -o "$archive" localhost/cloudmask-ci-base:latest
    exit 0
fi

t0=$(date +%s)
build_base
t_base=$(date +%s)

step "build containers/Dockerfile on it"
build_image localhost/cloudmask-bench:ci report
t_image=$(date +%s)

step "cloudmask doctor in the image (no GPU here: warnings, no failure)"
podman run --rm --network none localhost/cloudmask-bench:ci doctor

step "the SLURM scripts ship with the installed package: cloudmask submit --dry-run in the image"
submit=$(podman run --rm --network none localhost/cloudmask-bench:ci submit --dry-run --results /tmp/r --repeats 2)
echo "$submit"
grep -q "/share/cloudmask-bench/slurm/train.sh" <<<"$submit" \
    || { echo "container_ci: submit in the image did not find the installed slurm/train.sh" >&2; exit 1; }

step "cloudmask bench on tiny synthetic data, as a non-root user"
chmod 1777 "$work/results"
out=/results/bench-$(date +%s)
podman run --rm --network none --shm-size=1g -u 1000:1000 -v "$work/results:/results" localhost/cloudmask-bench:ci \
    bench --out "$out" --set bench.train_files=5 --set bench.test_files=1 "${tiny[@]}" 2>&1 | tee "$work/bench.log"
if grep -nE "Traceback|is not a writable directory" "$work/bench.log"; then
    echo "container_ci: the bench in the image printed the lines above" >&2
    exit 1
fi
status=$(result_status "$work/results/${out#/results/}")
[ "$status" = success ] || { echo "container_ci: bench in the container ended with status $status" >&2; exit 1; }
podman run --rm --network none -v "$work/results:/results" localhost/cloudmask-bench:ci check-log "$out"
t_runs=$(date +%s)

step "the cloud variant (EXTRAS=report,cloud) trains from s3:// in the container"
build_image localhost/cloudmask-bench:ci-cloud report,cloud
cloud_check
t_cloud=$(date +%s)

step "Apptainer: build cloudmask.sif from containers/cloudmask.def and run it (scripts/ci/apptainer_ci.sh)"
rm -rf "$work/apptainer"
"$root/scripts/ci/apptainer_ci.sh" "$work/apptainer"
t_end=$(date +%s)
echo "container_ci: OK: base $((t_base - t0)) s, image $((t_image - t_base)) s, runs $((t_runs - t_image)) s," \
     "cloud variant $((t_cloud - t_runs)) s, apptainer $((t_end - t_cloud)) s, total $((t_end - t0)) s"
