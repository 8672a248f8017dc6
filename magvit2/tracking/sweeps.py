"""A sweep's parent run: found by its sweep id or created, reopened by a resubmitted sweep, summarized and ended."""
from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.entities import Metric, ViewType
from mlflow.tracking import MlflowClient

from magvit2.tracking.schema import (KIND, MAX_TAG_VALUE, MEMBERS, N_MEMBERS, OVERRIDES, SEE_TAGS, STAGE, SWEEP_ID,
                                     TAGS_OVERFLOW, check_id, split_long)
from magvit2.tracking.store import get_experiment_id, retry, set_tags, tracking_uri

_RUN_URIS: dict[str, str] = {}  # run id -> tracking uri, so finish_sweep_run(run_id) needs nothing else


def find_sweep_run(client: MlflowClient, exp_id: str, sweep_id: str):
    """The sweep's parent run in experiment `exp_id`, or None."""
    flt = f"tags.`{KIND}` = 'sweep' and tags.`{SWEEP_ID}` = '{sweep_id}'"
    runs = retry(lambda: client.search_runs([exp_id], flt, ViewType.ACTIVE_ONLY, max_results=10,
                                            order_by=["attributes.start_time ASC"]), "search sweep run")
    return runs[0] if runs else None


def ensure_sweep_run(experiment: str, root: str, sweep_id: str, stage: str, overrides: str, n_members: int,
                     uri: str | None = None, members: list[str] | None = None) -> str:
    """The sweep's parent run (found by tag magvit2.sweep_id, else created); set RUNNING; returns its run id.
    members: the signatures of the runs the sweep reports (tag MEMBERS)."""
    check_id("sweep_id", sweep_id)
    turi = tracking_uri(root, uri)
    client = MlflowClient(turi)
    exp_id = get_experiment_id(experiment, root, uri, stage)
    tags = {KIND: "sweep", SWEEP_ID: sweep_id, STAGE: stage, OVERRIDES: overrides or "", N_MEMBERS: str(n_members)}
    if members:
        tags[MEMBERS] = " ".join(dict.fromkeys(members))
    from magvit2.runs import FileLock  # inter-process: root is shared by a sweep's members
    with FileLock(Path(root).expanduser().resolve() / ".locks" / f"sweep-{sweep_id}"):
        run = find_sweep_run(client, exp_id, sweep_id)
        if run is None:
            tags, long = split_long(tags, MAX_TAG_VALUE, SEE_TAGS)
            run = retry(lambda: client.create_run(exp_id, tags=tags, run_name=f"sweep-{sweep_id}"), "create sweep run")
            if long:
                retry(lambda: client.log_dict(run.info.run_id, long, TAGS_OVERFLOW), "log tags overflow")
        else:
            if run.info.status != "RUNNING":
                retry(lambda: client.update_run(run.info.run_id, status="RUNNING"), "reopen sweep run")
            if overrides or n_members:  # a member creating a missing parent passes neither; keep what is there
                set_tags(client, run.info.run_id, {k: tags[k] for k in (OVERRIDES, N_MEMBERS, MEMBERS) if k in tags})
    _RUN_URIS[run.info.run_id] = turi
    return run.info.run_id


def finish_sweep_run(run_id: str, status: str = "FINISHED", root: str | None = None, uri: str | None = None) -> None:
    """Terminate the sweep run (FINISHED, FAILED or KILLED)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status={status!r}: use FINISHED, FAILED or KILLED")
    turi = _RUN_URIS.get(run_id)
    if turi is None:
        if root is None and uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ValueError(f"finish_sweep_run({run_id!r}): unknown store; pass root= (paths.root) or uri=")
        turi = tracking_uri(root or "outputs", uri)
    client = MlflowClient(turi)
    retry(lambda: client.set_terminated(run_id, status), "finish sweep run")


def end_if_running(run_id: str, status: str, uri: str) -> bool:
    """Terminate a run in the store at exactly `uri` (a sweep's recorded one) unless it ended already; True if this
    call ended it."""
    client = MlflowClient(uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status)
    return True


def summarize_sweep_run(run_id: str, uri: str, tags: dict, metrics: dict[str, float],
                        texts: dict[str, str]) -> None:
    """The end-of-sweep record on a sweep run in the store at `uri`: tags (best member, description), metrics (wall
    time, device-hours) and text artifacts (the results table); a resubmitted sweep overwrites them."""
    client = MlflowClient(uri)
    set_tags(client, run_id, tags)
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
    retry(lambda: client.log_batch(run_id, metrics=ms, synchronous=True), "log sweep summary")
    for name, text in texts.items():
        retry(lambda: client.log_text(run_id, text, name), f"log {name}")
