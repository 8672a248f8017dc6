"""One report section per ready experiment (experiments/experiment/NAME.yaml): which one a sweep ran (from its
members' overrides), its seed-aggregated table and its plot."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from magvit2.metrics import registry

from magvit2.results.plots import _finish
from magvit2.results.stats import aggregate
from magvit2.results.tables import ar_table, seeds_markdown, tokenizer_table

# what a run cost, where logged (their labels: magvit2.metrics.registry)
COST = [r.key for r in registry.ROWS if r.key.startswith("compute/") and r.table]
AR_KEYS = ["val/loss", "eval/fid", "eval/is"]
GEN = ["eval/fid", "eval/is", "eval/precision", "eval/recall"]  # precision / recall where the runs logged them
# experiment -> (stage of its members, its metric keys (N columns are kept with them), the key metrics compared)
EXPERIMENTS = {
    "lfq_vs_vq": ("tokenizer", ["eval/utilization", "eval/perplexity", "eval/n_tokens", "eval/psnr", "eval/ssim_skimage",
                                "eval/lpips", "eval/rfid", "eval/n_images"],
                  ["eval/utilization", "eval/psnr", "eval/rfid"]),
    "factorization": ("ar", ["val/loss", "val/loss_{k}", "val/n_images", *GEN, "eval/n_samples", "eval/n_real"],
                      AR_KEYS),
    "intra_vs_heads": ("ar", ["derived.params", "val/loss", "val/loss_{k}", "val/n_images", *GEN, "eval/n_samples"],
                       AR_KEYS),
    "scaling": ("ar", ["derived.params", "val/loss", "val/n_images", *GEN, "eval/n_samples"], AR_KEYS),
    "recipe": ("ar", ["val/loss", "val/n_images", *GEN, "eval/n_samples"], AR_KEYS),
    "cross_dataset": ("tokenizer", ["eval/psnr", "eval/ssim_skimage", "eval/lpips", "eval/rfid", "eval/n_images",
                                    "eval/utilization", "eval/n_tokens"], ["eval/psnr", "eval/rfid"]),
}


def detect(df: pd.DataFrame) -> str | None:
    """The experiment of a sweep: `+experiment=NAME` in its members' overrides (one name), else None."""
    found = {m.group(1) for o in df.get("overrides", pd.Series(dtype=object)).dropna()
             for m in [re.search(r"\+?experiment=(\w+)", str(o))] if m}
    return found.pop() if len(found) == 1 else None


def _columns(table: pd.DataFrame, wanted: list[str]) -> list[str]:
    """The table's columns of the `wanted` keys (a "{k}" key: every sub-token's), then the cost columns logged."""
    keys = {c: registry.by_label(c).key for c in table.columns if registry.by_label(c)}
    cols = []
    for w in wanted + COST:
        pattern = re.compile(re.escape(w).replace(re.escape("{k}"), r"\d+") + "$")
        cols += [c for c, k in keys.items() if pattern.match(k) and c not in cols]
    return ["status", "steps (schedule)"] + cols


def table(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The experiment's members table (every run, keyed by its arm and seed) restricted to its columns."""
    stage, wanted, _ = EXPERIMENTS[name]
    t = (tokenizer_table if stage == "tokenizer" else ar_table)(df)
    out = t[[c for c in _columns(t, wanted) if c in t]]
    out.attrs = t.attrs
    return out


def plot_arms(agg: pd.DataFrame, metric: str, x: str | None = None, path: str | Path | None = None) -> Figure | None:
    """`metric` per arm: mean with its 95% interval as an error bar (a point alone where n = 1). x: another
    aggregated column for the x axis (e.g. training compute), else the arms in table order."""
    if metric not in agg.columns.get_level_values(0):
        return None
    s = agg[metric].dropna(subset=["mean"])
    if s.empty:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    err = [(s["mean"] - s["lo"]).fillna(0), (s["hi"] - s["mean"]).fillna(0)]
    names = ["/".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in s.index]
    xs = agg.loc[s.index, (x, "mean")] if x else range(len(s))
    ax.errorbar(xs, s["mean"], yerr=err, fmt="o", capsize=4)
    if x:
        for xi, yi, n in zip(xs, s["mean"], names):
            ax.annotate(n, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(x)
    else:
        ax.set_xticks(range(len(s)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (mean, 95% interval)")
    ax.set_title(f"{metric}: n = {', '.join(f'{n:.0f}' for n in s['n'])} seeds")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def evaluations(df: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """cross_dataset: the `python -m magvit2.evaluate tokenizer` runs (load_runs(experiment="magvit2-evaluate")) of
    this sweep's tokenizers, as load_runs rows keyed by folder (its name), resolution and the tokenizer's seed."""
    seeds = dict(zip(df["signature"], df.get("seed", pd.Series(0, index=df.index))))
    if evals.empty or "source" not in evals:
        return evals.iloc[:0]
    sig = evals["source"].astype(str).map(lambda s: next((k for k in seeds if k and k in s), None))
    ev = evals[sig.notna()].copy()
    ev["seed"] = sig[sig.notna()].map(seeds)
    ev["overrides"] = ("folder=" + ev["data"].astype(str).map(lambda d: Path(d).name) + " resolution="
                       + ev["resolution"].astype(str) + " seed=" + ev["seed"].astype(str))
    return ev.drop(columns=[c for c in ev if c.startswith("choice.")])


def section(df: pd.DataFrame, name: str, out: Path, evals: pd.DataFrame | None = None) -> tuple[str, list[Path]]:
    """Markdown (members table, seed aggregate, overlap notes) and the PNGs of experiment `name`; cross_dataset
    reads the evaluations `evals` of its tokenizers instead of their training runs."""
    from magvit2.results.tables import to_markdown
    stage, _, keys = EXPERIMENTS[name]
    sub = df[df["stage"] == stage]
    if name == "cross_dataset":
        sub = evaluations(sub, evals if evals is not None else pd.DataFrame())
    if sub.empty:
        return f"### Experiment {name}\n\nNo {stage} runs{' evaluated' if evals is not None else ''} here.\n", []
    members = table(sub, name)
    agg = aggregate(members)
    pngs = []
    if name == "scaling" and ("model GFLOP/step", "mean") in agg:
        agg[("train GFLOP", "mean")] = agg[("model GFLOP/step", "mean")] * agg[("steps (schedule)", "lo")]
    for metric in (registry.label(k) for k in keys):
        p = out / f"{name}_{re.sub(r'[^a-z0-9]+', '_', metric.lower()).strip('_')}.png"
        if plot_arms(agg, metric, path=p) is not None:
            pngs.append(p)
        if name == "scaling" and ("train GFLOP", "mean") in agg:
            pc = p.with_name(p.stem + "_vs_compute.png")
            if plot_arms(agg, metric, x="train GFLOP", path=pc) is not None:
                pngs.append(pc)
    shown = agg.drop(columns=["train GFLOP"], level=0, errors="ignore")
    md = (f"### Experiment {name}\n\nEvery member (seed-aggregated below):\n\n{to_markdown(members)}\n"
          f"By arm, over seeds:\n\n{seeds_markdown(shown, [registry.label(k) for k in keys])}")
    return md, pngs
