"""Concurrent members logging to a real `mlflow server` on loopback: every value of every history must arrive."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401 - fixture

from magvit2.tracking import MemberRun, ensure_sweep_run, finish_sweep_run

EXP = "magvit2-ar"
KEYS = ["train/loss", "train/loss_1", "train/loss_2", "train/lr", "train/tokens_per_s"]


def _value(i: int, step: int, j: int) -> float:
    return i * 10_000 + step * 10 + j + 0.5  # exact in binary: equality checks are safe


def _member(i: int, url: str, root: str, sweep: str, steps: int, pause_s: float, env: dict) -> str:
    os.environ.update({"MLFLOW_TRACKING_URI": url, **env})  # what the launcher exports to every job
    m = MemberRun(EXP, root, "ar", f"sig{i}", f"member-{i}", {"magvit2.overrides": f"member={i}"}, sweep)
    m.log_params({"member": str(i), "model.dim": "64"})
    for s in range(steps):
        m.log_metrics({k: _value(i, s, j) for j, k in enumerate(KEYS)}, step=s)
        time.sleep(pause_s)
    m.end()
    return m.run_id


def _run_members(url, root, sweep, n, steps, pause_s=0.0, env=None):
    """Start n member processes; returns (pool, async result). Close the pool with pool.close(); pool.join()."""
    ctx = mp.get_context("forkserver")  # children start clean (no inherited sockets/threads) but share imports
    ctx.set_forkserver_preload(["magvit2.tracking.member"])
    pool = ctx.Pool(n)
    return pool, pool.starmap_async(_member, [(i, url, root, sweep, steps, pause_s, env or {}) for i in range(n)])


def _check_all_there(url, sweep_run, run_ids, steps):
    client = MlflowClient(url)
    assert len(set(run_ids)) == len(run_ids)
    for i, rid in enumerate(run_ids):
        run = client.get_run(rid)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == sweep_run
        assert run.data.params == {"member": str(i), "model.dim": "64"}
        for j, k in enumerate(KEYS):
            hist = sorted((h.step, h.value) for h in client.get_metric_history(rid, k))
            assert hist == [(s, _value(i, s, j)) for s in range(steps)], (i, k, len(hist))
    kids = client.search_runs([client.get_experiment_by_name(EXP).experiment_id],
                              f"tags.`mlflow.parentRunId` = '{sweep_run}'")
    assert sorted(r.info.run_id for r in kids) == sorted(run_ids)


@pytest.mark.slow
def test_eight_members_lose_no_metric(mlflow_server, tmp_path):
    url, n, steps = mlflow_server.url, 8, 50
    print(f"mlflow server healthy after {mlflow_server.startup_s:.1f} s")
    sweep_run = ensure_sweep_run(EXP, str(tmp_path), "conc", "ar", "member=0..7", n, uri=url)
    t0 = time.monotonic()
    pool, res = _run_members(url, str(tmp_path), "conc", n, steps)
    try:
        run_ids = res.get(timeout=300)
    finally:
        pool.terminate()
    print(f"{n} members x {steps} steps x {len(KEYS)} metrics logged in {time.monotonic() - t0:.1f} s")
    finish_sweep_run(sweep_run)
    _check_all_there(url, sweep_run, run_ids, steps)
    assert MlflowClient(url).get_run(sweep_run).info.status == "FINISHED"


@pytest.mark.slow
def test_members_survive_a_server_restart(tmp_path):
    """The server goes down mid-sweep and comes back on the same port: members retry; nothing is lost.
    MLflow's own HTTP retries are switched off, so it is magvit2.tracking's retry/queue that has to bridge the gap."""
    n, steps = 4, 40
    with MlflowServer(tmp_path / "srv") as srv:
        sweep_run = ensure_sweep_run(EXP, str(tmp_path), "restart", "ar", "", n, uri=srv.url)
        pool, res = _run_members(srv.url, str(tmp_path), "restart", n, steps, pause_s=0.1,
                                 env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        client = MlflowClient(srv.url)
        exp = client.get_experiment_by_name(EXP).experiment_id
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until every member is mid-way
            runs = client.search_runs([exp], "tags.`magvit2.kind` = 'member'")
            if len(runs) == n and all(len(client.get_metric_history(r.info.run_id, KEYS[0])) >= 5 for r in runs):
                break
            time.sleep(0.3)
        else:
            pytest.fail("members did not start logging")
        t0 = time.monotonic()
        srv.stop()
        time.sleep(2.0)
        assert not res.ready()  # members are now blocked on a dead server
        threading.Thread(target=srv.start).start()
        try:
            run_ids = res.get(timeout=400)
        finally:
            pool.terminate()
        print(f"server down {srv.startup_s + 2:.1f} s; members done {time.monotonic() - t0:.1f} s after the stop")
        _check_all_there(srv.url, sweep_run, run_ids, steps)
