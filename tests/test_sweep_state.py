"""How the sweep table combines run dirs with the SLURM queue (the queue is faked here; test_slurm_sweep.py runs
the same code against the real one), and when `magvit2.sweep status` closes the sweep's MLflow parent run."""
from __future__ import annotations

import json

import mlflow
import pytest

from magvit2.sweep import state
from magvit2.sweep import status as sweep_cli
from magvit2.runs import RunDir

CASES = [  # (state in status.json, job state in squeue or None when gone) -> table state
    ("new", "PENDING", "queued"),
    ("preempted", "PENDING", "queued"),
    ("new", "RUNNING", "starting"),
    ("preempted", "RUNNING", "starting"),
    ("running", "RUNNING", "running"),
    ("running", None, "died"),
    ("new", None, "died"),
    ("preempted", None, "stopped"),
    ("finished", None, "finished"),
    ("failed", None, "failed"),
]


def _sweep(tmp_path, states: list[str], launcher: str = "slurm"):
    members = []
    for i, st in enumerate(states):
        rd = tmp_path / "runs" / f"m{i}"
        rd.mkdir(parents=True)
        if st != "new":
            RunDir(rd).write_status(state=st, step=3)
        members.append({"member": f"m{i}", "overrides": [], "stage": "ar", "signature": f"m{i}", "run_dir": str(rd),
                        "steps": 6})
    doc = {"id": "s", "launcher": launcher, "jobs": {m["run_dir"]: f"7_{i}" for i, m in enumerate(members)},
           "members": members}
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    return tmp_path


def test_queue_refines_run_dir_states(tmp_path, monkeypatch):
    d = _sweep(tmp_path, [c[0] for c in CASES])
    queue = {f"7_{i}": c[1] for i, c in enumerate(CASES) if c[1]}
    asked = []
    monkeypatch.setattr(state, "queue_states", lambda ids: asked.append(sorted(ids)) or queue)
    rows = state.refresh(d)
    assert [r["state"] for r in rows] == [c[2] for c in CASES]
    assert asked == [sorted(f"7_{i}" for i, c in enumerate(CASES) if c[0] not in state.TERMINAL)]
    assert all(r["slurm_job_id"] == f"7_{i}" for i, r in enumerate(rows))


def test_no_queue_answer_or_local_launcher_keeps_run_dir_states(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "queue_states", lambda ids: None)  # squeue failed: say nothing rather than guess
    assert [r["state"] for r in state.refresh(_sweep(tmp_path / "a", ["running", "new"]))] == ["running", "new"]
    monkeypatch.setattr(state, "queue_states", lambda ids: pytest.fail("a local sweep must not ask squeue"))
    assert [r["state"] for r in state.refresh(_sweep(tmp_path / "b", ["running"], "local"))] == ["running"]


def test_a_member_that_finishes_while_the_queue_is_read_is_not_called_dead(tmp_path, monkeypatch):
    d = _sweep(tmp_path, ["running"])
    rd = tmp_path / "runs" / "m0"

    def queue(ids):  # the job ends (and writes finished) between our two reads
        RunDir(rd).write_status(state="finished", step=6)
        return {}
    monkeypatch.setattr(state, "queue_states", queue)
    (row,) = state.refresh(d)
    assert (row["state"], row["step"]) == ("finished", 6)


@pytest.mark.parametrize("states, closed", [(["finished", "finished"], "FINISHED"), (["finished", "died"], "FAILED"),
                                            (["finished", "running"], None)])
def test_status_closes_the_parent_run_once_every_member_ended(tmp_path, monkeypatch, states, closed):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("x")).info.run_id
    d = _sweep(tmp_path / "sw", ["finished", "running"])
    doc = json.loads((d / "sweep.json").read_text())
    (d / "sweep.json").write_text(json.dumps({**doc, "parent_run_id": parent, "tracking_uri": uri}))
    rows = [{"state": s} for s in states]
    assert sweep_cli.close_parent_run(d, rows) == closed
    assert client.get_run(parent).info.status == (closed or "RUNNING")


def test_sweep_id_comes_from_the_members_not_the_spelling(tmp_path):
    import re
    import subprocess
    import sys

    def sweep_id(*ov):
        p = subprocess.run([sys.executable, "-m", "magvit2.train", "-m", f"paths.root={tmp_path}", "dry_run=true",
                            *ov], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return re.search(r"sweep (\w+): 2 members", p.stdout).group(1)
    a = sweep_id("factorization=k6_12,k9_9")
    assert a == sweep_id("model=tiny", "factorization=k9_9,k6_12")  # redundant default, other order
    assert a != sweep_id("factorization=k6_12,k12_6")


def test_last_metrics_keep_their_prefix():
    from magvit2.sweep import state
    running = {"member": "a", "state": "running", "step": 3, "steps": 6, "run_dir": "/r/a",
               "metrics": {"train/loss": 1.5, "train/lr": 0.001}}
    done = {**running, "member": "b", "state": "finished", "metrics": {"train/loss": 1.0, "eval/psnr": 20.0}}
    table = state.format_members([running, done])
    assert "train/loss=1.5" in table and "eval/psnr=20" in table and " loss=" not in table


def test_rate_and_eta_columns():
    from magvit2.sweep import state
    row = {"member": "a", "state": "running", "step": 100, "steps": 1000, "run_dir": "/r/a", "metrics": {},
           "steps_per_s": 2.0}
    line = state.format_members([row]).splitlines()[-1]
    assert " 2 " in line and "7m30s" in line  # 900 steps left at 2 steps/s
    assert "7m30s" not in state.format_members([{**row, "state": "finished"}])


def test_the_summary_names_the_winner_with_its_margin():
    from magvit2.sweep import state
    rows = [{"member": "k6_12-B", "state": "finished", "metrics": {"val/loss": 7.0}},
            {"member": "k9_9-B", "state": "finished", "metrics": {"val/loss": 8.0}},
            {"member": "k12_6-B", "state": "failed", "metrics": {"val/loss": 1.0}}]  # not finished: not ranked
    assert state.winner_line(rows) == ("winner by val/loss (lower is better): k6_12-B 7 vs k9_9-B 8 "
                                       "(-1, -12.5%; n = 1 seed each)")
    rows[0]["metrics"]["eval/fid"], rows[1]["metrics"]["eval/fid"] = 30.0, 20.0  # FID ranks first when present
    assert state.winner_line(rows).startswith("winner by eval/fid (lower is better): k9_9-B 20 vs k6_12-B 30")
    assert state.winner_line([]) is None
