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
    # Reinstall only when the package metadata or the requested extras change.
    want="$extras $(cat "$root/pyproject.toml" "$root/VERSION" | cksum)"
    stamp="$venv/.cloudmask-installed"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing cloudmask-bench[$extras] into $venv (first time: a few minutes)" >&2
        "$venv/bin/python" -m pip install --quiet --upgrade pip >&2 || return 1
        "$venv/bin/python" -m pip install --quiet -e "${root}[${extras}]" >&2 || return 1
        echo "$want" >"$stamp"
    fi
    export PATH="$venv/bin:$PATH"
    export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
}
