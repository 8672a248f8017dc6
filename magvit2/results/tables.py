"""Ablation tables from `load_runs` frames, and a Markdown renderer that shows missing values as missing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from magvit2.metrics import registry
from magvit2.results import stats
from magvit2.results.stats import arm_labels

# The columns, their labels, scaling and better direction: magvit2.metrics.registry (its `table` field). Each metric
# comes with its N ("N img", "N tokens", "N samples" / "N val img": the in-loop FID is not the paper's 50k gFID).
MISSING = "—"


def _stage(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    return df[df["stage"] == stage] if "stage" in df else df


def _logged(df: pd.DataFrame, key: str) -> bool:
    return key in df or any(key in m for m in df.get("missing", []) if isinstance(m, dict))


def _table(df: pd.DataFrame, stage: str, keys: list[str], rows: list[registry.Metric]) -> pd.DataFrame:
    """Rows keyed by `keys` (+ any other config choice that varies; if rows still collide, their arm (the overrides
    that differ), then the seed, then run_name); status, the stage's scheduled steps and the seed (unless it keys
    the rows), then the metric `rows` (those marked if_logged only where some run logged them), then the cost rows
    some run logged."""
    rows = [r for r in rows + registry.table_rows("cost") if not r.if_logged or _logged(df, r.key)]
    columns = {r.label: r for r in rows}
    levels = [k for k in keys if k in df and df[k].notna().any()]
    levels += [c for c in df.columns if c.startswith("choice.") and c[len("choice."):] not in keys
               and df[c].astype(str).nunique() > 1]
    df = df.assign(arm=arm_labels(df))
    # rows that still collide: the overrides that tell them apart (the arm), then the seed, then the run
    for extra in ("arm", "seed", "run_name"):
        if extra not in df or (levels and not df.duplicated(levels).any()):
            continue
        within = df.groupby(levels, observed=True, dropna=False)[extra].nunique(dropna=False) if levels else None
        if (within.max() if levels else df[extra].nunique(dropna=False)) > 1:
            levels.append(extra)
    levels = levels or ["run_name"]
    steps = f"trainer.{stage}.steps"  # every run logs the whole config: both stages' schedules
    # how the images became numbers (metrics/protocol.py); runs from before the setting computed `precise`
    proto = df.get("metrics.protocol", df.get("protocol", pd.Series(np.nan, index=df.index)))
    out = pd.DataFrame({"status": df["status"].str.lower() if "status" in df else MISSING,
                        "protocol": proto.fillna("precise") if stage == "tokenizer" or "eval/fid" in df else MISSING,
                        "steps (schedule)": pd.to_numeric(df[steps], errors="coerce") if steps in df else np.nan,
                        "seed": pd.to_numeric(df["seed"], errors="coerce") if "seed" in df else np.nan,
                        **{name: (pd.to_numeric(df[r.key], errors="coerce") * r.scale if r.key in df else np.nan)
                           for name, r in columns.items()}}, index=df.index)
    if "seed" in levels:
        out = out.drop(columns=["seed"])
    reasons = {}
    missing_text = []
    for i, miss in zip(df.index, df["missing"] if "missing" in df else [{}] * len(df)):
        row = {name: miss[r.key] for name, r in columns.items() if isinstance(miss, dict) and r.key in miss}
        reasons.update({(i, name): why for name, why in row.items()})
        missing_text.append("; ".join(f"{name}: {why}" for name, why in row.items()))
    out["missing"] = missing_text
    index = df[levels].rename(columns=lambda c: c[len("choice."):] if c.startswith("choice.") else c)
    pos = {i: tuple(index.loc[i]) for i in df.index}
    out.index = pd.MultiIndex.from_frame(index) if len(levels) > 1 else pd.Index(index.iloc[:, 0])
    out = out.sort_index()
    # (row key, column) -> reason, for the Markdown footnotes (attrs survive the sort above)
    out.attrs["missing"] = {(pos[i] if len(levels) > 1 else pos[i][0], name): why for (i, name), why in reasons.items()}
    return out


def tokenizer_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows tokenizer x quantizer; columns status, steps, seed, the registry's tokenizer table (metrics with their N),
    missing (reasons)."""
    sub = _stage(df, "tokenizer")
    return _table(sub.assign(tokenizer=sub.get("choice.tokenizer"), quantizer=sub.get("choice.quantizer")),
                  "tokenizer", ["tokenizer", "quantizer"], registry.table_rows("tokenizer"))


def ar_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows factorization x model; columns status, steps, seed, the registry's AR table (FID, IS, val loss and its
    per-sub-token parts 1..M, params incl. the output head, with their N), missing."""
    sub = _stage(df, "ar")
    m = max((int(c.rsplit("_", 1)[1]) for c in sub.columns
             if c.startswith("val/loss_") and c.rsplit("_", 1)[1].isdigit()), default=0)
    return _table(sub, "ar", ["factorization", "model"], registry.table_rows("ar", m))


# python -m magvit2.evaluate's protocol metrics (FID: 50 samples per class vs a reference batch, not in-loop)
REFERENCE_AR = ("eval/fid", "eval/is", "eval/n_samples", "eval/n_real")


def reference_table(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """Rows: evaluations of released weights (load_runs(reference=True)) of `stage`, keyed by the file, the tokens
    (tokenizer: the 32x32 row of 128-L at 256 px differs from its 16x16 row) and the data; the stage's metric
    columns with their N."""
    sub = _stage(df, stage)
    keys = {"weights": sub["run_name"].str.replace(f"evaluate-{stage}-", "", regex=False)}
    if stage == "tokenizer":
        keys.update(tokens=sub.get("tokens"), data=sub.get("data"))
    rows = (registry.table_rows("tokenizer") if stage == "tokenizer"
            else [registry.get(k, evaluate=True) for k in REFERENCE_AR])
    return _table(sub.assign(**keys), stage, list(keys), rows).drop(columns=["steps (schedule)", "seed"])


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return MISSING
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()
                                            and abs(v) >= 1e4):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def _better(column: str) -> str | None:
    """'min' / 'max' for a claim's column with a better direction, else None (N, params, steps, perplexity, costs)."""
    m = registry.by_label(column)
    return None if m is None or m.kind != registry.CLAIM or m.better is None else \
        "min" if m.better == "lower" else "max"


def _ranked(column: str, index: pd.Index) -> bool:
    """Whether a best value of `column` over these rows means something: a claim with a direction, and (a
    per-sub-token loss) not compared across factorizations."""
    m = registry.by_label(column)
    if _better(column) is None:
        return False
    return m.comparable or "factorization" not in index.names or index.get_level_values("factorization").nunique() < 2


def to_markdown(table: pd.DataFrame) -> str:
    """Pipe table; the best value of a metric column in bold (lower or higher, as the metric goes); a NaN cell
    renders as "—", numbered "— (1)" when a reason was logged, the reasons listed under the table (plain Markdown,
    no footnote syntax: it renders the same in report.md and report.html)."""
    reasons = table.attrs.get("missing", {})
    names = [n or "" for n in table.index.names]
    cols = [c for c in table.columns if c != "missing"]
    best = {}
    for c in cols:
        vals = pd.to_numeric(table[c], errors="coerce")
        if _ranked(c, table.index) and vals.notna().sum() > 1:
            best[c] = getattr(vals, _better(c))()
    lines = ["| " + " | ".join(names + cols) + " |", "|" + "---|" * (len(names) + len(cols))]
    notes: dict[tuple, list] = {}  # (column, reason) -> the rows it holds for: one numbered line per reason
    for key, row in table.iterrows():
        keys = list(key) if isinstance(key, tuple) else [key]
        cells = [str(k) for k in keys]
        for c in cols:
            text = _fmt(row[c])
            why = reasons.get((key, c))
            if text == MISSING and why:
                notes.setdefault((c, why), []).append("/".join(map(str, keys)))
                text += f" ({list(notes).index((c, why)) + 1})"
            elif c in best and row[c] == best[c]:
                text = f"**{text}**"
            cells.append(text.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{i}. {c} of {', '.join(rows)}: {why}" for i, ((c, why), rows) in enumerate(notes.items(), 1)]
    return "\n".join(lines + (["", "Missing values:", ""] + notes if notes else [])) + "\n"


def _seed_cell(column: str, st: pd.Series) -> str:
    """mean ± std [95% interval] over an arm's seeds; one seed says so; constants as their value or range."""
    if stats.constant(column):
        return _fmt(st["lo"]) if st["lo"] == st["hi"] or pd.isna(st["hi"]) else f"{_fmt(st['lo'])}–{_fmt(st['hi'])}"
    if stats.summed(column) or pd.isna(st["mean"]):
        return _fmt(st["mean"])
    if st["n"] < 2:
        return f"{_fmt(st['mean'])} (n = 1)"
    d = stats.decimals((st["hi"] - st["lo"]) / 2)
    if d is None:  # a description (cost, throughput): its spread, no interval
        return f"{_fmt(st['mean'])} ± {st['std']:.2g}"
    return f"{st['mean']:.{d}f} ± {st['std']:.2g} {stats.interval_text(st['mean'], st['lo'], st['hi'])}"


def seeds_markdown(agg: pd.DataFrame, key_metrics: list[str] | None = None) -> str:
    """The arms of a seed aggregate (magvit2.results.stats.aggregate) as a pipe table, each metric as mean ± std
    [95% Student-t interval] over the arm's n seeds; in bold only a best arm whose interval clears every other arm's.
    Under it: which arms have a single seed, whether the best arm's interval overlaps each other arm's for
    `key_metrics` (default: every metric with a better direction), and the logged reasons of missing values."""
    names = [n or "" for n in agg.index.names]
    cols = [c for c in dict.fromkeys(agg.columns.get_level_values(0)) if c != "n seeds"]
    bold = key_metrics if key_metrics is not None else cols
    best = {c: stats.clear_best(agg, c, _better(c) == "min") for c in cols if _ranked(c, agg.index) and c in bold}
    lines = ["| " + " | ".join(names + ["n seeds"] + cols) + " |", "|" + "---|" * (len(names) + 1 + len(cols))]
    for key, row in agg.iterrows():
        cells = [str(k) for k in (key if isinstance(key, tuple) else [key])] + [_fmt(row[("n seeds", "n")])]
        for c in cols:
            text = _seed_cell(c, row[c])
            cells.append((f"**{text}**" if best.get(c) == key else text).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    name = lambda k: "/".join(map(str, k)) if isinstance(k, tuple) else str(k)  # noqa: E731
    single = [name(k) for k, n in agg[("n seeds", "n")].items() if n < 2]
    notes = ["", "Mean ± std over seeds and the 95% Student-t interval of the mean, at the precision the interval "
                 "supports; cost and throughput columns as mean ± std only (descriptions, not claims); device-hours "
                 "summed over seeds. Verdicts: a paired t-test over shared seeds (3 or more), else Welch's."]
    if single:
        notes.append(f"n = 1 (one seed: no spread, no interval; run seed=0,1,2 for one): {', '.join(single)}.")
    for c in key_metrics if key_metrics is not None else [c for c in cols if _ranked(c, agg.index)]:
        notes += [f"- {line}" for line in stats.overlaps(agg, c, _better(c) == "min")]
    why = sorted({(c, r) for (_, c), r in agg.attrs.get("missing", {}).items() if c in cols})
    notes += [f"- {c} missing: {r}" for c, r in why]
    return "\n".join(lines + notes) + "\n"
