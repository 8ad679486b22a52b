#!/usr/bin/env bash
# The installation steps of the cloudmask image: the one list both recipes run (containers/Dockerfile and
# containers/cloudmask.def), so Docker and Apptainer images install exactly the same things.
#
#   bash install.sh SOURCE_DIR [EXTRAS]   (SOURCE_DIR holds pyproject.toml, VERSION, README.md, src/, slurm/;
#                                          EXTRAS: the package's extras, default "report"; "report,cloud" adds
#                                          s3:// data and Zarr stores)
#
# Installs cloudmask into the image's Python without replacing anything the image already has: every installed
# package is pinned by a constraints file, so pip can add packages but never swap the image's TensorFlow,
# protobuf or NumPy for PyPI builds. Keras is the one exception (the model needs Keras 3; it is pure Python
# and independent of TensorFlow's build). The build fails if any other package changed version, if pip check
# reports a problem the base image did not already have, or if cloudmask cannot import its backend.
set -euo pipefail

src=${1:?usage: install.sh SOURCE_DIR [EXTRAS]}
extras=${2:-report}
py=${PYTHON:-python3}
[ -n "${PIP_CERT:-}" ] || unset PIP_CERT  # an empty value would be read as a certificate path
work=$(mktemp -d)
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

pip list --format=freeze | grep -E '^[A-Za-z0-9_.-]+==' | sort > "$work/before.txt"
grep -viE '^keras==' "$work/before.txt" > "$work/constraints.txt" || true
pip check > "$work/check-before.txt" 2>&1 || true

pip install --no-cache-dir --constraint "$work/constraints.txt" "${src}[${extras}]"

pip list --format=freeze | grep -E '^[A-Za-z0-9_.-]+==' | sort > "$work/after.txt"
changed=$(comm -23 "$work/before.txt" "$work/after.txt" | grep -viE '^keras==' || true)
if [ -n "$changed" ]; then
    echo "install.sh: the base image's packages changed (they must not):" >&2
    echo "$changed" >&2
    exit 1
fi
pip check > "$work/check-after.txt" 2>&1 || true
new_problems=$(comm -13 <(sort "$work/check-before.txt") <(sort "$work/check-after.txt") \
    | grep -v '^No broken requirements found' || true)
if [ -n "$new_problems" ]; then
    echo "install.sh: pip check found new problems:" >&2
    echo "$new_problems" >&2
    exit 1
fi
echo "install.sh: added: $(comm -13 "$work/before.txt" "$work/after.txt" | tr '\n' ' ')"
"$py" -c "import keras, cloudmask; print('cloudmask', cloudmask.__version__, '| keras', keras.__version__, keras.backend.backend())"
rm -rf "$work"
