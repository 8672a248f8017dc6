"""magvit2.runs.RunDir in process: its paths, the atomic checkpoint + RNG save and its load, status, finding
finished runs."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from magvit2.errors import ConfigError
from magvit2.runs import RunDir, atomic_write_text, slurm_job_id


def test_paths_follow_the_layout(tmp_path):
    rd = RunDir(tmp_path / "runs" / "ar" / "abc123")
    assert (rd.stage, rd.signature) == ("ar", "abc123")
    assert rd.checkpoint == rd.path / "checkpoint.pt" and rd.status == rd.path / "status.json"
    assert rd.config == rd.path / "config.yaml" and rd.results == rd.path / "results.json"
    assert rd.rng(1, 4) == rd.path / "rng-1-4.pt"
    assert rd.lock().path == tmp_path / "runs" / "ar" / "abc123.lock"


def test_save_then_load_round_trips_weights_and_rng(tmp_path):
    rd = RunDir(tmp_path / "r")
    w = torch.randn(3, 4)
    for step in (2, 4):
        random.random(), np.random.rand(), torch.rand(1)
        rd.save(step, {"model": {"w": w * step}})
    expected = (random.random(), np.random.rand(), torch.rand(2).tolist())
    ckpt = rd.load()
    assert ckpt["step"] == 4 and ckpt["signature"] == "r" and torch.equal(ckpt["model"]["w"], w * 4)
    # the last two checkpoints are kept (a resume falls back to the older one), each with its RNG file
    assert sorted(p.name for p in rd.path.glob("rng-*")) == ["rng-0-2.pt", "rng-0-4.pt"]
    assert torch.load(rd.prev_checkpoint, weights_only=True)["step"] == 2
    assert not [p for p in rd.path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    from magvit2.checkpoint import set_rng_state
    set_rng_state(rd.load_rng(0, ckpt))
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == expected
    assert rd.read_status()["state"] == "running" and rd.read_status()["step"] == 4
    set_rng_state(rd.load_rng(3, ckpt))  # a rank without its file resumes with rank 0's state (in the checkpoint)
    rd.save(6, {"model": {"w": w * 6}})
    assert sorted(p.name for p in rd.path.glob("rng-*")) == ["rng-0-4.pt", "rng-0-6.pt"]  # older steps' go
    rd.prune(0)  # a finished run keeps its final checkpoint alone
    assert sorted(p.name for p in rd.path.glob("rng-*")) == ["rng-0-6.pt"] and not rd.prev_checkpoint.exists()


def test_load_refuses_code(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    torch.save({"x": np.zeros(2)}, rd.checkpoint)  # a numpy array needs the unpickler to run code
    with pytest.raises(ConfigError, match="refused"):
        rd.load()


def test_status_defaults_and_updates(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "r")
    assert rd.read_status() == {"state": "new", "step": 0, "metrics": {}} and rd.finished() is None
    rd.path.mkdir()
    rd.checkpoint.write_bytes(b"")
    assert rd.read_status()["state"] == "partial"
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm_job_id() == "10_2"
    rd.write_status(state="running", step=3)
    st = rd.write_status(metrics={"a": 1.0})  # fields merge into what is there
    assert (st["state"], st["step"], st["metrics"], st["slurm_job_id"]) == ("running", 3, {"a": 1.0}, "10_2")
    assert rd.read_status() == st


def test_find_finished_runs(tmp_path):
    runs = tmp_path / "runs"
    for sig, state in (("a", "finished"), ("b", "running"), ("c", "finished")):
        RunDir(runs / "tokenizer" / sig).write_status(state=state)
    assert RunDir.find(runs, "tokenizer", "a").path == runs / "tokenizer" / "a"
    assert RunDir.find(runs, "tokenizer", "b") is None and RunDir.find(runs, "tokenizer", "zz") is None
    assert [r.signature for r in RunDir.finished_runs(runs, "tokenizer")] == ["a", "c"]
    assert RunDir.finished_runs(runs, "ar") == []


def test_atomic_write_text_replaces_whole(tmp_path):
    p = tmp_path / "d" / "f.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [x.name for x in p.parent.iterdir()] == ["f.json"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_open_s_permissions_not_mkstemp_s_0600(tmp_path, mask):
    from magvit2.metrics import export_adm_npz
    from magvit2.tempfiles import umask
    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write_text(tmp_path / "status.json", "{}")
        export_adm_npz(np.zeros((1, 2, 2, 3), np.uint8), tmp_path / "samples.npz")
        (tmp_path / "plain.txt").write_text("")  # what open() gives under this umask
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["status.json", "samples.npz", "plain.txt"], 0o666 & ~mask), modes


def test_auto_tokenizer_is_found_never_trained(tmp_path):
    """Resolving tokens.tokenizer=auto only finds: with the tokenizer's run dir gone (e.g. sampling an AR run whose
    tokenizer was deleted) it is a ConfigError saying what to do, not a training run."""
    from hydra import compose, initialize_config_dir

    import magvit2.train  # noqa: F401  (resolvers)
    from magvit2 import config as C
    from magvit2.stages.resolve import checkpoint_path
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", [f"paths.root={tmp_path}"])
    with pytest.raises(ConfigError, match="tokens.tokenizer=auto: no finished tokenizer run"):
        checkpoint_path(cfg)
    assert not (tmp_path / "runs").exists()
    tok = RunDir(C.run_dir(cfg, "tokenizer"))
    tok.write_status(state="finished")
    assert checkpoint_path(cfg) == (tok.checkpoint, f"auto:{C.tokenizer_signature(cfg)}")


def test_checkpoint_state_is_the_stage_s_keys_in_order_and_restores_them():
    from magvit2.runs import Ckpt
    model, opt_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(opt_model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = Ckpt.state("ar", sched=sched, model=model, opt=opt)
    assert list(state) == list(Ckpt.STATE["ar"]) == ["model", "opt", "sched"]
    with pytest.raises(KeyError, match="ar checkpoint parts"):  # a part left out is a bug, not a checkpoint
        Ckpt.state("ar", model=model, opt=opt)
    other = torch.nn.Linear(2, 2)
    Ckpt.restore(state, model=other)
    assert torch.equal(other.weight, model.weight)


def test_sweep_json_keeps_earlier_jobs_and_axes_on_resubmission(tmp_path):
    from magvit2.runs import SweepDir
    sd = SweepDir.of(tmp_path, "s1")
    row = {"member": "m0", "overrides": ["a=1"], "stage": "ar", "signature": "x", "run_dir": "/r/x", "state": "new"}
    sd.write("s1", ["a=1,2"], [row], "p1", "h1", "slurm", "file:/m", {"a": ["1", "2"]})
    sd.record_jobs({"/r/x": "17_0"})
    sd.write("s1", ["a=1,2"], [row], "p1", "h2", "slurm", "file:/m")
    doc = sd.read()
    assert sd.file == tmp_path / "sweeps" / "s1" / "sweep.json" and SweepDir.under(tmp_path)[0].id == "s1"
    assert doc["jobs"] == {"/r/x": "17_0"} and doc["axes"] == {"a": ["1", "2"]} and doc["hydra_dirs"] == ["h1", "h2"]
    assert doc["members"] == [{k: v for k, v in row.items() if k != "state"}]  # what a member is, not its state
