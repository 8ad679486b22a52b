import csv
import json
import threading
import time

import pytest
from fake_nvml import FakeGpu, FakeNvml, ramp, two_gpus

from cloudmask.telemetry import energy_sources
from cloudmask.telemetry.energy import EnergyMeter
from cloudmask.telemetry.energy_sources import NvmlGpus, RaplPackages
from cloudmask.telemetry.timers import Timers


def _meter(nvml, environ=None, interval=0.02, power_csv=None, powercap=None, tmp=None):
    sources = [NvmlGpus(environ or {}, nvml), RaplPackages(powercap or (tmp / "no-powercap"))]
    return EnergyMeter(sources, interval, power_csv)


# ------------------------------------------------------------------------------------------------- timers


def test_timers_nest_and_have_unique_names():
    t = Timers()
    run = t.start("run")
    train = t.start("train")
    for _ in range(2):
        epoch = t.start("epoch")
        time.sleep(0.01)
        t.stop(epoch)
    t.stop(train)
    t.stop(t.start("inference"))
    t.stop(run)
    names = [r.name for r in t.records]
    assert names == ["run", "run/train", "run/train/epoch", "run/train/epoch#2", "run/inference"]
    assert [r.depth for r in t.records] == [0, 1, 2, 2, 1]
    assert t.seconds("run/train") >= t.seconds("run/train/epoch") + t.seconds("run/train/epoch#2")
    assert t.seconds("run") >= t.seconds("run/train")
    lines = t.csv_lines()
    assert lines[0] == "# csv,timer,attempt,name,depth,start_s,seconds"
    assert lines[3].startswith("# csv,timer,1,run/train/epoch,2,")
    table = t.table()
    assert "epoch" in table and "% of run" in table and " 100.0 " in table


def test_stopping_an_outer_phase_closes_inner_ones_and_csv_keeps_earlier_attempts(tmp_path):
    t = Timers(attempt=1)
    outer = t.start("run")
    t.start("train")
    t.stop(outer)
    assert all(r.seconds is not None for r in t.records)
    path = tmp_path / "timers.csv"
    t.write_csv(path)
    again = Timers(attempt=2)
    again.stop(again.start("run"))
    again.write_csv(path)
    rows = list(csv.DictReader(open(path)))
    assert [(r["attempt"], r["name"]) for r in rows] == [("1", "run"), ("1", "run/train"), ("2", "run")]


# --------------------------------------------------------------------------------------------- GPU energy


def test_counter_energy_of_known_curves(tmp_path):
    nvml = two_gpus(counter=True)
    meter = _meter(nvml, tmp=tmp_path).start()
    gpus = meter.source("gpu")
    assert gpus.method == "counter" and len(gpus.handles) == 2
    with meter.window("work"):
        time.sleep(0.5)
    meter.stop()
    w = meter.windows[-1]
    # counters have 1 mJ resolution; the window's own length is the truth
    assert w.joules["gpu"][0] == pytest.approx(250 * w.seconds, rel=0.01)
    assert w.joules["gpu"][1] == pytest.approx(100 * w.seconds, rel=0.01)


def test_sampled_energy_integrates_a_ramp(tmp_path):
    t0 = time.perf_counter()
    p, e = ramp(100.0, 400.0, t0)  # 100 W rising by 400 W/s
    nvml = FakeNvml([FakeGpu("Tesla P100", "GPU-p100", p, None)])
    meter = _meter(nvml, interval=0.01, tmp=tmp_path).start()
    assert meter.source("gpu").method == "sampled"
    meter.begin("ramp")
    start = time.perf_counter()
    time.sleep(0.6)
    end = time.perf_counter()
    w = meter.end("ramp")
    meter.stop()
    truth = e(end) - e(start)
    assert w.joules["gpu"][0] == pytest.approx(truth, rel=0.05)


def test_sampling_interval_is_honoured_and_written_to_power_csv(tmp_path):
    nvml = two_gpus(counter=False)
    power_csv = tmp_path / "power.csv"
    meter = _meter(nvml, interval=0.05, power_csv=power_csv, tmp=tmp_path).start()
    time.sleep(1.0)
    meter.stop()
    rows = list(csv.DictReader(open(power_csv)))
    assert set(rows[0]) == {"time", "gpu", "power_w", "utilization_pct", "memory_used_mib", "temperature_c",
                            "sm_clock_mhz"}
    gpu0 = [float(r["time"]) for r in rows if r["gpu"] == "0"]
    gaps = sorted(b - a for a, b in zip(gpu0, gpu0[1:]))
    median = gaps[len(gaps) // 2]
    assert 0.04 <= median <= 0.06  # +-20 % of 50 ms
    assert 16 <= len(gpu0) <= 24   # 1 s / 50 ms, +-20 %
    assert {float(r["power_w"]) for r in rows if r["gpu"] == "1"} == {100.0}


def test_the_sampler_thread_stops(tmp_path):
    meter = _meter(two_gpus(), interval=0.01, tmp=tmp_path).start()
    assert [t for t in threading.enumerate() if t.name == "cloudmask-energy"]
    time.sleep(0.05)
    meter.stop()
    assert not [t for t in threading.enumerate() if t.name == "cloudmask-energy"]
    assert meter.source("gpu")._nvml is None  # NVML shut down
    count = meter.samples_taken
    time.sleep(0.05)
    assert meter.samples_taken == count


def test_missing_nvml_degrades_cleanly(tmp_path):
    nvml = FakeNvml([], library=False)
    meter = _meter(nvml, tmp=tmp_path).start()
    with meter.window("work"):
        pass
    meter.stop()
    summary = meter.summary()
    assert summary["gpu"]["method"] == "none" and "NVML Shared Library Not Found" in summary["gpu"]["reason"]
    assert summary["gpu"]["devices"] == [] and not [t for t in threading.enumerate() if t.name == "cloudmask-energy"]


def test_real_pynvml_without_a_driver_degrades_cleanly(tmp_path):
    gpus = NvmlGpus({})  # the installed nvidia-ml-py; CI machines have no libnvidia-ml
    gpus.start()
    assert gpus.method == "none" and gpus.reason


@pytest.mark.parametrize("environ, expected", [
    ({"CUDA_VISIBLE_DEVICES": "1"}, ["GPU-bbbb"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa"}, ["GPU-bbbb", "GPU-aaaa"]),
    ({"SLURM_JOB_GPUS": "0"}, ["GPU-aaaa"]),
    ({"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "1"}, ["GPU-aaaa"]),  # the process's own view wins
    ({}, ["GPU-aaaa", "GPU-bbbb"]),
])
def test_only_the_jobs_gpus_are_measured(environ, expected):
    gpus = NvmlGpus(environ, two_gpus())
    gpus.start()
    assert [i["uuid"] for i in gpus.info] == expected
    gpus.stop()


def test_no_visible_gpu(tmp_path):
    gpus = NvmlGpus({"CUDA_VISIBLE_DEVICES": "-1"}, two_gpus())
    gpus.start()
    assert gpus.method == "none" and "no GPU visible" in gpus.reason


def test_idle_baseline_and_energy_above_idle(tmp_path):
    t_switch = time.perf_counter() + 0.4
    power = lambda t: 60.0 if t < t_switch else 300.0  # noqa: E731
    energy = lambda t: 60.0 * min(t, t_switch) + 300.0 * max(t - t_switch, 0.0)  # noqa: E731
    meter = _meter(FakeNvml([FakeGpu("A100", "GPU-a100", power, energy)]), tmp=tmp_path).start()
    meter.measure_idle(0.3)
    assert meter.idle_w["gpu"][0] == pytest.approx(60.0, rel=0.02)
    time.sleep(max(t_switch - time.perf_counter(), 0) + 0.01)
    meter.begin("run")
    time.sleep(0.3)
    meter.end("run")
    meter.stop()
    dev = meter.summary()["gpu"]["devices"][0]
    run = next(w for w in meter.windows if w.name == "run")
    assert dev["idle_w"] == pytest.approx(60.0, rel=0.02)
    assert dev["total_j"] == pytest.approx(300 * run.seconds, rel=0.02)
    assert dev["above_idle_j"] == pytest.approx(240 * run.seconds, rel=0.03)


# --------------------------------------------------------------------------------------------- CPU (RAPL)


def _powercap(root, zones):
    for name, (energy, top) in zones.items():
        z = root / name
        z.mkdir(parents=True)
        (z / "energy_uj").write_text(f"{energy}\n")
        (z / "max_energy_range_uj").write_text(f"{top}\n")
        (z / "name").write_text(f"package-{name.split(':')[1]}\n" if name.count(":") == 1 else "core\n")


def test_rapl_packages_with_wraparound(tmp_path):
    root = tmp_path / "powercap"
    _powercap(root, {"intel-rapl:0": (999_000_000, 1_000_000_000), "intel-rapl:1": (5_000_000, 1_000_000_000),
                     "intel-rapl:0:0": (1, 1_000_000_000)})
    rapl = RaplPackages(root)
    rapl.start()
    assert rapl.method == "rapl" and rapl.labels == ["package-0", "package-1"]  # the core subzone is ignored
    (root / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # wrapped: +1 J to the top, +3 J after
    (root / "intel-rapl:1" / "energy_uj").write_text("7500000\n")
    assert rapl.joules() == pytest.approx([4.0, 2.5])


def test_rapl_absent_or_unreadable(tmp_path):
    rapl = RaplPackages(tmp_path / "none")
    rapl.start()
    assert rapl.method == "none" and "no RAPL" in rapl.reason
    root = tmp_path / "powercap"
    (root / "intel-rapl:0" / "energy_uj").mkdir(parents=True)  # unreadable as a file, even for root
    (root / "intel-rapl:0" / "max_energy_range_uj").write_text("1\n")
    rapl = RaplPackages(root)
    rapl.start()
    assert rapl.method == "none" and "cannot read" in rapl.reason


# --------------------------------------------------------------------------------------- whole runs


@pytest.mark.slow  # a whole run (also in the JAX lane); the meter's sampling, integration, idle baseline and
# power.csv run by default in the tests above
def test_a_run_with_a_fake_gpu_records_energy_everywhere(dataset, tmp_path, monkeypatch):
    from conftest import TINY, run_cli

    from cloudmask.config import load_config
    from cloudmask.run import modes

    fake = two_gpus(counter=True)
    monkeypatch.setattr(energy_sources, "_load_nvml", lambda: fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "run"
    cfg = load_config(overrides=[*TINY, f"data.root={dataset}", "telemetry.idle_seconds=0.2",
                                 "telemetry.interval_s=0.05"])
    results = modes.run(cfg, out)
    gpu = results["energy"]["gpu"]
    assert gpu["method"] == "counter" and len(gpu["devices"]) == 2
    d0, d1 = gpu["devices"]
    assert d0["idle_w"] == pytest.approx(250, rel=0.02) and d1["idle_w"] == pytest.approx(100, rel=0.02)
    assert d0["total_j"] == pytest.approx(2.5 * d1["total_j"], rel=0.02)
    assert len(d0["per_epoch_j"]) == 2 and len(d0["validation_j"]) == 2 and d0["inference_j"] > 0
    epochs = [float(r["energy_j"]) for r in csv.DictReader(open(out / "history.csv"))]
    assert epochs == pytest.approx(gpu["per_epoch_j"]) and all(e > 0 for e in epochs)
    for e, s in zip(epochs, results["timing"]["epoch_s"]):
        assert e == pytest.approx(350 * s, rel=0.05)  # 250 W + 100 W over the epoch
    assert (out / "power.csv").is_file() and len((out / "power.csv").read_text().splitlines()) > 10
    events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in open(out / "mlperf.log")]
    energy_events = [e for e in events if e["key"] == "cloudmask_gpu_energy_j"]
    assert [e["metadata"]["epoch_num"] for e in energy_events] == [1, 2]
    assert run_cli("check-log", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["uuid"] for g in manifest["gpus"]["devices"]] == ["GPU-aaaa", "GPU-bbbb"]
    assert manifest["gpus"]["driver"] == "550.54.15"
    assert fake.initialised == 0  # every nvmlInit was matched by a shutdown
