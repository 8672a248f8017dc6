"""Report plots. Figures are built with matplotlib's object API (no pyplot, no global backend), so they render
headless anywhere; pass `path` to save a PNG."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


# axis labels that say what a metric is (the in-loop FID is not the paper's 50k-sample gFID)
LABELS = {"eval/fid": "FID (in-loop: samples vs val images)", "eval/is": "IS (in-loop samples)",
          "eval/ssim_skimage": "SSIM (skimage 7x7 uniform)", "eval/ssim": "SSIM (Gaussian 11x11)"}


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=9)


def plot_scaling(df: pd.DataFrame, metric: str, path: str | Path | None = None,
                 x: str = "derived.params") -> Figure:
    """`metric` against model parameters (log x), one line per factorization, points labelled by model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    have = df.dropna(subset=[c for c in (x, metric) if c in df]) if {x, metric} <= set(df.columns) else df.iloc[:0]
    for fac, g in have.groupby("factorization", observed=True, sort=True):
        g = g.sort_values(x)
        ax.plot(g[x], g[metric], marker="o", label=str(fac))
        for _, r in g.iterrows():
            ax.annotate(str(r["model"]), (r[x], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    gone = [f"{r['run_name']}: {r['missing'][metric]}" for _, r in df.iterrows()
            if isinstance(r.get("missing"), dict) and metric in r["missing"]]
    if gone:  # say which points are absent and why, rather than letting them vanish
        fig.text(0.01, -0.02, "missing: " + "; ".join(gone), fontsize=7, va="top", wrap=True)
    if have.empty:
        _note(ax, f"no values of {metric}")
    else:
        ax.set_xscale("log")
        ax.legend(title="factorization", fontsize=8)
    ax.set_xlabel("parameters" if x == "derived.params" else x)
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(f"{LABELS.get(metric, metric)} vs model size")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def plot_curves(hist: pd.DataFrame, key: str, path: str | Path | None = None) -> Figure:
    """History of one metric, one line per run (long frame from `load_history`)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    h = hist[hist["key"] == key]
    for (rid, name), g in h.groupby(["run_id", "run_name"], sort=False):
        # markers: a metric logged only at the end is one point, which a bare line would not draw at all
        ax.plot(g["step"], g["value"], label=str(name or rid[:8]), marker="o" if len(g) <= 50 else None,
                markersize=4)
    if h.empty:
        _note(ax, f"no history of {key}")
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(LABELS.get(key, key))
    ax.set_title(LABELS.get(key, key))
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def plot_utilization(hist: pd.DataFrame, path: str | Path | None = None, key: str = "eval/utilization") -> Figure:
    """Codebook utilization (fraction of codes used) over training, one line per run; collapse shows as a drop."""
    fig = plot_curves(hist, key)
    ax = fig.axes[0]
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("codebook utilization")
    ax.set_title("codebook utilization")
    return _finish(fig, path)
