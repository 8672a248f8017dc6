"""Sweeps on the real local SLURM through `hydra/launcher=slurm`: every member finishes, logs and checkpoints;
a second submission trains nothing; a detached sweep is reconnected to by `magvit2.sweep status`; a member with two
tasks is one process group; a preempted member (scontrol requeue, or the USR2 that submitit handles) resumes and ends
with the uninterrupted weights."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from conftest import BackgroundTrain, assert_same_weights, load_ckpt, run_train, train_cmd
from test_distributed import _curve
from test_slurm_cluster import slurm_cluster  # noqa: F401  (starts the cluster)

pytestmark = pytest.mark.slurm
SLURM = ["hydra/launcher=slurm", "hydra.launcher.timeout_min=15", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # members of 1 CPU each (--export=ALL); 2 threads each would oversubscribe


def _status(root: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs" / stage).glob("*/status.json"))]


def test_2x2_sweep_on_slurm_then_resubmission_trains_nothing(root):
    p = run_train(root, "factorization=k6_12,k9_9", "model.n_intra=0,1", *SLURM, multirun=True, env=ONE_THREAD)
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
    # the job tag is the array form the status table shows (18_0), as status.json records it
    assert sorted(r.data.tags["magvit2.slurm_job_id"] for r in kids) == sorted(s["slurm_job_id"] for s in st)
    assert all("_" in s["slurm_job_id"] for s in st)
    # the shared tokenizer: named for what it is, no empty parent run left RUNNING in its experiment
    (tok_dir,) = [d for d in (root / "runs" / "tokenizer").iterdir() if d.is_dir()]
    tok_runs = client.search_runs([client.get_experiment_by_name("magvit2-tokenizer").experiment_id])
    assert [r.info.run_name for r in tok_runs] == [f"tokenizer tiny-lfq {tok_dir.name}"]
    assert "mlflow.parentRunId" not in tok_runs[0].data.tags
    # the blocking sweep's summary, on the console and on the parent run
    out = p.stdout + p.stderr
    assert "by val/loss" in out and "no claim" in out and "device-hours" in out and "over 5 runs" in out, out[-3000:]
    sweep_doc = json.loads(next((root / "sweeps").iterdir()).joinpath("sweep.json").read_text())
    summary = client.get_run(sweep_doc["parent_run_id"])
    assert summary.data.tags["magvit2.best.metric"] == "val/loss" and summary.data.metrics["sweep/device_hours"] > 0
    assert "factorization = k6_12, k9_9 x model.n_intra = 0, 1" in summary.data.tags["mlflow.note.content"]
    assert {"results.csv", "results.md"} <= {a.path for a in client.list_artifacts(sweep_doc["parent_run_id"])}

    # the status command reconnects from the sweep id alone
    sid = next(iter((root / "sweeps").iterdir())).name
    out = subprocess.run([sys.executable, "-m", "magvit2.sweep", "status", sid, "--root", str(root)],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("finished") >= 4 and "k9_9" in out and "n_intra=1" in out
    parent = json.loads(next((root / "sweeps").iterdir()).joinpath("sweep.json").read_text())["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"

    jobs_before = json.loads(next((root / "sweeps").iterdir()).joinpath("sweep.json").read_text())["jobs"]
    p2 = run_train(root, "factorization=k6_12,k9_9", "model.n_intra=0,1", *SLURM, multirun=True, env=ONE_THREAD)
    assert "4 of 4 members already finished" in p2.stderr + p2.stdout
    assert "submitted job" not in p2.stderr + p2.stdout  # the launcher logs every job it submits
    assert json.loads(next((root / "sweeps").iterdir()).joinpath("sweep.json").read_text())["jobs"] == jobs_before
    assert len(client.search_runs([exp.experiment_id])) == 5  # 1 parent + 4 members, nothing new
    assert client.get_run(parent).info.status == "FINISHED"  # reopened by the resubmission, closed again


def _sweep_status(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magvit2.sweep", "status", *args, "--root", str(root)],
                          capture_output=True, text=True, timeout=600)


def _kill_job_step(job: str) -> None:
    """SIGKILL the member's python (no handler runs), as the OOM killer or a failing node would."""
    jid = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True).stdout.strip()
    out = subprocess.run(["scontrol", "listpids", jid], capture_output=True, text=True, check=True).stdout  # numeric id
    pids = [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()[2:3] == ["0"]]  # step 0
    assert pids, out
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_detached_sweep_status_reconnects_and_resubmits_only_dead_members(root):
    long = ["stage=tokenizer", "quantizer=lfq,vq", "trainer.tokenizer.steps=40", "trainer.tokenizer.ckpt_every=4",
            *SLURM, "hydra.launcher.detach=true"]
    p = run_train(root, *long, multirun=True, env=ONE_THREAD)
    out = p.stdout + p.stderr
    assert "submitted, not waiting" in out and "reconnect with: python -m magvit2.sweep status" in out, out[-3000:]
    (sweep_dir,) = (root / "sweeps").iterdir()
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(doc["jobs"]) == 2 and set(doc["jobs"]) == {m["run_dir"] for m in doc["members"]}
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_run(doc["parent_run_id"]).info.status == "RUNNING"  # nobody waits on it yet

    # both members train (2 CPUs, 1 each); stop one as scancel would, kill the other's process outright
    rd = {m["member"]: Path(m["run_dir"]) for m in doc["members"]}
    job = {m["member"]: doc["jobs"][m["run_dir"]] for m in doc["members"]}
    deadline = time.time() + 300
    while time.time() < deadline and not all((d / "checkpoint.pt").exists() for d in rd.values()):
        time.sleep(0.2)
    subprocess.run(["scancel", job["lfq"]], check=True)  # SIGTERM: checkpoint, "preempted", no requeue
    _kill_job_step(job["vq"])
    deadline = time.time() + 60
    s = _sweep_status(root, sweep_dir.name).stdout
    while time.time() < deadline and not ("stopped" in s and "died" in s):
        time.sleep(0.5)
        s = _sweep_status(root, sweep_dir.name).stdout
    rows = {line.split()[1]: line.split()[2] for line in s.splitlines() if line.split()[1:2] in (["lfq"], ["vq"])}
    assert rows == {"lfq": "stopped", "vq": "died"}, s

    # resubmitting runs exactly those two again; submitting once more while they run submits nothing
    p = run_train(root, *long, multirun=True, env=ONE_THREAD)
    assert (p.stdout + p.stderr).count("submitted job") == 2
    jobs2 = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert set(jobs2.values()).isdisjoint(job.values())
    p = run_train(root, *long, multirun=True, env=ONE_THREAD)
    assert "submitted job" not in p.stdout + p.stderr
    assert "2 members still queued or running as their earlier jobs" in p.stdout + p.stderr

    s = _sweep_status(root, sweep_dir.name[:6], "--wait", "--interval", "1", "--tail", "5", "--member", "1")
    assert s.returncode == 0, s.stdout + s.stderr
    assert "finished: 2" in s.stdout and "sweep ended: MLflow parent run FINISHED" in s.stdout
    assert client.get_run(doc["parent_run_id"]).info.status == "FINISHED"
    assert all(jid in s.stdout for jid in jobs2.values())
    # the end of member #1's own job logs (stdout, then stderr with the progress bar), not another task's
    parts = [p for p in s.stdout.split("\n--- ")[1:] if "(last 5 lines)" in p.splitlines()[0]]
    own = f"/submitit/{jobs2[doc['members'][1]['run_dir']]}/"
    assert len(parts) == 2 and all(own in p.splitlines()[0] for p in parts), s.stdout[-2000:]
    assert [p.splitlines()[0].rsplit(".", 1)[1].split()[0] for p in parts] == ["out", "err"]
    assert all(len(p.strip().splitlines()[1:]) == 5 for p in parts), s.stdout[-2000:]
    for d in rd.values():  # both resumed their checkpoints and ended in their first MLflow run
        st = json.loads((d / "status.json").read_text())
        assert st["state"] == "finished" and st["step"] == 40
        assert client.get_run(st["mlflow_run_id"]).data.tags["magvit2.n_resumes"] == "1"
    assert _sweep_status(root, "nosuchsweep").returncode != 0
    ls = subprocess.run([sys.executable, "-m", "magvit2.sweep", "list", "--root", str(root)], capture_output=True,
                        text=True, timeout=120)
    assert ls.returncode == 0 and sweep_dir.name in ls.stdout and "ended" in ls.stdout and "finished: 2" in ls.stdout


def test_sweep_cancel_scancels_unfinished_members_and_kills_the_parent_run(root):
    long = ["stage=tokenizer", "trainer.tokenizer.steps=2000", *SLURM, "hydra.launcher.detach=true"]
    run_train(root, *long, multirun=True, env=ONE_THREAD)
    (sweep_dir,) = (root / "sweeps").iterdir()
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    (job,) = doc["jobs"].values()
    c = subprocess.run([sys.executable, "-m", "magvit2.sweep", "cancel", sweep_dir.name[:6], "--root", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 0 and f"cancelled 1 job(s): {job}" in c.stdout, c.stdout + c.stderr
    deadline = time.time() + 60
    while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", job.split("_")[0]], capture_output=True,
                                                     text=True).stdout.strip():
        time.sleep(0.5)
    assert not subprocess.run(["squeue", "-h", "-j", job.split("_")[0]], capture_output=True, text=True).stdout.strip()
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_run(doc["parent_run_id"]).info.status == "KILLED"


@pytest.mark.slow
def test_two_task_member_is_one_process_group_and_resumes_exactly(tmp_path):
    """tasks_per_node=2: submitit's env export + accelerate make one gloo group. USR2 mid-run reaches both ranks:
    both checkpoint at the same step boundary, rank 0 requeues, both resume; the result is bit for bit that of an
    uninterrupted 2-process torchrun (test_distributed shows 2 processes follow the 1-process curve)."""
    tok = ["stage=tokenizer", "tokenizer.loss.disc_start=1000", "trainer.tokenizer.steps=15",
           "trainer.tokenizer.ckpt_every=3"]  # USR2 after the step-3 checkpoint: 12 steps of margin
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # --export=ALL passes it on; other counts sum differently
    one_thread.pop("MLFLOW_TRACKING_URI", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ref_log = tempfile.TemporaryFile("w+")  # the reference trains alongside the SLURM member (separate roots)
    ref = subprocess.Popen(torchrun + train_cmd(one, *tok)[1:], cwd=one, env=one_thread, stdout=ref_log,
                           stderr=subprocess.STDOUT, text=True)
    try:
        proc = subprocess.Popen(train_cmd(two, *tok, *SLURM, "hydra.launcher.tasks_per_node=2", multirun=True),
                                cwd=two, env=one_thread, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and not list((two / "runs" / "tokenizer").glob("*/checkpoint.pt")):
            time.sleep(0.2)
        (st,) = _status(two, "tokenizer")
        assert st["state"] == "running", st
        subprocess.run(["scancel", "--signal=USR2", st["slurm_job_id"]], check=True)
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-4000:]
        ref.wait(timeout=400)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    ref_log.seek(0)
    assert ref.returncode == 0, ref_log.read()[-4000:]

    (st,) = _status(two, "tokenizer")
    assert st["state"] == "finished" and st["step"] == 15 and st["world_size"] == 2, st
    logs = "".join(p.read_text() for p in (two / "submitit").rglob("*_log.*"))
    assert "global_rank=0(2)" in logs and "global_rank=1(2)" in logs
    assert logs.count("caught SIGUSR2") == 2 and "this job is preempted" in logs and "resuming tokenizer" in logs
    (rd,) = [d for d in (two / "runs" / "tokenizer").iterdir() if d.is_dir()]
    assert sorted(f.name for f in rd.glob("rng-*")) == ["rng-0-15.pt", "rng-1-15.pt"]
    (ref_rd,) = [d for d in (one / "runs" / "tokenizer").iterdir() if d.is_dir()]
    ref, got = load_ckpt(ref_rd), load_ckpt(rd)
    for k in ("model", "disc"):
        assert_same_weights(ref[k], got[k])
    for key in ("train/loss", "train/rec_l1", "train/entropy_codebook"):
        a, b = _curve(one, "tokenizer", key), _curve(two, "tokenizer", key)
        assert len(a) == len(b) == 15 and a == b, key


LONG = ["stage=tokenizer", "trainer.tokenizer.steps=20", "trainer.tokenizer.ckpt_every=5"]  # signal after step 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference checkpoint of an uninterrupted local run, shared by both preemption tests: it trains in the
    background, alongside the first test's SLURM member, until a test asks for it (call the fixture's value)."""
    ref_root = tmp_path_factory.mktemp("ref")
    run, ckpt = BackgroundTrain(ref_root, *LONG), {}

    def get() -> dict:
        if not ckpt:
            run.finish()
            (ref_dir,) = [d for d in (ref_root / "runs" / "tokenizer").iterdir() if d.is_dir()]
            ckpt.update(load_ckpt(ref_dir))
        return ckpt

    yield get
    run.kill()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scontrol-requeue", "usr2"])
def test_preempted_member_resumes_with_uninterrupted_result(tmp_path, how, uninterrupted):
    """scontrol-requeue: SLURM sends SIGTERM and requeues. usr2: the signal submitit asks SLURM to send before the
    time limit; our checkpoint, then submitit's handler (launcher checkpoint(), scontrol requeue)."""
    long, root = LONG, tmp_path

    proc = subprocess.Popen(train_cmd(root, *long, "quantizer=lfq", *SLURM, multirun=True), cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((root / "runs" / "tokenizer").glob("*/checkpoint.pt")):
        time.sleep(0.2)
    (rd,) = [d for d in (root / "runs" / "tokenizer").iterdir() if d.is_dir()]
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "running", st
    job = st["slurm_job_id"]
    if how == "usr2":  # to the job step, where the python task runs (as --signal=USR2@... would)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM now, the job runs again later
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    ref = uninterrupted()
    got = load_ckpt(rd)
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "finished" and got["step"] == 20
    for k in ("model", "disc", "lecam"):
        assert_same_weights(ref[k], got[k])
    logs = "".join(p.read_text() for p in (root / "submitit").rglob("*_log.*"))
    assert "resuming tokenizer" in logs
    if how == "usr2":
        assert "caught SIGUSR2" in logs and "this job is preempted" in logs  # ours, then submitit's handler
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(st["mlflow_run_id"])
    assert run.info.status == "FINISHED"
