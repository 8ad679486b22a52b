# CI only: a stand-in for the NGC TensorFlow image, which cannot be pulled here (no registry access).
# Debian + Python + tensorflow-cpu in a virtual environment on PATH, so `python3 -m pip` installs into it the
# way it installs into the NGC image's system Python. Built by scripts/ci/container_ci.sh from a debootstrap rootfs.
ARG DEBIAN_IMAGE=localhost/debian-min:bookworm
FROM ${DEBIAN_IMAGE}
ARG PIP_CERT=
ARG TENSORFLOW=tensorflow-cpu==2.21.0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# hadolint ignore=DL3013
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && python3 -m venv /opt/venv \
    && python3 -m pip install --no-cache-dir --disable-pip-version-check "${TENSORFLOW}"
