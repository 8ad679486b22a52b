# shellcheck shell=bash
# Creates (once) and activates the project's virtual environment in .venv, for the quick-start scripts.
# Usage: source scripts/env.sh EXTRAS   (e.g. "tf" or "tf,test")
# Works on a fresh Debian/Ubuntu with Python >= 3.10 even without the python3-venv package: pip is then
# bootstrapped from its wheel on PyPI. Set PYTHON to choose the interpreter, CLOUDMASK_VENV to move the env.

cloudmask_env() {
    local extras=$1 root python venv stamp want
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    python=${PYTHON:-python3}
    venv=${CLOUDMASK_VENV:-$root/.venv}

    if ! command -v "$python" >/dev/null 2>&1; then
        echo "error: $python not found; install Python >= 3.10 (Debian/Ubuntu: apt-get install python3)" >&2
        return 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "error: $("$python" -V 2>&1) is too old; cloudmask-bench needs Python >= 3.10 (set PYTHON=...)" >&2
        return 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating virtual environment $venv" >&2
        if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
            # Debian/Ubuntu without python3-venv: no ensurepip, so create the env without pip and fetch pip itself
            rm -rf "$venv"
            "$python" -m venv --without-pip "$venv" || {
                echo "error: cannot create a virtual environment (Debian/Ubuntu: apt-get install python3-venv)" >&2
                return 1
            }
            "$venv/bin/python" "$root/scripts/get_pip.py" || return 1
        fi
    fi
    # Reinstall only when the package metadata changes or an extra is asked for that is not installed yet
    # (test.sh's tf,test covers bench.sh's tf: running one after the other installs nothing).
    sum=$(cat "$root/pyproject.toml" "$root/VERSION" | cksum)
    stamp="$venv/.cloudmask-installed"
    local installed="" have=""
    if [ -f "$stamp" ]; then read -r have installed <"$stamp" || true; fi
    if [ "$installed" != "$sum" ] || ! _cloudmask_has_extras "$have" "$extras"; then
        [ "$installed" = "$sum" ] && extras=$(_cloudmask_union "$have" "$extras")
        echo "installing cloudmask-bench[$extras] into $venv (first time: a few minutes)" >&2
        "$venv/bin/python" -m pip install --quiet --upgrade pip >&2 || return 1
        "$venv/bin/python" -m pip install --quiet -e "${root}[${extras}]" >&2 || return 1
        echo "$extras $sum" >"$stamp"
    fi
    export PATH="$venv/bin:$PATH"
    export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
}

# Whether the comma-separated extras $2 are all among $1.
_cloudmask_has_extras() {
    local want
    for want in ${2//,/ }; do
        case ",$1," in *",$want,"*) ;; *) return 1 ;; esac
    done
}

# The comma-separated union of two extras lists, in first-seen order.
_cloudmask_union() {
    local out="$1" e
    for e in ${2//,/ }; do
        _cloudmask_has_extras "$out" "$e" || out="${out:+$out,}$e"
    done
    echo "$out"
}

# pytest-xdist arguments for the test scripts: one worker per CPU core, at most 4 and one per 6 GiB of available
# memory (a test and the `cloudmask` it starts may take up to 6 GiB; CLOUDMASK_TEST_WORKERS=N chooses). By default
# each test file goes to one worker (a module's fixtures made once, one local SLURM cluster at a time), files in
# the order tests/conftest.py collects them (the longest test's first, then by number of tests). A lane whose tests
# share nothing but session fixtures passes `worksteal`: tests, not files, and an idle worker takes half of a busy
# one's queue (a file of one long test otherwise brings its next file along). Nothing for one worker.
#   cloudmask_xdist_args [loadfile|worksteal]
cloudmask_xdist_args() {
    local cores mem_gib n dist=${1:-loadfile}
    # the CPUs this process may use (affinity, cgroup), but not OMP_NUM_THREADS, which GNU nproc also obeys
    cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
    mem_gib=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 6)
    n=$((cores < 4 ? cores : 4))
    if [ $((mem_gib / 6)) -lt "$n" ] && [ -z "${CLOUDMASK_TEST_WORKERS:-}" ]; then
        n=$((mem_gib / 6))
        echo "tests: $((n > 1 ? n : 1)) worker(s) for $cores cores: ${mem_gib} GiB of memory available, 6 GiB per worker" \
             "(CLOUDMASK_TEST_WORKERS=N chooses)" >&2
    fi
    n=${CLOUDMASK_TEST_WORKERS:-$n}
    if [ "$n" -gt 1 ]; then echo "-n $n --dist $dist --no-loadscope-reorder"; fi
}
