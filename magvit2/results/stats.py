"""Seeds: members that differ only in seed form one arm; an arm's metric is mean ± std with a 95% Student-t interval
over its n seeds (scipy.stats.t), and the report says when two arms' intervals overlap or an arm has n = 1."""

from __future__ import annotations

import warnings

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


def descriptive(column: str) -> bool:
    """A cost or throughput column (registry kind "description"): a description of the runs, not a claim, so shown
    as mean ± std without an interval (a t-interval at n = 2 goes negative for quantities that cannot)."""
    m = registry.by_label(column)
    return m is not None and m.kind == registry.DESCRIPTION


def compare(best: dict, other: dict) -> str:
    """The verdict on two arms' values of one metric, {seed: value} each, as the report and the sweep's CLI both
    say it: a paired t-test over the seeds they share (3 or more), else Welch's t-test; n = 1 on a side: no claim."""
    a, b = list(best.values()), list(other.values())
    if min(len(a), len(b)) < 2:
        return f"n = {len(a)} vs {len(b)}: no claim either way (run seed=0,1,2)"
    shared = sorted(set(best) & set(other), key=str)
    with warnings.catch_warnings():  # scipy warns on near-identical values; the p-value says what it can
        warnings.simplefilter("ignore", RuntimeWarning)
        p, how = _test(best, other, shared, a, b)
    if not np.isfinite(p):  # identical values on both sides
        return f"no difference ({how})"
    return f"{'distinguishable' if p < 0.05 else 'not distinguishable'} at 5% ({how}: p = {p:.2g})"


def _test(best: dict, other: dict, shared: list, a: list, b: list) -> tuple[float, str]:
    if len(shared) >= 3:
        p, how = stats.ttest_rel([best[s] for s in shared], [other[s] for s in shared]).pvalue, \
            f"paired t-test over {len(shared)} shared seeds"
    else:
        p, how = stats.ttest_ind(a, b, equal_var=False).pvalue, f"Welch t-test, n = {len(a)} vs {len(b)}"
    return float(p), how


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
        if descriptive(c):
            half = half * np.nan
        agg[(c, "lo")], agg[(c, "hi")] = agg[(c, "mean")] - half, agg[(c, "mean")] + half
        if summed(c):
            agg[(c, "mean")] = g[c].sum(min_count=1)
        if constant(c):  # the range, as (min, max)
            agg[(c, "lo")], agg[(c, "hi")] = g[c].min(), g[c].max()
    agg[("n seeds", "n")] = g.size()
    agg = agg[[("n seeds", "n")] + [(c, s) for c in num.columns for s in ("mean", "std", "n", "lo", "hi")]]
    agg.attrs["missing"] = table.attrs.get("missing", {})
    in_index = "seed" in table.index.names
    seed_of = table.index.get_level_values("seed") if in_index else \
        table["seed"].to_numpy() if "seed" in table else range(len(table))
    arm_of = (table.index.droplevel("seed") if in_index else table.index) if levels else ["all"] * len(table)
    values: dict = {}  # (arm, column) -> {seed: value}: what compare() tests
    for c in num.columns:
        for arm, seed, v in zip(arm_of, seed_of, num[c]):
            if pd.notna(v):
                values.setdefault((arm, c), {})[seed] = float(v)
    agg.attrs["values"] = values
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
        values = agg.attrs.get("values", {})
        verdict = compare(values.get((best, column), {}), values.get((k, column), {}))
        if min(b["n"], r["n"]) < 2:
            out.append(f"{column}: {name(best)} vs {name(k)}: n = 1 on one side, no interval: no claim either way.")
        else:
            iv = lambda x: interval_text(x["mean"], x["lo"], x["hi"])  # noqa: E731
            touch = "overlap" if b["lo"] <= r["hi"] and r["lo"] <= b["hi"] else "do not overlap"
            out.append(f"{column}: {name(best)} {iv(b)} and {name(k)} {iv(r)} {touch}; {verdict}.")
    return out


def decimals(half: float) -> int | None:
    """Decimal places the interval supports: two significant digits of its half-width (None: no interval)."""
    if not np.isfinite(half) or half <= 0:
        return None
    return max(0, 1 - int(np.floor(np.log10(half))))


def interval_text(mean: float, lo: float, hi: float) -> str:
    """'[lo, hi]' at the precision the interval supports."""
    d = decimals((hi - lo) / 2)
    return f"[{lo:.4g}, {hi:.4g}]" if d is None else f"[{lo:.{d}f}, {hi:.{d}f}]"


def clear_best(agg: pd.DataFrame, column: str, lower_better: bool):
    """The arm whose interval lies wholly on the better side of every other arm's (n >= 2 everywhere), else None."""
    s = agg[column].dropna(subset=["mean"]) if column in agg.columns.get_level_values(0) else None
    if s is None or len(s) < 2 or (s["n"] < 2).any():
        return None
    best = s["mean"].idxmin() if lower_better else s["mean"].idxmax()
    rest = s.drop(index=[best])
    ok = (s.loc[best, "hi"] < rest["lo"]).all() if lower_better else (s.loc[best, "lo"] > rest["hi"]).all()
    return best if ok else None
