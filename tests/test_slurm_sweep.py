"""Sweeps on the real local SLURM through `hydra/launcher=slurm`: every member finishes, logs and checkpoints;
a second submission trains nothing; a preempted member resumes and ends with the uninterrupted weights."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import assert_same_weights, load_ckpt, run_train, train_cmd
from test_slurm_cluster import slurm_cluster  # noqa: F401  (starts the cluster)

pytestmark = pytest.mark.slurm
SLURM = ["hydra/launcher=slurm", "hydra.launcher.timeout_min=15", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2"]


def _status(root: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs" / stage).glob("*/status.json"))]


def test_2x2_sweep_on_slurm_then_resubmission_trains_nothing(root):
    p = run_train(root, "factorization=k6_12,k9_9", "model.n_intra=0,1", *SLURM, multirun=True)
    st = _status(root, "ar")
    assert len(st) == 4 and all(s["state"] == "finished" and s["step"] == 6 for s in st)
    assert all(s.get("slurm_job_id") for s in st)
    assert len(list((root / "runs" / "ar").glob("*/checkpoint.pt"))) == 4
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("magvit2-ar")
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(tuple(sorted(r.info.run_name.split("-"))) for r in kids) == [
        ("k6_12", "n_intra=0"), ("k6_12", "n_intra=1"), ("k9_9", "n_intra=0"), ("k9_9", "n_intra=1")]
    assert all(r.info.status == "FINISHED" and r.data.tags["magvit2.slurm_job_id"] for r in kids)
    assert all("val/loss" in r.data.metrics for r in kids)

    # the status command reconnects from the sweep id alone
    sid = next(iter((root / "sweeps").iterdir())).name
    out = subprocess.run([sys.executable, "-m", "magvit2.sweep", "status", sid, "--root", str(root)], capture_output=True,
                         text=True, check=True).stdout
    assert out.count("finished") >= 4 and "k9_9" in out and "n_intra=1" in out

    jobs_before = json.loads(next((root / "sweeps").iterdir()).joinpath("sweep.json").read_text())["jobs"]
    p2 = run_train(root, "factorization=k6_12,k9_9", "model.n_intra=0,1", *SLURM, multirun=True)
    assert "4 of 4 members already finished" in p2.stderr + p2.stdout
    assert "submitted job" not in p2.stderr + p2.stdout  # the launcher logs every job it submits
    assert json.loads(next((root / "sweeps").iterdir()).joinpath("sweep.json").read_text())["jobs"] == jobs_before
    assert len(client.search_runs([exp.experiment_id])) == 5  # 1 parent + 4 members, nothing new


@pytest.mark.slow
def test_preempted_member_resumes_with_uninterrupted_result(tmp_path):
    long = ["stage=tokenizer", "trainer.tokenizer.steps=40", "trainer.tokenizer.ckpt_every=5"]
    ref_root, root = tmp_path / "ref", tmp_path / "slurm"
    ref_root.mkdir(), root.mkdir()
    run_train(ref_root, *long)
    (ref_dir,) = [d for d in (ref_root / "runs" / "tokenizer").iterdir() if d.is_dir()]
    ref = load_ckpt(ref_dir)

    proc = subprocess.Popen(train_cmd(root, *long, "quantizer=lfq", *SLURM, multirun=True), cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((root / "runs" / "tokenizer").glob("*/checkpoint.pt")):
        time.sleep(0.2)
    (rd,) = [d for d in (root / "runs" / "tokenizer").iterdir() if d.is_dir()]
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "running", st
    job = st["slurm_job_id"]
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM now, the job runs again later
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    got = load_ckpt(rd)
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "finished" and got["step"] == 40
    for k in ("model", "disc", "lecam"):
        assert_same_weights(ref[k], got[k])
    assert "resuming tokenizer" in "".join(p.read_text() for p in (root / "submitit").rglob("*_log.*"))
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(st["mlflow_run_id"])
    assert run.info.status == "FINISHED"
