"""The end of a sweep: wall time, device-hours, the results table, and the summary on its MLflow parent run (the
results table as results.csv / results.md, the best member for the key metric as magvit2.best.* tags, wall time and
device-hours as metrics, a description naming the swept axes)."""
from __future__ import annotations

from magvit2.metrics import registry
from magvit2.runs import RunDir, SweepDir
from magvit2.runs.status import clock_seconds
from magvit2.sweep import state

# What device-hours count, said wherever they are shown.
DEVICE_HOURS = "training wall time x processes (1 if not recorded), summed over the members and the shared " \
               "tokenizer they trained; queue time and lock waits not counted"


def device_hours(rows: list[dict]) -> tuple[float, int]:
    """(device-hours, runs counted) of the members and the shared tokenizer runs they train first."""
    runs = rows + state.shared_rows(rows)
    return sum(run_device_hours(r["run_dir"]) for r in runs), len(runs)


def run_device_hours(run_dir) -> float:
    """One run's device-hours from its status.json (also logged by the run itself as compute/device_hours)."""
    return RunDir(run_dir).device_hours()


def usage_line(wall_s: float, rows: list[dict]) -> str:
    hours, n = device_hours(rows)
    return (f"wall time {state.duration(wall_s)}; device-hours {hours:.3g} over {n} runs ({DEVICE_HOURS})")


def results_table(rows: list[dict]):
    """One row per member: state, steps, device-hours, its last eval/ and val/ metrics (status.json; train/ ones
    while it has no other; utilization in %), signature, run dir."""
    import pandas as pd
    recs = []
    for r in rows:
        metrics = {k: v for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float))}
        metrics = {k: v for k, v in metrics.items() if k.startswith(("eval/", "val/"))} or metrics
        metrics = {k + (" (%)" if _percent(k) else ""): v * (100 if _percent(k) else 1)
                   for k, v in sorted(metrics.items())}
        recs.append({"member": r["member"], "state": r["state"], "step": r.get("step", 0), "steps": r.get("steps"),
                     "device-hours": run_device_hours(r["run_dir"]), **metrics,
                     "signature": r["signature"], "run_dir": r["run_dir"]})
    return pd.DataFrame(recs)


def _percent(key: str) -> bool:
    return bool(registry.get(key) and registry.get(key).percent)


def axes_text(axes: dict) -> str:
    return " x ".join(f"{k} = {', '.join(map(str, v))}" for k, v in axes.items()) or "no swept axis"


def finished_members(rows: list[dict]) -> list[str]:
    return sorted(r["run_dir"] for r in rows if r["state"] == "finished")


def closed_summary(sweep_dir, rows: list[dict]) -> dict | None:
    """The recorded summary when it already covers exactly these finished members (a re-run that adds nothing
    changes nothing: no second wall time, no rewritten description), else None."""
    doc = SweepDir(sweep_dir).read({}) or {}
    s = doc.get("summary")
    return s if s and s.get("finished") == finished_members(rows) else None


def record(sweep_dir, rows: list[dict], wall_s: float) -> float:
    """Write the summary onto the sweep's MLflow parent run (in the store recorded in sweep.json) and into
    sweep.json. A re-run that trained members extends the recorded wall time by its own. -> the sweep's wall
    seconds."""
    from magvit2 import tracking
    sd = SweepDir(sweep_dir)
    doc = sd.read({}) or {}
    if doc.get("summary"):
        wall_s += float(doc["summary"].get("wall_s", 0.0))
    hours, n = device_hours(rows)
    sd.record_summary({"finished": finished_members(rows), "wall_s": wall_s, "device_hours": hours})
    if not doc.get("parent_run_id") or not doc.get("tracking_uri"):
        return wall_s
    table = results_table(rows)
    rank = state.ranked(rows)
    tags = {}
    note = [f"Sweep `{doc['id']}`: {len(rows)} {rows[0]['stage'] if rows else ''} members over "
            f"{axes_text(doc.get('axes', {}))}; {sum(r['state'] == 'finished' for r in rows)} finished."]
    if rank is not None:
        key, lower, have = rank
        best = have[0]
        tags = {tracking.BEST_PREFIX + k: v for k, v in {
            "member": best["member"], "metric": key, "value": f"{best['metrics'][key]:.6g}",
            "direction": "lower" if lower else "higher", "signature": best["signature"],
            "run_dir": best["run_dir"]}.items()}
        note.append(state.winner_line(rows) + ".")
    note.append(f"Wall time {state.duration(wall_s)}, device-hours {hours:.3g} over {n} runs ({DEVICE_HOURS}).")
    note.append(f"Results table: results.md / results.csv; report: `python -m magvit2.report --sweep {doc['id']}`.")
    tags[tracking.NOTE] = "\n\n".join(note)
    tracking.summarize_sweep_run(doc["parent_run_id"], doc["tracking_uri"], tags,
                                 {"sweep/wall_s": wall_s, "sweep/device_hours": hours},
                                 {"results.csv": table.to_csv(index=False),
                                  "results.md": table.to_markdown(index=False, floatfmt=".4g") + "\n"})
    return wall_s


def wall_since_submission(sweep_dir, rows: list[dict]) -> float:
    """A detached sweep's wall time: from its (last) submission to the last status write of a member."""
    doc = SweepDir(sweep_dir).read({})
    ends = [clock_seconds(RunDir(r["run_dir"]).read_status().get("updated")) for r in rows]
    ends = [t for t in ends if t is not None]
    return max(0.0, max(ends) - doc["submitted"]) if ends and doc.get("submitted") else 0.0
