"""Seeds: members that differ only in seed form one arm; an arm's metric is mean ± std with a 95% Student-t interval
over its n seeds (scipy.stats.t), and the report says when two arms' intervals overlap or an arm has n = 1."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from magvit2.metrics import registry

# not what an arm is: the seed, and what a sweep adds to every member's overrides
NOT_ARM = ("seed", "sweep.", "+sweep.", "paths.", "hydra.", "tracking.")
_CONSTANT = ("steps (schedule)", "status")  # besides the registry's seeds="constant" rows


def constant(column: str) -> bool:
    """A column that describes an arm rather than varies over its seeds (an N, the params, the schedule): shown as
    its value (a range if they differ)."""
    m = registry.by_label(column)
    return column in _CONSTANT or (m is not None and m.seeds == "constant")


def summed(column: str) -> bool:
    """A column whose arm value is the sum over its seeds (device-hours: the arm's cost)."""
    m = registry.by_label(column)
    return m is not None and m.seeds == "sum"


def arm_labels(df: pd.DataFrame) -> pd.Series:
    """Each run's arm from its overrides (tag magvit2.overrides): the key=value pairs that are not the same in every
    run, seed and sweep bookkeeping left out; "base" when nothing else varies."""
    def parse(text) -> dict:
        pairs = (o.split("=", 1) for o in str(text or "").split() if "=" in o)
        return {k.lstrip("+~"): v for k, v in pairs if not k.lstrip("+~").startswith(NOT_ARM)}
    ov = df["overrides"].map(parse) if "overrides" in df else pd.Series([{}] * len(df), index=df.index)
    keys = sorted({k for d in ov for k in d})
    vary = [k for k in keys if len({d.get(k) for d in ov}) > 1]
    return ov.map(lambda d: " ".join(f"{k}={d[k]}" for k in vary if k in d) or "base").rename("arm")


def t_quantile(n: pd.Series | np.ndarray) -> np.ndarray:
    """Two-sided 95% Student-t quantile for n samples (NaN for n < 2)."""
    n = np.asarray(n, dtype=float)
    return np.where(n >= 2, stats.t.ppf(0.975, np.maximum(n - 1, 1)), np.nan)


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """A members table (rows keyed by the arm's levels and maybe `seed`) -> one row per arm; columns
    (name, stat) with stat in mean, std, n, lo, hi (the 95% interval of the mean), plus ("n seeds", "n")."""
    levels = [n for n in table.index.names if n != "seed"]
    num = table.drop(columns=["seed"], errors="ignore").apply(pd.to_numeric, errors="coerce")
    num = num.loc[:, num.notna().any()]
    g = (num.groupby(level=levels, sort=False, observed=True) if levels
         else num.groupby(pd.Index(["all"] * len(num), name="arm")))  # rows differing only in seed: one arm
    agg = g.agg(["mean", "std", "count"])
    agg.columns = agg.columns.set_names(["column", "stat"]).set_levels(["mean", "std", "n"], level=1)
    for c in num.columns:
        half = t_quantile(agg[(c, "n")]) * agg[(c, "std")] / np.sqrt(agg[(c, "n")])
        agg[(c, "lo")], agg[(c, "hi")] = agg[(c, "mean")] - half, agg[(c, "mean")] + half
        if summed(c):
            agg[(c, "mean")] = g[c].sum(min_count=1)
        if constant(c):  # the range, as (min, max)
            agg[(c, "lo")], agg[(c, "hi")] = g[c].min(), g[c].max()
    agg[("n seeds", "n")] = g.size()
    agg = agg[[("n seeds", "n")] + [(c, s) for c in num.columns for s in ("mean", "std", "n", "lo", "hi")]]
    agg.attrs["missing"] = table.attrs.get("missing", {})
    return agg


def overlaps(agg: pd.DataFrame, column: str, lower_better: bool) -> list[str]:
    """Lines comparing the best arm (by mean) with every other arm on `column`: whether their 95% intervals overlap,
    or that an interval is missing because an arm has one seed."""
    if column not in agg.columns.get_level_values(0):
        return []
    s = agg[column].dropna(subset=["mean"])
    if len(s) < 2:
        return []
    best = s["mean"].idxmin() if lower_better else s["mean"].idxmax()
    name = lambda k: "/".join(map(str, k)) if isinstance(k, tuple) else str(k)  # noqa: E731
    out = []
    for k, r in s.drop(index=[best]).iterrows():
        b = s.loc[best]
        if min(b["n"], r["n"]) < 2:
            out.append(f"{column}: {name(best)} vs {name(k)}: n = 1 on one side, no interval: no claim either way.")
        elif b["lo"] <= r["hi"] and r["lo"] <= b["hi"]:
            out.append(f"{column}: {name(best)} [{b['lo']:.4g}, {b['hi']:.4g}] and {name(k)} [{r['lo']:.4g}, "
                       f"{r['hi']:.4g}] overlap (n = {b['n']:.0f}, {r['n']:.0f}): not distinguishable.")
        else:
            out.append(f"{column}: {name(best)} [{b['lo']:.4g}, {b['hi']:.4g}] and {name(k)} [{r['lo']:.4g}, "
                       f"{r['hi']:.4g}] do not overlap (n = {b['n']:.0f}, {r['n']:.0f}).")
    return out


def clear_best(agg: pd.DataFrame, column: str, lower_better: bool):
    """The arm whose interval lies wholly on the better side of every other arm's (n >= 2 everywhere), else None."""
    s = agg[column].dropna(subset=["mean"]) if column in agg.columns.get_level_values(0) else None
    if s is None or len(s) < 2 or (s["n"] < 2).any():
        return None
    best = s["mean"].idxmin() if lower_better else s["mean"].idxmax()
    rest = s.drop(index=[best])
    ok = (s.loc[best, "hi"] < rest["lo"]).all() if lower_better else (s.loc[best, "lo"] > rest["hi"]).all()
    return best if ok else None
