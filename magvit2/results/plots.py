"""Report plots. Figures are built with matplotlib's object API (no pyplot, no global backend), so they render
headless anywhere; pass `path` to save a PNG."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from magvit2.metrics import registry


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


# One colour per factorization (and quantizer) in every plot of a report; other arms take the colours after them.
FIXED = ("none", "k6_12", "k9_9", "k12_6", "k6_6_6", "k3_6_9", "k2_4_6_6", "lfq", "vq", "vq_plain")
_OTHER = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#843c39", "#7b4173")
_DASHES = ("-", "--", ":", "-.")


def styles(names: list[str]) -> list[dict]:
    """Line style per series, in order ('k6_12-B', 'vq_plain-tiny'): the colour of its factorization or quantizer
    (the first FIXED part of its name; tab10 in FIXED order), the dashes tell apart the series of one colour."""
    keys = [next((p for p in re.split(r"[-/\s]", str(n)) if p in FIXED), str(n)) for n in names]
    others = sorted({k for k in keys if k not in FIXED})
    out, count = [], {}
    for k in keys:
        color = f"C{FIXED.index(k)}" if k in FIXED else _OTHER[others.index(k) % len(_OTHER)]
        out.append({"color": color, "linestyle": _DASHES[count.get(k, 0) % len(_DASHES)]})
        count[k] = count.get(k, 0) + 1
    return out


def _series(run_name, model) -> str:
    """A run's line in a scaling plot: its member name without the model size ('k6_12-B' -> 'k6_12'), so the sizes
    of one setting form one line and members differing in anything else (n_intra, seed) get lines of their own."""
    parts = [p for p in str(run_name).split("-") if p != str(model)]
    return "-".join(parts) or str(run_name)


def plot_scaling(df: pd.DataFrame, metric: str, path: str | Path | None = None) -> Figure | None:
    """`metric` against the model size, by name in size order (tiny < B < L < XL: the parameter count would put
    two tiny models far apart, it includes the 2^K-way output head), one line per member setting. None (and no
    file) when no run logged the metric: say so in the text instead (`missing_note`)."""
    have = df.dropna(subset=[metric]) if metric in df else df.iloc[:0]
    have = have[have["model"].notna()] if "model" in have else have.iloc[:0]
    if have.empty:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    sizes = [m for m in df["model"].cat.categories if m in set(have["model"])]
    groups = list(have.groupby(have.apply(lambda r: _series(r["run_name"], r["model"]), axis=1), sort=True))
    style = styles([name for name, _ in groups])
    for j, (name, g) in enumerate(groups):
        # lines of the same size sit side by side around its tick, not on top of each other
        dx = (j - (len(groups) - 1) / 2) * min(0.08, 0.4 / max(len(groups), 1))
        g = g.sort_values("model")
        ax.plot([sizes.index(m) + dx for m in g["model"]], g[metric], marker="o", label=name, **style[j])
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    gone = [f"{r['run_name']}: {r['missing'][metric]}" for _, r in df.iterrows()
            if isinstance(r.get("missing"), dict) and metric in r["missing"]]
    if gone:  # say which points are absent and why, rather than letting them vanish
        fig.text(0.01, -0.02, "missing: " + "; ".join(gone), fontsize=7, va="top", wrap=True)
    ax.legend(fontsize=8)
    ax.set_xlabel("model size")
    ax.set_ylabel(registry.label(metric))
    ax.set_title(f"{registry.label(metric)} vs model size")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def missing_note(df: pd.DataFrame, key: str) -> str:
    """The report's line for a metric no run logged (no plot is drawn for it), with the reasons the runs gave."""
    why = sorted({r["missing"][key] for _, r in df.iterrows()
                  if isinstance(r.get("missing"), dict) and key in r["missing"]})
    return f"{registry.label(key)}: no run logged it" + (f" ({'; '.join(why)})" if why else "") + ", so no plot."


def plot_curves(hist: pd.DataFrame, key: str, path: str | Path | None = None) -> Figure | None:
    """History of one metric, one line per run (long frame from `load_history`), shown as the registry shows it
    (label, percent). None (and no file) when no run logged it: say so in the text instead (`missing_note`)."""
    h = hist[hist["key"] == key]
    if h.empty:
        return None
    m = registry.get(key)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    runs = list(h.groupby(["run_id", "run_name"], sort=False))
    names = [str(name or rid[:8]) for (rid, name), _ in runs]
    for (_, g), name, style in zip(runs, names, styles(names)):
        # markers: a metric logged only at the end is one point, which a bare line would not draw at all
        ax.plot(g["step"], g["value"] * (m.scale if m else 1), label=name, marker="o" if len(g) <= 50 else None,
                markersize=4, **style)
    ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(registry.label(key))
    ax.set_title(registry.label(key))  # the metric's, never a run's name
    if m is not None and m.percent:  # the data's own range: 0.05% on a fixed 0-100 axis sits on the x-axis
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def plot_utilization(hist: pd.DataFrame, path: str | Path | None = None,
                     key: str = "eval/utilization") -> Figure | None:
    """Codebook utilization (% of codes used) over training, one line per run; collapse shows as a drop. None when
    no run logged it."""
    return plot_curves(hist, key, path)
