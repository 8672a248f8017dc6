"""status.json of a run dir: its one writer and reader, its time format, and what a run's wall time and device-hours
are read from it (the run's own compute/* metrics and a sweep's summary both read them here).

Fields: state (new|partial|running|finished|failed|diverged|preempted), step, steps, metrics, world_size, device,
mlflow_run_id, grid (the AR's token grid), steps_per_s, error; host, updated and updated_s (every write);
slurm_job_id (under SLURM); opened, opened_s and wall_s_before (each attempt's start: start_attempt).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from magvit2.runs.files import read_json, slurm_job_id, write_json

CLOCK = "%Y-%m-%d %H:%M:%S"  # `updated` and `opened`: local time of the writing host, for people


def stamp(t: float) -> str:
    return time.strftime(CLOCK, time.localtime(t))


def clock_seconds(text: str | None) -> float | None:
    """A status.json time stamp as epoch seconds; None if absent or unreadable."""
    try:
        return time.mktime(time.strptime(text, CLOCK))
    except (TypeError, ValueError):
        return None


def read(path: Path, has_checkpoint: bool) -> dict:
    """The status at `path`; a run dir without one is new, or partial when it has a checkpoint."""
    st = read_json(path, None)
    if st is None:
        st = {"state": "partial" if has_checkpoint else "new", "step": 0, "metrics": {}}
    return st


def write(path: Path, st: dict, **fields) -> dict:
    """`st` (the status as read) updated with `fields` and this write's host and time, written atomically."""
    now = time.time()  # updated: for people; updated_s: epoch seconds, for wall times below 1 s resolution
    st = {**st}
    st.update(fields, host=socket.gethostname(), updated=stamp(now), updated_s=now)
    if os.environ.get("SLURM_JOB_ID"):
        st["slurm_job_id"] = slurm_job_id()
    write_json(path, st)
    return st


def attempt_fields(st: dict) -> dict:
    """The fields that start an attempt's wall clock, keeping earlier attempts' seconds (wall_s_before)."""
    now = time.time()
    return {"wall_s_before": run_seconds(st), "opened": stamp(now), "opened_s": now}


def run_seconds(st: dict) -> float:
    """A run's training wall time: earlier attempts (wall_s_before) + the current or last one (from its opening to
    the last status write). Time queued or waiting for a lock is not in it."""
    if isinstance(st.get("opened_s"), (int, float)) and isinstance(st.get("updated_s"), (int, float)):
        start, end = st["opened_s"], st["updated_s"]
    else:  # written before the epoch fields: whole seconds
        start, end = clock_seconds(st.get("opened")), clock_seconds(st.get("updated"))
    last = end - start if start is not None and end is not None else 0.0
    return float(st.get("wall_s_before") or 0.0) + max(last, 0.0)


def device_hours(st: dict) -> float:
    """Training wall time x processes (1 if not recorded)."""
    return run_seconds(st) * int(st.get("world_size") or 1) / 3600
