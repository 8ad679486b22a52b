"""The report's figures (matplotlib, Agg): per-epoch curves of every repeat, validation accuracy against time
and energy, time and energy per epoch per machine with error bars, GPU power traces."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from .. import fileio
from ..cli.tables import plural


def plot_all(report, out: Path) -> tuple[list[Path], str | None]:
    """The paper's figures for these runs: per-epoch curves of every repeat (Figures 3-8), time per epoch per
    machine and GPU with error bars (Figure 9), energy per epoch, and GPU power traces."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (`pip install cloudmask-bench[report]`)."
    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "svg.hashsalt": "cloudmask"})
    plots = []
    experiments = sorted({h["experiment"] for h in report.histories.values() if h.get("loss")})
    for exp in experiments:
        runs = {k: h for k, h in report.histories.items() if h.get("loss") and h["experiment"] == exp}
        plots.append(_plot_curves(plt, exp, runs, out / f"curves-{slug(exp)}.png"))
        plots.append(_plot_quality(plt, exp, runs, out / f"accuracy_vs_time_energy-{slug(exp)}.png"))
    groups = [s for s in report.summary if s["metric"] == "time_per_epoch_s"]
    if groups:
        plots.append(_plot_bars(plt, groups, "time per epoch (s)", "Time per epoch (mean ± std over repeats)",
                                out / "time_per_epoch.png"))
    energy = [s for s in report.summary if s["metric"] == "gpu_energy_per_epoch_j"]
    if energy:
        plots.append(_plot_bars(plt, energy, "GPU energy per epoch (J)",
                                "GPU energy per epoch (mean ± std over repeats)", out / "energy_per_epoch.png"))
    if report.power:
        plots.append(_plot_power(plt, report.power, out / "power_trace.png"))
    return plots, None


def slug(text: str) -> str:
    """A file-name-safe form of an experiment name."""
    return re.sub(r"[^A-Za-z0-9.=,+-]+", "_", text).strip("_") or "runs"


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def _plot_curves(plt, experiment: str, runs: dict[str, dict], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [("loss", "training loss"), ("val_loss", "validation loss"), ("accuracy", "training accuracy"),
              ("val_accuracy", "validation accuracy")]
    for ax, (key, label) in zip(axes.flat, panels):
        for name, h in runs.items():
            values = h.get(key) or []
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3,
                    label=f"seed {h['seed']}" + ("" if h["status"] == "success" else f" ({h['status']})"))
        ax.set_title(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.split()[-1])
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{experiment}: training and validation per epoch, {plural(len(runs), 'run')}")
    return _save(plt, fig, path)


def _plot_quality(plt, experiment: str, runs: dict[str, dict], path: Path) -> Path:
    """Validation accuracy against training time and against GPU energy, every run: the curve that compares two
    machines on time (and energy) to a quality target."""
    energy = any(h.get("energy_j") and None not in h["energy_j"] for h in runs.values())
    fig, axes = plt.subplots(1, 2 if energy else 1, figsize=(10 if energy else 5.5, 4), squeeze=False)
    panels = [("epoch_s", "training time (s)", 1.0)] + ([("energy_j", "GPU energy (kJ)", 1e-3)] if energy else [])
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for n, h in enumerate(runs.values()):
            steps = h.get(key) or []
            if not steps or None in steps:
                continue
            x = [scale * sum(steps[: i + 1]) for i in range(len(steps))]
            ax.plot(x, (h.get("val_accuracy") or [])[: len(x)], marker="o", markersize=3, color=f"C{n % 10}",
                    label=f"seed {h['seed']}")  # one colour per run in both panels
        for value in {h["target"] for h in runs.values() if h.get("target") is not None}:
            ax.axhline(value, color="gray", linestyle="--", linewidth=0.8, label=f"target {value:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{experiment}: validation accuracy against time" + (" and energy" if energy else ""))
    return _save(plt, fig, path)


def _plot_bars(plt, groups: list[dict], ylabel: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(groups) + 2), 4.5))
    labels = [f"{g['experiment']}\n{g['machine']}\n{g['gpu']}" for g in groups]
    ax.bar(range(len(groups)), [g["mean"] for g in groups], yerr=[g["std"] or 0 for g in groups], capsize=4,
           color="#4c72b0", width=0.6)
    ax.set_xlim(-0.8, len(groups) - 0.2)
    for i, g in enumerate(groups):
        ax.annotate(f"n={g['n']}", (i, g["mean"] + (g["std"] or 0)), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_xlabel("experiment / machine / GPU")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _plot_power(plt, traces: dict[str, Path], path: Path, limit: int = 8) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, csv_path in list(traces.items())[:limit]:
        series: dict[str, tuple[list, list]] = {}
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    t, w = float(row["time"]), float(row["power_w"])
                except (KeyError, TypeError, ValueError):
                    continue
                ts, ws = series.setdefault(row.get("gpu", "0"), ([], []))
                ts.append(t)
                ws.append(w)
        for gpu, (ts, ws) in sorted(series.items()):
            t0 = ts[0] if ts else 0
            ax.plot([t - t0 for t in ts], ws, linewidth=0.8, label=f"{name} GPU {gpu}")
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("GPU power (W)")
    ax.set_title("GPU power" + (f" (first {limit} runs)" if len(traces) > limit else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
