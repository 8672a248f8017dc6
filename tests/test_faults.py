"""Hostile inputs and faults: unreadable checkpoints, a full disk, a read-only root, an MLflow server that dies and
comes back in the middle of a run."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, assert_same_weights, load_ckpt, run_train, train_cmd
from magvit2 import checkpoint
from magvit2.errors import ConfigError
from magvit2.runs import RunDir

TOK = ["stage=tokenizer", "data.train_size=8"]


def _tok_dir(root: Path) -> Path:
    (d,) = [p for p in (root / "runs" / "tokenizer").iterdir() if p.is_dir()]
    return d


def _cfg(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    import magvit2.train  # noqa: F401 - registers the config's resolvers
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *TINY, *TOK, *overrides], return_hydra_config=False)


# -------------------------------------------------------------------------------------- unreadable checkpoints
def test_unreadable_files_name_the_file_the_setting_and_why(tmp_path):
    torch.save({"model": {"w": torch.randn(500)}}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    for name, why in (("half.pt", "truncated"), ("notes.pt", "not a torch checkpoint")):
        with pytest.raises(ConfigError) as e:
            checkpoint.load(tmp_path / name, "tokens.tokenizer", "give a tokenizer checkpoint")
        msg = str(e.value)
        assert msg.startswith("tokens.tokenizer:") and str(tmp_path / name) in msg and why in msg, msg
        assert "never as code" not in msg and "\n" not in msg, msg  # nothing was refused for code here


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    rd = RunDir(tmp_path / "r")
    for step in (2, 4):
        rd.save(step, {"model": {"w": torch.full((3,), float(step))}})
    data = rd.checkpoint.read_bytes()
    rd.checkpoint.write_bytes(data[: len(data) // 2])  # a crash or disk error mid-write
    ckpt = rd.load_resume()
    assert ckpt["step"] == 2 and torch.equal(ckpt["model"]["w"], torch.full((3,), 2.0))
    assert rd.load_rng(0, ckpt) is not None and rd.rng(0, 2).exists()  # its RNG file was kept with it
    rd.set_aside_unreadable()  # the next save must not rotate the unreadable file into checkpoint.prev.pt
    assert rd.load()["step"] == 2 and (rd.path / "checkpoint.corrupt.pt").exists()
    rd.prev_checkpoint.unlink(missing_ok=True)
    rd.checkpoint.write_bytes(b"")
    with pytest.raises(ConfigError, match="checkpoint.pt"):  # none loads: the newest one is named
        rd.load_resume()


def _kill_after_two_checkpoints(root: Path, *overrides: str) -> None:
    proc = subprocess.Popen(train_cmd(root, *overrides), cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "2"})
    deadline = time.time() + 300
    while not list((root / "runs" / "tokenizer").glob("*/checkpoint.prev.pt")) and time.time() < deadline:
        time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail("the run ended before it had two checkpoints (no checkpoint.prev.pt is kept)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_truncated_checkpoint_resumes_from_the_previous_one(tmp_path):
    tok = [*TOK, "trainer.tokenizer.steps=10"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    run_train(a, *tok)
    ref = load_ckpt(_tok_dir(a))
    _kill_after_two_checkpoints(b, *tok)
    rd = _tok_dir(b)
    prev = torch.load(rd / "checkpoint.prev.pt", weights_only=True)["step"]
    data = (rd / "checkpoint.pt").read_bytes()
    (rd / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    p = run_train(b, *tok)
    out = p.stdout + p.stderr
    assert "from checkpoint.prev.pt" in out and f"resuming tokenizer {rd.name} at step {prev}" in out, out[-3000:]
    got = load_ckpt(rd)
    assert got["step"] == 10
    for k in ("model", "disc", "lecam"):
        assert_same_weights(ref[k], got[k])
    assert_same_weights(ref["ema"]["shadow"], got["ema"]["shadow"])
    assert not (rd / "checkpoint.prev.pt").exists() and [f.name for f in rd.glob("rng-*")] == ["rng-0-10.pt"]


# ------------------------------------------------------------------------------------------------------ disk full
def _enospc_after(monkeypatch, n_ok: int):
    """torch.save writes half a file, then fails with ENOSPC, from its (n_ok + 1)-th call on."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) <= n_ok:
            return real(obj, f, *a, **k)
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)


def test_disk_full_names_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "r")
    rd.save(2, {"model": {"w": torch.zeros(3)}})
    _enospc_after(monkeypatch, 1)  # the RNG file of step 4 is written, its checkpoint is not
    with pytest.raises(ConfigError) as e:
        rd.save(4, {"model": {"w": torch.ones(3)}})
    msg = str(e.value)
    assert str(rd.checkpoint) in msg and "no space left" in msg and "paths.root" in msg and "MAGVIT2_ROOT" in msg
    assert "\n" not in msg
    assert not [p.name for p in rd.path.iterdir() if ".tmp-" in p.name]
    assert rd.load_resume()["step"] == 2  # the checkpoints on disk are as they were


def test_stale_temp_files_of_a_killed_writer_go_when_the_run_dir_is_opened(tmp_path):
    from magvit2.runtime.context import RunContext
    cfg = _cfg(tmp_path)
    ctx = RunContext(cfg, "tokenizer")
    ctx.run.path.mkdir(parents=True)
    stale = ctx.run.path / ".checkpoint.pt.tmp-99999-abcd"  # a SIGKILLed writer's half-written checkpoint
    stale.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    keep = ctx.run.path / "status.json"
    keep.write_text('{"state": "partial", "step": 0, "metrics": {}}')
    assert ctx.acquire() is None
    try:
        assert not stale.exists() and keep.exists()
    finally:
        ctx.close("KILLED")


@pytest.mark.slow
def test_disk_full_in_a_run_is_one_line_and_the_run_is_failed(tmp_path):
    """ENOSPC injected into the second checkpoint of a real run: exit 2, one line naming the file and paths.root,
    status.json and the MLflow run failed, no temp file left."""
    inject = (
        "import errno, os, sys, runpy, torch\n"
        "real, n = torch.save, [0]\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and 'model' in obj:\n"
        "        n[0] += 1\n"
        "        if n[0] == 2:\n"
        "            f.write(b'PK' + bytes(1000)); raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "sys.argv = ['magvit2.train'] + sys.argv[1:]\n"
        "runpy.run_module('magvit2.train', run_name='__main__')\n")
    cmd = [sys.executable, "-c", inject] + train_cmd(tmp_path, *TOK)[3:]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint.pt" in errors[0] and "paths.root" in errors[0], out[-3000:]
    rd = _tok_dir(tmp_path)
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "failed" and "no space left" in st["error"]
    assert not [f.name for f in rd.iterdir() if ".tmp-" in f.name]
    import mlflow
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(st["mlflow_run_id"])
    assert run.info.status == "FAILED"


# ------------------------------------------------------------------------------------------------- read-only root
@pytest.fixture
def read_only(tmp_path):
    """(writable dir, its read-only bind mount)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir(), ro.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a read-only bind mount needs mount permission (root, CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield src, ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.slow
def test_finished_runs_are_read_from_a_read_only_root(read_only, tmp_path, capsys):
    src, ro = read_only
    run_train(src, *TOK, "trainer.tokenizer.steps=2")
    sig = _tok_dir(src).name
    from magvit2.runs import SweepDir
    row = {"member": "m0", "overrides": [], "stage": "tokenizer", "signature": sig, "steps": 2,
           "run_dir": str(ro / "runs" / "tokenizer" / sig)}
    SweepDir.of(src, "s1").write("s1", [], [row], "", "", "local", "")
    with pytest.raises(OSError):
        (ro / "probe").write_text("x")  # really read-only, for root too

    # finding and reading finished runs, the sweep table
    assert RunDir.find(ro / "runs", "tokenizer", sig) is not None
    assert [r.signature for r in RunDir.finished_runs(ro / "runs", "tokenizer")] == [sig]
    from magvit2.sweep.status import main as status_main
    assert status_main(["status", "s1", "--root", str(ro)]) == 0
    assert "finished" in capsys.readouterr().out
    # a training command that finds the run finished reads it without its lock
    from magvit2.runtime.context import RunContext
    ctx = RunContext(_cfg(ro, "trainer.tokenizer.steps=2"), "tokenizer")
    assert ctx.signature == sig and ctx.acquire()["state"] == "finished"

    # training on it: one line naming paths.root, exit 2
    p = run_train(ro, *TOK, check=False, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "paths.root" in errors[0] and str(ro) in errors[0], out[-3000:]


# ----------------------------------------------------------------------------------------------- MLflow outage
@pytest.mark.slow
def test_a_run_outlives_an_mlflow_server_restart(tmp_path):
    """The server is killed a few steps into a run and started again: the run does not wait for it, finishes in
    bounded time, and every step's metrics and its final status reach the MLflow run."""
    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer
    steps = 16
    with MlflowServer(tmp_path / "srv") as srv:
        root = tmp_path / "root"
        root.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "2", "MLFLOW_TRACKING_URI": srv.url, "MAGVIT2_MLFLOW_PROBE_S": "3"}
        t0 = time.monotonic()
        proc = subprocess.Popen(train_cmd(root, *TOK, f"trainer.tokenizer.steps={steps}",
                                          "trainer.tokenizer.ckpt_every=8"),
                                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = MlflowClient(srv.url)
        deadline = time.monotonic() + 180
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            st = RunDir(next(iter((root / "runs" / "tokenizer").glob("*/status.json")), root / "x/y").parent
                        ).read_status()
            run_id = st.get("mlflow_run_id")
            if run_id and len(client.get_metric_history(run_id, "train/rec_l1")) >= 3:
                break
            time.sleep(0.5)
        else:
            proc.kill()
            pytest.fail(f"the run did not start logging: {proc.communicate()[0][-3000:]}")
        rd = RunDir(_tok_dir(root))
        srv.stop()
        killed, at_kill = time.monotonic(), rd.read_status()["step"]
        while time.monotonic() - killed < 12 and proc.poll() is None:  # steps go on with no server at all
            time.sleep(0.5)
        progressed = rd.read_status()["step"] - at_kill
        threading.Thread(target=srv.start).start()
        out = proc.communicate(timeout=300)[0]
        took = time.monotonic() - t0
        print(f"run done {took:.1f} s after start, {time.monotonic() - killed:.1f} s after the server was killed")
        assert proc.returncode == 0, out[-4000:]
        assert progressed >= 2 or proc.poll() is not None and rd.finished(), f"blocked at step {at_kill}"
        assert took < 90, f"the run waited on the dead server: {took:.1f} s\n" + "\n".join(l for l in out.splitlines() if "it/s" not in l and "s/it" not in l)[-6000:]
        while srv.proc is None or time.monotonic() - killed < 10:  # the restart thread may still be starting it
            time.sleep(0.2)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        hist = sorted(h.step for h in client.get_metric_history(run_id, "train/rec_l1"))
        assert hist == list(range(1, steps + 1)), hist
        assert not (_tok_dir(root) / "metrics.jsonl").exists()  # the spool was sent
