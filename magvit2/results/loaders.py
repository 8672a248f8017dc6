"""MLflow runs -> typed pandas DataFrames (one row per member run; long metric histories)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from magvit2 import tracking

MODEL_ORDER = ["tiny", "B", "L", "XL"]
BASE_COLUMNS = ["run_id", "run_name", "experiment", "stage", "sweep_id", "status", "signature", "parent_run_id",
                "overrides", "start_time", "end_time", "duration_s", "factorization", "model", "missing"]


def resolve_uri(uri: str | None = None, root: str = "outputs") -> str:
    """An explicit uri wins (a report names its store); else MLFLOW_TRACKING_URI; else <root>/mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.tracking_uri(root)


def _search(client: MlflowClient, exp_ids: list[str], flt: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, flt, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _typed(col: pd.Series) -> pd.Series:
    """Param strings -> numbers / booleans when every logged value is one ("null" counts as missing)."""
    s = col.where(col != "null")
    vals = s.dropna()
    if vals.empty:
        return s
    if vals.isin(["true", "false"]).all():
        return s.map({"true": True, "false": False}).astype("boolean")
    try:
        return pd.to_numeric(s)
    except (ValueError, TypeError):
        return col


def bits_of(row: pd.Series) -> tuple[int, ...] | None:
    """Factorization bits (k1, ..., kM) of a run, from its params (or its factorization name)."""
    for key in ("factorization.bits", "derived.bits"):
        v = row.get(key)
        if isinstance(v, str) and v:
            try:
                return tuple(int(b) for b in (json.loads(v) if v.startswith("[") else v.split("-")))
            except (ValueError, TypeError):
                pass
    m = re.fullmatch(r"k(\d+(?:_\d+)*)", str(row.get("choice.factorization", "")))
    return tuple(int(b) for b in m.group(1).split("_")) if m else None


def _ordered(values: pd.Series, key) -> pd.Categorical:
    cats = sorted(values.dropna().unique(), key=key)
    return pd.Categorical(values, categories=cats, ordered=True)


def load_runs(sweep: str | None = None, experiment: str | None = None, tracking_uri: str | None = None,
              root: str = "outputs", reference: bool = False) -> pd.DataFrame:
    """Member runs of a sweep and/or an experiment (all experiments when none is named), one row each.

    Columns: BASE_COLUMNS, then params under their dotted keys (numbers where numeric; a key clashing with a base
    column is kept as "params.<key>"), then metrics (last value) under their keys without the "metrics." prefix.
    `factorization` (ordered by M, then bits) and `model` (tiny < B < L < XL) are ordered categoricals;
    `missing` maps metric key -> reason for metrics logged as missing. reference=True: instead, the evaluations of
    released weights (`python -m magvit2.evaluate` runs tagged magvit2.reference=true), whatever their sweep."""
    uri = resolve_uri(tracking_uri, root)
    client = MlflowClient(uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments(ViewType.ACTIVE_ONLY)}
    if experiment is not None:
        ids = [i for i, n in exps.items() if n == experiment]
        if not ids:
            raise ValueError(f"experiment={experiment!r} is not in {uri}; experiments there: {sorted(exps.values())}")
    else:
        ids = list(exps)
    flt = f"tags.`{tracking.KIND}` = 'member'"
    if reference:
        flt += f" and tags.`{tracking.REFERENCE}` = 'true'"
    elif sweep is not None:
        tracking.check_id("sweep", sweep)
        flt += f" and tags.`{tracking.SWEEP_ID}` = '{sweep}'"
    runs = _search(client, ids, flt) if ids else []
    if sweep is not None and not reference and ids:
        runs += _reused_members(client, ids, sweep, {r.data.tags.get(tracking.SIGNATURE) for r in runs})

    rows, params, metrics = [], [], []
    for r in runs:
        t = r.data.tags
        rows.append({
            "run_id": r.info.run_id, "run_name": r.info.run_name, "experiment": exps.get(r.info.experiment_id),
            "stage": t.get(tracking.STAGE), "sweep_id": t.get(tracking.SWEEP_ID), "status": r.info.status,
            "signature": t.get(tracking.SIGNATURE), "parent_run_id": t.get(tracking.PARENT_RUN_ID),
            "overrides": t.get(tracking.OVERRIDES), "start_time": r.info.start_time, "end_time": r.info.end_time,
            "missing": {k[len(tracking.MISSING_PREFIX):]: v for k, v in t.items()
                        if k.startswith(tracking.MISSING_PREFIX)},
        })
        params.append(dict(r.data.params))
        metrics.append(dict(r.data.metrics))
    df = pd.DataFrame(rows, columns=[c for c in BASE_COLUMNS if c not in ("factorization", "model", "duration_s")])
    p = pd.DataFrame(params, index=df.index, dtype=object)
    p = p.rename(columns={c: f"params.{c}" for c in p.columns if c in BASE_COLUMNS})
    p = p.apply(_typed) if len(p.columns) else p
    m = pd.DataFrame(metrics, index=df.index, dtype=float)
    m = m.rename(columns={c: f"metrics.{c}" for c in m.columns if c in BASE_COLUMNS or c in p.columns})
    df = pd.concat([df, p, m], axis=1)

    for c in ("start_time", "end_time"):
        df[c] = pd.to_datetime(df[c], unit="ms", utc=True)
    df["duration_s"] = (df["end_time"] - df["start_time"]).dt.total_seconds()
    raw_params = pd.DataFrame(params, index=df.index, dtype=object)
    fac = df["choice.factorization"] if "choice.factorization" in df else pd.Series(None, index=df.index, dtype=object)
    bits = {f: bits_of(raw_params.loc[i]) for i, f in fac.dropna().items()}
    df["factorization"] = _ordered(fac.astype(object),
                                   lambda f: (0, len(bits[f]), bits[f]) if bits.get(f) else (1, 0, (), str(f)))
    mod = df["choice.model"] if "choice.model" in df else pd.Series(None, index=df.index, dtype=object)
    df["model"] = _ordered(mod.astype(object), lambda v: (MODEL_ORDER.index(v), "") if v in MODEL_ORDER
                           else (len(MODEL_ORDER), str(v)))
    front = [c for c in BASE_COLUMNS if c in df]
    df = df[front + [c for c in df.columns if c not in front]]
    return df.sort_values(["stage", "factorization", "model", "run_name"], na_position="last").reset_index(drop=True)


def _reused_members(client: MlflowClient, exp_ids: list[str], sweep: str, have: set) -> list:
    """Members of the sweep that an earlier sweep (or a single run) had finished, so they carry another sweep's tag:
    found by the signatures on the sweep run (tracking.MEMBERS), the latest finished run of each."""
    flt = f"tags.`{tracking.KIND}` = 'sweep' and tags.`{tracking.SWEEP_ID}` = '{sweep}'"
    sigs = [sig for p in _search(client, exp_ids, flt) for sig in (tracking.tag_value(client, p, tracking.MEMBERS)
                                                                   or "").split()]
    out = []
    for sig in dict.fromkeys(sigs):
        if sig in have or "'" in sig:
            continue
        found = _search(client, exp_ids, f"tags.`{tracking.KIND}` = 'member' and tags.`{tracking.SIGNATURE}` = '{sig}'")
        if found:
            out.append(max(found, key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0)))
    return out


def load_history(run_ids: Iterable[str], keys: str | Iterable[str], tracking_uri: str | None = None,
                 root: str = "outputs") -> pd.DataFrame:
    """Long table (run_id, run_name, key, step, value, timestamp) of full metric histories.

    `keys` may hold glob patterns ("val/loss_*"). A step logged twice (a resumed run re-doing steps after its last
    checkpoint) keeps its latest value."""
    client = MlflowClient(resolve_uri(tracking_uri, root))
    patterns = [keys] if isinstance(keys, str) else list(keys)
    frames = []
    order = {rid: i for i, rid in enumerate(dict.fromkeys(run_ids))}
    for rid in order:
        run = client.get_run(rid)
        names = [k for k in run.data.metrics if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        for k in names:
            hist = client.get_metric_history(rid, k)
            frames.append(pd.DataFrame({"run_id": rid, "run_name": run.info.run_name, "key": k,
                                        "step": [h.step for h in hist], "value": [h.value for h in hist],
                                        "timestamp": [h.timestamp for h in hist]}))
    cols = ["run_id", "run_name", "key", "step", "value", "timestamp"]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(cols, [object, object, object, np.int64,
                                                                         float, np.int64])})
    h = pd.concat(frames, ignore_index=True)
    h["_order"] = h["run_id"].map(order)  # keep the caller's run order (e.g. the table's)
    h = h.sort_values(["_order", "key", "step", "timestamp"]).drop_duplicates(["run_id", "key", "step"], keep="last")
    return h[cols].reset_index(drop=True)
