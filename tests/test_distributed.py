"""Two CPU processes (gloo; torchrun for the tokenizer, accelerate launch for the AR) give the loss curve of one
process with the same global batch.

Conditions, stated rather than hidden: dropout off (each rank draws its own masks), and for the tokenizer the GAN
off (BatchNorm in the PatchGAN normalizes each rank's half batch; SyncBatchNorm has no CPU kernel), and the LFQ
codebook entropy all-reduced (quantizer.codebook_entropy=global; the original's `local` is per process, so 2 ranks
optimize another objective than 1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import mlflow
import numpy as np
import pytest

from conftest import train_cmd

NO_DROPOUT = ["model.embed_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0", "model.class_dropout=0"]


def _run(root, *ov, procs: int, launcher: str = "torchrun"):
    _wait(_start(root, *ov, procs=procs, launcher=launcher))


def _start(root, *ov, procs: int, launcher: str = "torchrun") -> subprocess.Popen:
    cmd = train_cmd(root, *ov)
    if procs > 1 and launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] + cmd[1:]
    elif procs > 1:  # accelerate's --cpu runs ONE process; --multi_gpu with gloo gives real CPU processes
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] + cmd[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it while the other run is awaited
    p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    p.log = log
    return p


def _wait(*procs: subprocess.Popen) -> None:
    """Runs in separate roots are independent: started together, they overlap their start-up (1 thread each)."""
    try:
        for p in procs:
            p.wait(timeout=600)
            if p.returncode != 0:
                p.log.seek(0)
                raise AssertionError(p.log.read()[-4000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _member_run(root, stage: str):
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(f"magvit2-{stage}")
    (run,) = client.search_runs([exp.experiment_id], "tags.`magvit2.kind` = 'member'")  # not a sweep's parent
    return client, run


def _curve(root, stage: str, key: str) -> list[float]:
    client, run = _member_run(root, stage)
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def _world_size(root, stage: str) -> int:
    return int(_member_run(root, stage)[1].data.tags["magvit2.world_size"])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    tok = ["stage=tokenizer", "tokenizer.loss.disc_start=1000", "quantizer.codebook_entropy=global"]
    _wait(_start(one, *tok, procs=1), _start(two, *tok, procs=2))
    assert (_world_size(one, "tokenizer"), _world_size(two, "tokenizer")) == (1, 2)
    for key in ("train/loss", "train/rec_l1", "train/entropy_codebook"):
        a, b = _curve(one, "tokenizer", key), _curve(two, "tokenizer", key)
        assert len(a) == len(b) == 6
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=key)

    # AR on the same (1-process) tokenizer: copy its run dir so both sides read identical tokens
    shutil.rmtree(two / "runs"), shutil.copytree(one / "runs", two / "runs")
    _wait(_start(one, *tok[1:], *NO_DROPOUT, procs=1),
          _start(two, *tok[1:], *NO_DROPOUT, procs=2, launcher="accelerate"))
    assert (_world_size(one, "ar"), _world_size(two, "ar")) == (1, 2)
    for key in ("train/loss", "train/loss_1", "train/loss_2"):
        a, b = _curve(one, "ar", key), _curve(two, "ar", key)
        assert len(a) == len(b) == 6
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=key)
