"""How the sweep table combines run dirs with the SLURM queue (the queue is faked here; test_slurm_sweep.py runs
the same code against the real one), and when `magvit2.sweep status` closes the sweep's MLflow parent run."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow_server import fresh_sqlite

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
    uri = fresh_sqlite(tmp_path)
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("x")).info.run_id
    d = _sweep(tmp_path / "sw", ["finished", "running"])
    doc = json.loads((d / "sweep.json").read_text())
    (d / "sweep.json").write_text(json.dumps({**doc, "parent_run_id": parent, "tracking_uri": uri}))
    rows = [{**m, "state": s, "metrics": {}} for m, s in zip(doc["members"], states)]
    assert sweep_cli.close_parent_run(d, rows) == closed
    assert client.get_run(parent).info.status == (closed or "RUNNING")
    assert ("mlflow.note.content" in client.get_run(parent).data.tags) == bool(closed)  # summarized when closed


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
    # one seed each: the best mean, and no claim (the report says the same)
    assert state.winner_line(rows) == ("best mean by val/loss (lower is better): k6_12-B 7.000 vs k9_9-B 8.000 "
                                       "(-1, -12%); n = 1 vs 1: no claim either way (run seed=0,1,2)")
    rows[0]["metrics"]["eval/fid"], rows[1]["metrics"]["eval/fid"] = 30.0, 20.0  # FID ranks first when present
    assert state.winner_line(rows).startswith("best mean by eval/fid (lower is better): k9_9-B 20.00 vs k6_12-B 30.00")
    assert state.winner_line([]) is None
    # members that differ only in seed are one arm: mean ± std over its seeds
    seeds = [{"member": f"{f}-{s}", "state": "finished", "overrides": [f"factorization={f}", "scale=tiny", f"seed={s}"],
              "metrics": {"val/loss": v}} for f, vals in (("k6_12", (7.0, 9.0)), ("k9_9", (8.5, 8.5, 8.5)))
             for s, v in enumerate(vals)]
    assert state.winner_line(seeds) == ("best mean by val/loss (lower is better; mean ± std over seeds): "
                                        "factorization=k6_12 8.000 ± 1.4 (n = 2) vs factorization=k9_9 8.500 ± 0 "
                                        "(n = 3) (-0.5, -5.9%); not distinguishable at 5% (Welch t-test, n = 2 vs "
                                        "3: p = 0.7)")
    # arms sharing 3 seeds: a paired test; a winner only when it distinguishes them
    from scipy import stats as sps
    a, b = (7.0, 7.1, 7.05), (8.5, 8.6, 8.4)
    paired = [{"member": f"{f}-{s}", "state": "finished", "overrides": [f"factorization={f}", f"seed={s}"],
               "metrics": {"val/loss": v}} for f, vals in (("k6_12", a), ("k9_9", b)) for s, v in enumerate(vals)]
    line = state.winner_line(paired)
    assert line.startswith("winner by val/loss") and "paired t-test over 3 shared seeds" in line
    assert f"p = {sps.ttest_rel(a, b).pvalue:.2g}" in line


def _tokenizer_sweep(tmp_path, monkeypatch, tok_status: dict | None):
    """Two AR members whose jobs run (7_0, 7_1) and have not opened their runs; both train tokenizer `tsig` first."""
    tok = tmp_path / "runs" / "tokenizer" / "tsig"
    tok.mkdir(parents=True)
    if tok_status:
        RunDir(tok).write_status(**tok_status)
    d = _sweep(tmp_path, ["new", "new"])
    doc = json.loads((d / "sweep.json").read_text())
    for m in doc["members"]:
        m["tokenizer"] = {"name": "tokenizer tiny-lfq tsig", "run_dir": str(tok), "steps": 100}
    (d / "sweep.json").write_text(json.dumps(doc))
    monkeypatch.setattr(state, "queue_states", lambda ids: {"7_0": "RUNNING", "7_1": "RUNNING"})
    return d, RunDir(tok)


def test_the_shared_tokenizer_has_its_own_row_and_members_say_they_wait_for_it(tmp_path, monkeypatch):
    d, tok = _tokenizer_sweep(tmp_path, monkeypatch, {"state": "running", "step": 40, "steps": 100,
                                                       "steps_per_s": 2.0, "slurm_job_id": "7_0"})
    rows = state.refresh(d)
    assert [(r["state"], r.get("note")) for r in rows] == [("starting", "training tokenizer tsig"),
                                                             ("waiting", "waiting for tokenizer tsig")]
    lines = state.format_members(rows).splitlines()
    tok_line = next(line for line in lines if line.startswith("tok "))
    # its own state, step, steps/s, ETA (60 steps at 2/s) and the job that trains it
    assert "tokenizer tiny-lfq tsig" in tok_line and "running" in tok_line and "40/100" in tok_line
    assert "0m30s" in tok_line and "7_0" in tok_line
    assert "waiting for tokenizer tsig" in lines[-1]

    # not opened yet, but a job holds its lock: starting, and the members still wait for it
    tok.status.unlink()
    with tok.lock():
        rows = state.refresh(d)
        assert [r["state"] for r in rows] == ["waiting", "waiting"]
        assert [r for r in state.shared_rows(rows)][0]["state"] == "starting"
    # nobody trains it (and it is not finished): the members are only starting, nothing is claimed
    assert [(r["state"], r.get("note")) for r in state.refresh(d)] == [("starting", None), ("starting", None)]


def test_a_finished_tokenizer_keeps_its_row_and_nobody_waits(tmp_path, monkeypatch):
    d, _ = _tokenizer_sweep(tmp_path, monkeypatch, {"state": "finished", "step": 100, "steps": 100})
    rows = state.refresh(d)
    assert [r["state"] for r in rows] == ["starting", "starting"]
    assert "finished" in next(line for line in state.format_members(rows).splitlines() if line.startswith("tok "))


def _clocked(rd: RunDir, opened: str, updated: str, **fields) -> None:
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.status.write_text(json.dumps({"state": "finished", "step": 6, "opened": opened, "updated": updated, **fields}))


def test_device_hours_are_wall_time_times_processes_over_members_and_the_shared_tokenizer(tmp_path, monkeypatch):
    from magvit2.runs.status import run_seconds
    from magvit2.sweep import summary
    d, tok = _tokenizer_sweep(tmp_path, monkeypatch, None)
    rows = state.refresh(d)
    _clocked(RunDir(rows[0]["run_dir"]), "2024-01-01 10:00:00", "2024-01-01 11:00:00", world_size=2)  # 2 h
    _clocked(RunDir(rows[1]["run_dir"]), "2024-01-01 10:00:00", "2024-01-01 10:30:00", wall_s_before=1800)  # 1 h
    _clocked(tok, "2024-01-01 09:00:00", "2024-01-01 09:30:00", world_size=1)  # 0.5 h
    assert summary.device_hours(rows) == (3.5, 3)
    line = summary.usage_line(3 * 3600 + 5, rows)
    assert line.startswith("wall time 3h00m; device-hours 3.5 over 3 runs (training wall time x processes")

    # a resumed run adds its earlier attempts' seconds to the new attempt's clock
    rd = RunDir(tmp_path / "runs" / "resumed")
    _clocked(rd, "2024-01-01 10:00:00", "2024-01-01 10:10:00", wall_s_before=60)
    rd.start_attempt()
    st = rd.read_status()
    assert st["wall_s_before"] == 660 and run_seconds(st) < 662
    # epoch fields (written since): below one second, as a 6-step tiny run takes
    assert run_seconds({**st, "opened_s": 100.0, "updated_s": 100.25}) == 660.25
    assert st["updated_s"] >= st["opened_s"] > 0


def test_the_sweep_summary_goes_onto_the_parent_run(tmp_path, monkeypatch):
    uri = fresh_sqlite(tmp_path)
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("x")).info.run_id
    d = _sweep(tmp_path / "sw", ["finished", "finished", "failed"], launcher="local")
    doc = json.loads((d / "sweep.json").read_text())
    doc.update(parent_run_id=parent, tracking_uri=uri, axes={"factorization": ["k6_12", "k9_9", "k12_6"]})
    (d / "sweep.json").write_text(json.dumps(doc))
    rows = state.refresh(d)
    for r, loss in zip(rows, (7.0, 6.5, 1.0)):
        r["metrics"] = {"val/loss": loss, "eval/utilization": 0.5}
        _clocked(RunDir(r["run_dir"]), "2024-01-01 10:00:00", "2024-01-01 10:06:00")
    from magvit2.sweep import summary
    summary.record(d, rows, wall_s=900.0)
    run = client.get_run(parent)
    t = run.data.tags
    assert (t["magvit2.best.member"], t["magvit2.best.metric"], t["magvit2.best.value"]) == ("m1", "val/loss", "6.5")
    assert t["magvit2.best.run_dir"] == rows[1]["run_dir"] and t["magvit2.best.direction"] == "lower"
    assert run.data.metrics == {"sweep/wall_s": 900.0, "sweep/device_hours": pytest.approx(0.3)}  # 3 x 6 min x 1
    note = t["mlflow.note.content"]
    assert "3 ar members over factorization = k6_12, k9_9, k12_6; 2 finished" in note
    assert "best mean by val/loss" in note and "device-hours 0.3 over 3 runs" in note
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "results.md"} <= arts
    csv = (Path(client.download_artifacts(parent, "results.csv", str(tmp_path))).read_text())
    assert csv.splitlines()[0] == "member,state,step,steps,device-hours,eval/utilization (%),val/loss,signature,run_dir"
    assert csv.splitlines()[2].startswith("m1,finished,3,6,0.1,50.0,6.5,")
    assert "m2,failed" in csv
