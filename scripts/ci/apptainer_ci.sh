#!/usr/bin/env bash
# CI stage for Apptainer: build cloudmask.sif from containers/cloudmask.def and run it the way cluster users do.
#
#   scripts/ci/apptainer_ci.sh OUT      (OUT: a new or empty directory)
#
# Debian 12 has no Apptainer; Debian sid has it (and a current Slurm). The script makes a sid root with
# debootstrap (kept in $APPTAINER_CI_DIR, default /tmp/cloudmask-apptainer-ci, and reused), enters it with
# pivot_root in new mount and PID namespaces (apptainer refuses a plain chroot; every process started in there,
# the Slurm daemons included, ends with the namespace), and there, as an unprivileged user as on a cluster:
#   - builds OUT/cloudmask.sif from the def with scripts/build_sif.sh (--fakeroot). The differences from a
#     site build: the base, a docker-archive of the local stand-in for the NGC image that
#     scripts/ci/container_ci.sh makes (no registry is reachable here), and the squashfs's gzip level, 1 instead
#     of mksquashfs's 9 (the same format for every runtime; on 2 cores 13 s instead of 92 s, the SIF 13 % larger);
#   - apptainer test; apptainer run --nv ... doctor (no NVIDIA driver here); apptainer run ... bench with its
#     results written through a bind mount; data synth and train through the image;
#   - CONTAINER=apptainer IMAGE=OUT/cloudmask.sif sbatch --array=1-2 slurm/train.sh on a one-node Slurm cluster
#     in the same root, then slurm/aggregate.sh's report of the two runs.
# Back outside: `cloudmask check-log` on every run and the manifests' container record (host venv, .venv).
# Leaves OUT/cloudmask.sif, OUT/runs/{bench,train}, OUT/slurm/ (array runs, report, job logs), OUT/data,
# OUT/logs/ (one log per step) and OUT/timings.txt. Files under OUT belong to uid 1000, the root's user.
# Needs root, Debian's debootstrap and podman (for the base), and the package mirror of /etc/apt.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
ci_user=cmuser  # uid 1000 in the sid root
# tiny runs: a few seconds per epoch on 2 cores
tiny=(--set model.filters=4 --set model.depth=2 --set train.batch_size=8 --set train.micro_batch_size=null
      --set train.epochs=1 --set infer.batch_size=8 --set telemetry.idle_seconds=0)

say() { echo "== apptainer_ci: $* ($(date +%T))"; }
fail() { echo "apptainer_ci: error: $*" >&2; exit 1; }

# step NAME COMMAND...: run it with its output in OUT/logs/NAME.log and its time in OUT/timings.txt;
# on failure show the end of the log and stop.
step() {
    local name=$1 t0 rc=0
    shift
    say "$name"
    t0=$(date +%s)
    "$@" >"$CI_OUT/logs/$name.log" 2>&1 || rc=$?
    echo "$name $(($(date +%s) - t0))" >>"$CI_OUT/timings.txt"
    if [ "$rc" != 0 ]; then
        tail -n 40 "$CI_OUT/logs/$name.log" >&2
        fail "$name failed (exit $rc); whole log: $CI_OUT/logs/$name.log"
    fi
}

# --- on the host -------------------------------------------------------------------------------------------

make_root() {
    local sid=$1 mirror
    if [ ! -f "$sid/.cloudmask-ready" ]; then
        rm -rf "$sid"
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        debootstrap --variant=minbase sid "$sid" "${mirror:-http://deb.debian.org/debian}"
        # the mirror's sid Release file may be past its Valid-Until date
        chroot "$sid" apt-get -o Acquire::Check-Valid-Until=false update
        chroot "$sid" env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Check-Valid-Until=false install \
            -y --no-install-recommends apptainer squashfs-tools squashfuse fuse2fs gocryptfs \
            slurmctld slurmd slurm-client
        chroot "$sid" useradd -m -u 1000 -s /bin/bash "$ci_user"
        touch "$sid/.cloudmask-ready"
    fi
    cp /etc/hosts "$sid/etc/hosts"  # Slurm resolves localhost
    # pip inside the image build may go through a TLS-intercepting proxy: the host's CA bundle
    cp /etc/ssl/certs/ca-certificates.crt "$sid/etc/ssl/host-ca.crt"
}

host_main() {
    [ $# -eq 1 ] || { echo "usage: $0 OUT" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || fail "needs root (debootstrap, mount namespaces, the Slurm daemons)"
    for tool in debootstrap podman unshare; do
        command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin
        command -v "$tool" >/dev/null 2>&1 || fail "$tool not found (apt-get install $tool)"
    done
    mkdir -p "$1"
    [ -z "$(ls -A "$1")" ] || fail "$1 is not empty: give a new directory (nothing in it is overwritten)"
    export CI_OUT CI_WORK CI_REPO=$repo CI_REVISION
    CI_OUT=$(cd "$1" && pwd)
    CI_WORK=${APPTAINER_CI_DIR:-/tmp/cloudmask-apptainer-ci}
    CI_REVISION=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
    mkdir -p "$CI_OUT/logs" "$CI_WORK"
    local t0=$SECONDS
    step sid-root make_root "$CI_WORK/sid-root"
    step base-archive "$repo/scripts/ci/container_ci.sh" --base-archive "$CI_WORK/base.tar"
    install -d -m 1777 "$CI_WORK/tmp"
    chown 1000 "$CI_OUT" "$CI_OUT/logs" "$CI_OUT/timings.txt"
    say "entering the sid root"
    unshare --mount --pid --fork --kill-child --propagation private "$0" --enter "$CI_WORK/sid-root"
    rm -f "$CI_WORK/base.tar"
    step check-runs check_runs
    say "OK in $((SECONDS - t0)) s; step times (s): $(tr '\n' ' ' <"$CI_OUT/timings.txt")"
}

# check_runs: outside the image, with the checkout's own cloudmask: every run's MLPerf log passes, every run
# succeeded, the manifests name the image that ran, the array got its seeds and the report lists both runs.
check_runs() {
    # shellcheck source=scripts/env.sh
    source "$repo/scripts/env.sh"
    cloudmask_env ""  # check-log needs only the core packages (nothing to install where .venv exists)
    local run
    for run in "$CI_OUT"/runs/bench "$CI_OUT"/runs/train "$CI_OUT"/slurm/results/array/*_[12]; do
        cloudmask check-log "$run"
    done
    # what the user saw: no Python traceback, no complaint about a directory of the image or the node
    if grep -nE "Traceback|is not a writable directory" "$CI_OUT"/logs/*.log "$CI_OUT"/slurm/logs/*.out; then
        echo "apptainer_ci: the runs printed the lines above" >&2
        return 1
    fi
    python - "$CI_OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
array = sorted((out / "slurm/results/array").glob("*_[12]"))
assert len(array) == 2, f"expected the 2 array runs, found {array}"
for run in [out / "runs/bench", out / "runs/train", *array]:
    status = json.loads((run / "results.json").read_text())["status"]
    assert status == "success", f"{run}: status {status}"
    container = json.loads((run / "manifest.json").read_text())["container"]
    assert container["runtime"] == "apptainer", (run, container)
    assert container["image"] == str(out / "cloudmask.sif"), (run, container)
    assert container.get("built_with", "").startswith("apptainer "), (run, container)
    print(f"{run}: success, container {container}")
seeds = sorted(json.loads((run / "results.json").read_text())["seed"] for run in array)
assert seeds == [1, 2], f"array seeds {seeds}"
report = json.loads((out / "slurm/results/array/report/report.json").read_text())
assert [r["status"] for r in report["runs"]] == ["success", "success"], report["runs"]
doctor = (out / "logs/doctor-nv.log").read_text().splitlines()
gpu = [line for line in doctor if "GPU" in line]
assert len(gpu) == 1 and gpu[0].split()[:2] == ["GPU", "WARN"] and "no GPU" in gpu[0], doctor
print(f"report: {len(report['runs'])} runs, seeds {seeds}; doctor --nv: {gpu[0]}")
PY
}

# --- in the new namespaces, as root: the root's mounts, then pivot_root into it ----------------------------

enter() {
    local root=$1 dir parent spec name major minor
    mount --bind "$root" "$root"  # pivot_root needs a mount point
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    # a /dev of our own, where /dev/fuse may be opened by users (squashfuse mounts the SIF) as on HPC nodes
    mount -t tmpfs -o mode=755 tmpfs "$root/dev"
    for spec in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0 fuse:10:229; do
        IFS=: read -r name major minor <<<"$spec"
        mknod -m 666 "$root/dev/$name" c "$major" "$minor"
    done
    mkdir "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    ln -s pts/ptmx "$root/dev/ptmx"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    # the checkout, OUT and the work directory at the same paths inside, parents first; the user must reach
    # them, so a directory above one that others cannot enter (the root's /root, say) is opened (o+x)
    while read -r dir; do
        mkdir -p "$root$dir"
        parent=$(dirname "$dir")
        while [ "$parent" != / ]; do
            find "$root$parent" -maxdepth 0 ! -perm -o+x -exec chmod o+x {} +
            parent=$(dirname "$parent")
        done
        mount --rbind "$dir" "$root$dir"
    done < <(printf '%s\n' "$CI_REPO" "$CI_OUT" "$CI_WORK" | awk '{print length, $0}' | sort -n | cut -d' ' -f2-)
    cd "$root"
    mkdir -p .old-root
    pivot_root . .old-root
    exec chroot . /bin/bash -c 'umount -l /.old-root && rmdir /.old-root && exec "$@"' \
        bash "$CI_REPO/scripts/ci/apptainer_ci.sh" --in-root
}

# --- in the sid root ---------------------------------------------------------------------------------------

# as_user COMMAND...: as the unprivileged user, with a clean environment (plus the CI_* and listed variables)
as_user() {
    runuser -u "$ci_user" -- env -i HOME="/home/$ci_user" USER="$ci_user" LANG=C.UTF-8 \
        PATH=/usr/local/bin:/usr/bin:/bin APPTAINER_TMPDIR="$CI_WORK/tmp" "$@"
}

in_root() {
    local sif=$CI_OUT/cloudmask.sif
    cd "$CI_OUT"
    apptainer --version >"$CI_OUT/logs/versions.log"
    slurmctld -V >>"$CI_OUT/logs/versions.log"
    step build-sif as_user GIT_REVISION="$CI_REVISION" bash "$CI_REPO/scripts/build_sif.sh" \
        --bind /etc/ssl/host-ca.crt:/etc/ssl/certs/host-ca.crt --build-arg PIP_CERT=/etc/ssl/certs/host-ca.crt \
        --build-arg BOOTSTRAP=docker-archive --build-arg BASE="$CI_WORK/base.tar" \
        --mksquashfs-args "-Xcompression-level 1" "$sif"
    step apptainer-test as_user apptainer test "$sif"
    step doctor-nv as_user apptainer run --nv "$sif" doctor
    as_user mkdir -p "$CI_OUT/runs"
    step bench as_user apptainer run --bind "$CI_OUT/runs:/results" "$sif" bench --out /results/bench \
        --set bench.train_files=5 --set bench.test_files=1 "${tiny[@]}"
    step data-synth as_user apptainer run --bind "$CI_OUT" "$sif" data synth --out "$CI_OUT/data" --train 6 \
        --test 2 -q
    step train as_user apptainer run --bind "$CI_OUT" "$sif" train --data "$CI_OUT/data" \
        --out "$CI_OUT/runs/train" "${tiny[@]}"
    step slurm-array slurm_array "$sif"
}

# slurm_array SIF: a one-node cluster, the user's two-task array through the image, the report after it.
slurm_array() {
    local sif=$1 state=$CI_WORK/slurm jobs job
    rm -rf "$state"
    "$CI_REPO/scripts/local_slurm.sh" start "$state"
    as_user mkdir -p "$CI_OUT/slurm/logs"
    cd "$CI_OUT/slurm"  # the scripts' #SBATCH --output paths are relative to the submit directory
    local env=(SLURM_CONF="$state/slurm.conf" CONTAINER=apptainer IMAGE="$sif" DATA_DIR="$CI_OUT/data"
               RESULTS_DIR="$CI_OUT/slurm/results" EXPERIMENT=array EXTRA_ARGS="${tiny[*]}")
    # the array as a user submits it; the node has no GPU and 2 CPUs: override the GPU-node defaults
    job=$(as_user "${env[@]}" sbatch --parsable --array=1-2 --gres=none --cpus-per-task=1 --mem=3G \
        "$CI_REPO/slurm/train.sh")
    echo "array job $job"
    as_user "${env[@]}" timeout 900 sbatch --parsable --wait --dependency="afterany:$job" \
        "$CI_REPO/slurm/aggregate.sh" "$CI_OUT/slurm/results/array"
    jobs=$(SLURM_CONF="$state/slurm.conf" scontrol -o show job "$job")
    echo "$jobs"
    [ "$(grep -c 'JobState=COMPLETED' <<<"$jobs")" = 2 ] || { echo "not every array task completed" >&2; return 1; }
    "$CI_REPO/scripts/local_slurm.sh" stop "$state"
}

case ${1:-} in
    --enter) enter "$2" ;;
    --in-root) in_root ;;
    *) host_main "$@" ;;
esac
