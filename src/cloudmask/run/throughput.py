"""``cloudmask bench --mode throughput``: steady-state speed of the input pipeline, training and inference.

Warm-up steps (graph tracing, XLA compilation, first reads) are run first and excluded. Throughput is samples
divided by the total time of the timed steps (not a mean of per-step rates, which over-weights fast steps).
Training FLOPs per patch are 3 x the forward FLOPs counted from the model's convolutions (backward ~ 2 x
forward); utilisation is achieved FLOP/s over the device's dense peak for the precision used, when the device
is in the table below.
"""

from __future__ import annotations

import logging
import resource
import socket
import time

from ..cli.tables import text_table
from ..dataset.preprocess import Geometry
from ..training import runtime

log = logging.getLogger(__name__)

# Dense peak FLOP/s from NVIDIA's datasheets: (fp32 without tensor cores or TF32, bf16/fp16 tensor cores).
PEAK_FLOPS = {
    "H100 80GB HBM3": (67e12, 989.4e12),       # SXM
    "H100 PCIe": (51e12, 756.5e12),
    "H100 NVL": (60e12, 835.5e12),
    "H200": (67e12, 989.4e12),
    "A100-SXM4-80GB": (19.5e12, 312e12),
    "A100-SXM4-40GB": (19.5e12, 312e12),
    "A100-PCIE-40GB": (19.5e12, 312e12),
    "A100 80GB PCIe": (19.5e12, 312e12),
    "V100-SXM2-16GB": (15.7e12, 125e12),
    "V100-SXM2-32GB": (15.7e12, 125e12),
}


def device_peak(name: str, precision: str) -> float | None:
    for key, (fp32, half) in PEAK_FLOPS.items():
        if key.lower() in name.lower():
            return fp32 if precision == "fp32" else half
    return None


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from a parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_loader(stream, warmup: int, steps: int) -> tuple[float, int]:
    """(seconds, patches) of ``steps`` batches of the input pipeline alone, after ``warmup`` untimed ones."""
    it = iter(stream)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    samples = 0
    for _ in range(steps):
        x, _y = next(it)
        samples += len(x)
    return time.perf_counter() - t0, samples


def measure(session, warmup: int = 3, steps: int = 20, test_images: int = 4) -> dict:
    """Loader, training and inference throughput of a throughput session (session.py) after its init phase.

    With several workers each one first trains alone on its rows of every batch (no communication), then all
    train together; the weak-scaling efficiency is the joint rate over the sum of the rates alone. Loader and
    inference are each worker's own; the chief's are reported, every worker's in ``workers``."""
    cfg, td, cluster = session.cfg, session.inputs, session.cluster
    steps = min(steps, td.train_stream.steps * 10)
    loader_s, loader_n = time_loader(td.train_stream, warmup, steps)
    alone_s = session.time_training(warmup, steps, together=False)  # this worker's share when workers > 1
    images = session.test_images.first(max(1, test_images))
    session.score(images.first(1))  # warm-up: the predict function is traced here
    infer_s = session.score(images.in_memory())["inference_s"]
    train_s = alone_s
    workers = cluster.workers if cluster is not None else 1
    if workers > 1:
        session.load_model()  # mirrored over every worker
        train_s = session.time_training(warmup, steps)
    rates = _rates(cfg, session, steps * session.step_batch, train_s, len(images.files), infer_s)
    scaling = None
    if workers > 1:
        share = steps * session.step_batch // workers
        mine = {"rank": cluster.rank, "host": socket.gethostname(), "devices": session.devices or ["CPU"],
                "alone_patches_per_s": share / alone_s, "joint_patches_per_s": share / train_s,
                "loader_patches_per_s": loader_n / loader_s,
                "inference_images_per_s": len(images.files) / infer_s}
        rows = cluster.exchange(mine)
        alone_total = sum(r["alone_patches_per_s"] for r in rows)
        scaling = {"workers": workers, "replicas": cluster.replicas,
                   "per_worker_batch": cfg.train.batch_size // workers, "per_worker": rows,
                   "alone_total_patches_per_s": alone_total,
                   "weak_scaling_efficiency": rates["train_patches_per_s"] / alone_total}
        rates.update(device_peak_tflops=None, utilisation=None)  # the devices of one worker, not of the cluster
    return {"mode": "throughput", "workers": scaling, "backend": runtime.backend(),
            "devices": session.devices or ["CPU"], "precision": cfg.train.precision,
            "jit_compile": cfg.train.jit_compile, "batch_size": cfg.train.batch_size,
            "micro_batch_size": session.step_batch, "input": td.source,
            "warmup_steps": warmup, "timed_steps": steps, "loader_patches_per_s": loader_n / loader_s, **rates,
            "peak_rss_gib": peak_rss_gib()}


def _rates(cfg, session, train_n: int, train_s: float, n_img: int, infer_s: float) -> dict:
    """Training and inference rates, FLOPs and the share of the device's peak."""
    g = Geometry.from_config(cfg)
    fwd = session.forward_flops()
    train_rate = train_n / train_s
    devices = session.devices
    peak = device_peak(devices[0], cfg.train.precision) if devices else None
    peak = peak * len(devices) if peak else None
    achieved = train_rate * 3 * fwd
    return {"train_patches_per_s": train_rate,
            "train_epoch_s_full_dataset": 15_520 / train_rate,
            "inference_images_per_s": n_img / infer_s,
            "inference_patches_per_s": n_img * g.patches_per_test_image / infer_s,
            "time_per_inference_s": infer_s / n_img,
            "test_set_100_images_s": 100 * infer_s / n_img,
            "forward_gflop_per_patch": fwd / 1e9,
            "train_gflop_per_patch": 3 * fwd / 1e9,
            "achieved_tflops": achieved / 1e12,
            "device_peak_tflops": peak / 1e12 if peak else None,
            "utilisation": achieved / peak if peak else None}


def table(r: dict) -> str:
    def fmt(v, unit=""):
        return "-" if v is None else f"{v:,.2f}{unit}" if isinstance(v, float) else str(v)

    rows = [["devices", ", ".join(r["devices"])], ["backend / precision", f"{r['backend']} / {r['precision']}"],
            ["input", r["input"]], ["batch (micro-batch)", f"{r['batch_size']} ({r['micro_batch_size']})"],
            ["loader", fmt(r["loader_patches_per_s"], " patches/s")],
            ["training", fmt(r["train_patches_per_s"], " patches/s")],
            ["epoch of 15,520 patches", fmt(r["train_epoch_s_full_dataset"], " s")],
            ["inference", f"{fmt(r['inference_patches_per_s'], ' patches/s')} "
                          f"({fmt(r['time_per_inference_s'], ' s')} per image)"],
            ["100 test images", fmt(r["test_set_100_images_s"], " s")],
            ["GFLOP per patch (fwd / train)", f"{r['forward_gflop_per_patch']:.2f} / {r['train_gflop_per_patch']:.2f}"],
            ["achieved", fmt(r["achieved_tflops"], " TFLOP/s")],
            ["utilisation of peak", "-" if r["utilisation"] is None else f"{100 * r['utilisation']:.1f} %"],
            ["peak RSS", fmt(r["peak_rss_gib"], " GiB")]]
    w = r.get("workers")
    if w:
        rows[5:6] = [["training, all workers", fmt(r["train_patches_per_s"], " patches/s")],
                     *[[f"  worker {x['rank']} ({x['host']})", f"{fmt(x['joint_patches_per_s'], ' patches/s')} "
                        f"(alone {fmt(x['alone_patches_per_s'])})"] for x in w["per_worker"]],
                     ["weak-scaling efficiency", f"{100 * w['weak_scaling_efficiency']:.1f} % of "
                                                 f"{fmt(w['alone_total_patches_per_s'])} alone"]]
    return text_table([f"throughput ({r['warmup_steps']} warm-up + {r['timed_steps']} timed steps)", ""], rows)
