"""Container recipes, compose file and `cloudmask doctor`. The real image build and run is CI's container
stage (scripts/ci/container_ci.sh); here: static checks with the real tools, and that the Docker and Apptainer
recipes install the same things (they share containers/install.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from fake_nvml import two_gpus

from cloudmask.campaign import doctor

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE, DEF_FILE, COMPOSE = REPO / "containers" / "Dockerfile", REPO / "containers" / "cloudmask.def", REPO / "compose.yaml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CLOUDMASK_CI") == "1":
            pytest.fail(f"CLOUDMASK_CI=1 but {name} is not installed")
        pytest.skip(f"{name} not installed")
    return path


def parse_def(text: str) -> tuple[dict, dict[str, list[str]]]:
    """An Apptainer definition file: header keywords, then %sections with their lines. Unknown sections and
    header lines that are not `Key: value` are errors, as they are for `apptainer build`."""
    known = {"files", "post", "environment", "runscript", "test", "labels", "help", "setup", "startscript",
             "arguments", "app"}
    header, sections, current = {}, {}, None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("%"):
            current = line[1:].split()[0]
            assert current in known, f"line {n}: unknown section %{current}"
            assert current not in sections, f"line {n}: %{current} twice"
            sections[current] = []
        elif current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                m = re.match(r"^(\w+):\s*(\S.*)$", line)
                assert m, f"line {n}: header lines are 'Key: value': {line!r}"
                header[m[1].lower()] = m[2].strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            sections[current].append(line.strip())
    return header, sections


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
            if not m[0].lstrip().startswith("#")]


def def_arguments(text: str) -> tuple[dict[str, str], set[str]]:
    """The def's %arguments defaults and every {{ NAME }} it uses (apptainer build stops on one without a value)."""
    _, sections = parse_def(text)
    defaults = dict(line.split("=", 1) for line in sections.get("arguments", []))
    return defaults, set(re.findall(r"{{\s*(\w+)\s*}}", text))


def resolve_def(text: str) -> str:
    """The def as `apptainer build` reads it with no --build-arg: the site build."""
    defaults, _ = def_arguments(text)
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: defaults[m[1]], text)


def test_the_def_file_parses_and_matches_the_dockerfile():
    text = DEF_FILE.read_text()
    defaults, used = def_arguments(text)
    assert used <= set(defaults), f"template arguments without a default: {used - set(defaults)}"
    header, sections = parse_def(resolve_def(text))
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    docker_args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert header["bootstrap"] == "docker"
    assert header["from"] == docker_args["BASE_IMAGE"]  # the same pinned NGC tag
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorflow:\d\d\.\d\d-tf2-py3", header["from"])
    # the same build arguments with the same defaults (the base is BASE_IMAGE in the Dockerfile)
    for name in ("EXTRAS", "GIT_REVISION", "PIP_CERT"):
        assert defaults[name] == docker_args[name], name
    # the same files copied to the same places ...
    def_files = {tuple(line.split()) for line in sections["files"]}
    docker_files = set()
    for kind, value in instructions:
        if kind == "COPY":
            *sources, dest = value.split()
            for s in sources:
                docker_files.add((s, dest + Path(s).name if dest.endswith("/") else dest))
    assert def_files == docker_files
    for src, _ in def_files:
        assert (REPO / src).exists(), src
    # ... and the same installation script run on them, with the same extras
    install = "bash /opt/cloudmask-src/containers/install.sh /opt/cloudmask-src"
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert f'{install} "${{EXTRAS}}"' in runs
    assert sections["post"] == [f'PIP_CERT="" {install} "report"']
    assert sections["runscript"] == ['exec cloudmask "$@"']
    assert ("ENTRYPOINT", '["cloudmask"]') in instructions
    assert sections["test"] == ['cloudmask doctor --results "${TMPDIR:-/tmp}"']
    assert sections["labels"] and sections["help"]


def test_the_def_parser_rejects_broken_files():
    with pytest.raises(AssertionError, match="unknown section"):
        parse_def("Bootstrap: docker\nFrom: x\n%postt\n  echo\n")
    with pytest.raises(AssertionError, match="header lines"):
        parse_def("Bootstrap docker\n%post\n  echo\n")


def test_install_script_pins_the_image_packages():
    script = (REPO / "containers" / "install.sh").read_text()
    assert "--constraint" in script and "pip check" in script and "changed" in script


def test_hadolint(tmp_path):
    hadolint = _tool("hadolint")
    for dockerfile in (DOCKERFILE, REPO / "containers" / "ci-base.Dockerfile"):
        done = subprocess.run([hadolint, "--failure-threshold", "error", str(dockerfile)], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM debian\nRUN cd /tmp && sudo rm -rf x\nCMD bash\nFROMM x\n")
    assert subprocess.run([hadolint, "--failure-threshold", "error", str(broken)], capture_output=True).returncode


def test_compose_file(tmp_path):
    compose = _tool("docker-compose")
    done = subprocess.run([compose, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    import yaml

    bench = yaml.safe_load(done.stdout)["services"]["bench"]
    assert bench["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert bench["shm_size"] in ("8gb", "8g") and bench["ulimits"]["memlock"] == -1
    assert any(v.endswith(":/data:rw") for v in bench["volumes"]) and any(":/results" in v for v in bench["volumes"])
    assert bench["command"][:3] == ["bench", "--prefer-data", "/data"]
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("shm_size: 8gb", "shm_size: [8gb]"))
    assert subprocess.run([compose, "-f", str(bad), "config"], capture_output=True, cwd=REPO).returncode != 0


def test_doctor_without_a_gpu_explains_why(tmp_path):
    done = run_cli("doctor", "--results", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "cloudmask doctor" and lines[1].split() == ["check", "status", "detail"]
    # no GPU anywhere: one line of the table says so and why, with no continuation line under it
    gpu = [n for n, line in enumerate(lines) if "GPU" in line]
    assert len(gpu) == 1, done.stdout
    assert lines[gpu[0]].split()[:2] == ["GPU", "WARN"] and "no GPU (no NVIDIA driver" in lines[gpu[0]]
    assert not lines[gpu[0] + 1].startswith(" "), done.stdout
    for name in ("/dev/shm", "results path", "dataset", "container", "SLURM"):
        assert any(line.startswith(name) for line in lines), name


def test_doctor_fails_on_a_missing_dataset_and_lists_a_good_one(dataset, tmp_path):
    done = run_cli("doctor", "--data", str(tmp_path / "nowhere"), "--results", str(tmp_path))
    assert done.returncode == 1 and "dataset does not exist" not in done.stderr
    flat = " ".join(done.stdout.split())  # details wrap over lines
    assert re.search(r"dataset FAIL .*nowhere: dataset directory does not exist", flat), done.stdout
    done = run_cli("doctor", "--data", str(dataset), "--results", str(tmp_path), "--full")
    assert done.returncode == 0, done.stdout
    assert re.search(r"dataset OK \S+: 7 files verified", " ".join(done.stdout.split())), done.stdout


def test_doctor_with_gpus_and_small_shm(monkeypatch):
    checks = doctor.check_gpus(["GPU:0", "GPU:1"], nvml=two_gpus(counter=True))
    assert [c.name for c in checks] == ["GPUs (backend)", "GPUs (NVML)", "NVIDIA driver"]
    assert checks[1].status == "ok" and checks[1].detail.startswith("2: ")
    assert checks[2].detail == "550.54.15, supports CUDA 12.4"
    cpu_build = doctor.check_gpus([], nvml=two_gpus(counter=True))  # the backend sees none of NVML's GPUs
    assert cpu_build[0].status == "warn" and "CPU-only build" in cpu_build[0].detail
    small = shutil.disk_usage("/")._replace(total=64 << 20)
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: small)
    shm = doctor.check_shm()[0]
    assert shm.status == "warn" and "64.0 MB" in shm.detail and "--shm-size" in shm.detail


def test_bench_prefers_data_only_when_there_is_some(dataset, tmp_path, caplog):
    from cloudmask.run.modes import dataset_if_present

    assert dataset_if_present(str(dataset)) == str(dataset)
    (tmp_path / "empty").mkdir()
    import logging

    with caplog.at_level(logging.WARNING, logger="cloudmask"):
        assert dataset_if_present(str(tmp_path / "empty")) is None
    assert "SYNTHETIC data" in caplog.text and str(tmp_path / "empty") in caplog.text


def test_build_sif_without_apptainer_is_a_clear_error(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    if shutil.which("apptainer", path=env["PATH"]) or shutil.which("singularity", path=env["PATH"]):
        pytest.skip("apptainer is installed here")
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_sif.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "neither apptainer nor singularity is installed" in done.stderr


def test_the_manifest_names_the_apptainer_image_the_user_ran(tmp_path):
    from cloudmask.telemetry.provenance import container_context

    labels = tmp_path / "labels.json"  # what `apptainer build` writes into /.singularity.d/
    labels.write_text('{"org.label-schema.usage.apptainer.version": "1.4.5"}')
    mounted = {"APPTAINER_CONTAINER": "/scratch/cloudmask.sif", "APPTAINER_NAME": "cloudmask.sif",
               "CLOUDMASK_IMAGE": "cloudmask-bench:0.1.0"}
    assert container_context(mounted, labels) == {
        "runtime": "apptainer", "image": "/scratch/cloudmask.sif", "image_label": "cloudmask-bench:0.1.0",
        "built_with": "apptainer 1.4.5"}
    # without squashfuse (or with --unsquash) the image is unpacked: the variable names the sandbox
    unpacked = container_context({"APPTAINER_CONTAINER": "/tmp/rootfs-3008493173/root",
                                  "APPTAINER_NAME": "cloudmask.sif"}, tmp_path / "no-labels.json")
    assert unpacked["image"] == "cloudmask.sif" and unpacked["unpacked_to"] == "/tmp/rootfs-3008493173/root"
    assert "built_with" not in unpacked
    sandbox_dir = container_context({"SINGULARITY_CONTAINER": "/images/cm", "SINGULARITY_NAME": "cm"}, labels)
    assert sandbox_dir["runtime"] == "singularity" and sandbox_dir["image"] == "/images/cm"
