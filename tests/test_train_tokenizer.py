"""Stage I end to end through `python -m magvit2.train`: config, data errors, the loop, checkpoint, kill, resume."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, assert_same_weights, kill_after_first_checkpoint, load_ckpt, run_train
from magvit2.data.images import ImageFolder, PhotoCrops


def test_embedded_default_config():
    p = subprocess.run([sys.executable, "-m", "magvit2.train", "--cfg", "job"], cwd=REPO, capture_output=True,
                       text=True, check=True)
    cfg = yaml.safe_load(p.stdout)
    assert cfg["stage"] == "ar" and cfg["tokenizer"]["name"] == "tiny" and cfg["data"]["name"] == "photos"
    assert cfg["quantizer"]["_target_"] == "magvit2.quantizers.LFQ" and cfg["tokenizer"]["bits"] == 18
    assert cfg["factorization"]["bits"] == [6, 12] and cfg["model"]["name"] == "tiny"
    assert cfg["tokens"]["tokenizer"] == "auto"
    assert cfg["data"]["crops"] == "per_epoch" and cfg["tokens"]["name"] == "online"  # the original's data
    assert cfg["metrics"]["inception_weights"] is None  # offline: rFID/FID reported missing, never faked


def test_photo_crops_are_deterministic_and_split():
    tr = PhotoCrops(["astronaut", "coffee"], 16, 64, 10, "train", seed=0)
    va = PhotoCrops(["astronaut", "coffee"], 16, 64, 6, "val", seed=0)
    x, y = tr[3]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and y == 1
    assert torch.equal(tr[3][0], PhotoCrops(["astronaut", "coffee"], 16, 64, 10, "train", seed=0)[3][0])
    # train crops come from the top 3/4 of each photo, val crops from the bottom 1/4: no shared pixels
    for i in range(len(tr)):
        assert tr._box(tr.images[i % 2], i)[1] + 16 <= (tr.images[i % 2].height * 3) // 4
    for i in range(len(va)):
        assert va._box(va.images[i % 2], i)[1] >= (va.images[i % 2].height * 3) // 4


def test_imagefolder_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    tr, va = ImageFolder(str(tmp_path), 16, "train"), ImageFolder(str(tmp_path), 16, "val")
    assert len(tr) == 6 and len(va) == 6 and tr.classes == ["cat", "dog"]
    assert tr[4][0].shape == (3, 16, 16) and tr[4][1] == 1
    # val: shorter-side resize to 16 then center crop -> deterministic
    assert torch.equal(va[0][0], va[0][0])


@pytest.mark.parametrize("overrides,needle", [
    (["data=imagefolder"], "set path="),
    (["data=imagefolder", "path=/nonexistent/imagenet"], "data.path=/nonexistent/imagenet does not exist"),
    (["factorization=k9_9", "tokenizer.bits=16"], "tokenizer.bits=16"),
    (["trainer.tokenizer.precision=fp32"], "trainer.tokenizer.precision"),
])
def test_bad_settings_fail_with_one_clear_message(root, overrides, needle):
    p = run_train(root, *overrides, check=False, timeout=120, tiny=False)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_empty_image_folder_is_named(root):
    (root / "imgs" / "train" / "cls").mkdir(parents=True)
    p = run_train(root, "data=imagefolder", f"path={root / 'imgs'}", "stage=tokenizer", check=False, timeout=300,
                  tiny=False)
    assert p.returncode == 2 and "no images found" in p.stderr and "data.path=" in p.stderr, p.stderr[-2000:]


def _tok_run_dir(root: Path) -> Path:
    (d,) = [p for p in (root / "runs" / "tokenizer").iterdir() if p.is_dir()]
    return d


@pytest.mark.slow
def test_tokenizer_kill_and_resume_matches_uninterrupted(tmp_path, start_train):
    # 8 images of batch 4: a new epoch (new crops, data.crops=per_epoch) every 2 steps, also right after the resume
    tok = ["stage=tokenizer", "data.train_size=8"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    uninterrupted = start_train(a, *tok)  # a: the reference, alongside b (separate roots; start-up dominates)

    # b: SIGKILL (no chance to clean up) once the first checkpoint is on disk, then start again
    kill_after_first_checkpoint(b, "tokenizer", *tok)
    rd = _tok_run_dir(b)
    killed_at = load_ckpt(rd)["step"]
    assert 0 < killed_at < 6
    first_run = json.loads((rd / "status.json").read_text())["mlflow_run_id"]
    # as if the kill had come between the run's creation and its params: the resumed run must log them
    with sqlite3.connect(b / "mlflow.db") as db:
        db.execute("DELETE FROM params WHERE run_uuid = ?", (first_run,))
    p = run_train(b, *tok)
    assert "resuming tokenizer" in p.stderr + p.stdout
    uninterrupted.finish()
    ref = load_ckpt(_tok_run_dir(a))
    assert ref["step"] == 6
    got = load_ckpt(rd)
    assert got["step"] == 6
    assert [f.name for f in rd.glob("rng-*")] == ["rng-0-6.pt"]  # older steps' RNG files are gone
    for k in ("model", "disc", "lecam"):
        assert_same_weights(ref[k], got[k])
    assert_same_weights(ref["ema"]["shadow"], got["ema"]["shadow"])

    # the resumed run continued the same MLflow run, with the whole metric history and the eval results
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "finished" and st["mlflow_run_id"] == first_run
    client = mlflow.MlflowClient(f"sqlite:///{b}/mlflow.db")
    run = client.get_run(first_run)
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(first_run, "train/rec_l1")})
    assert steps == [1, 2, 3, 4, 5, 6]
    for k in ("eval/psnr", "eval/ssim", "eval/utilization", "eval/perplexity"):
        assert k in run.data.metrics
    assert 0 < run.data.metrics["eval/utilization"] <= 1
    assert "no Inception weights" in run.data.tags["magvit2.missing.eval/rfid"] or \
        "inception" in run.data.tags["magvit2.missing.eval/rfid"].lower()
    assert run.data.params["tokenizer.ch"] == "16" and run.data.params["choice.quantizer"] == "lfq"
    arts = {f.path for f in client.list_artifacts(first_run)}
    assert {"recon_grid.png", "config.yaml", "eval.json"} <= arts
    assert run.data.tags["magvit2.checkpoint"] == str(rd / "checkpoint.pt")

    # a third start trains nothing: the run is finished
    p = run_train(b, *tok)
    assert "already finished" in p.stderr + p.stdout


def test_bf16_and_gradient_accumulation_run(root):
    run_train(root, "stage=tokenizer", "trainer.tokenizer.steps=2", "trainer.tokenizer.grad_accum=2",
              "trainer.tokenizer.precision=bf16")
    st = json.loads((_tok_run_dir(root) / "status.json").read_text())
    assert st["state"] == "finished" and st["step"] == 2 and np.isfinite(st["metrics"]["eval/psnr"])


def test_lr_step_decay():
    from magvit2.stages.tokenizer import _step_decay
    f = _step_decay([10, 5])
    assert [f(s) for s in (0, 4, 5, 9, 10, 100)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_imagefolder_without_val_splits_without_overlap(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    tr = ImageFolder(str(tmp_path), 16, "train", val_fraction=0.2)
    va = ImageFolder(str(tmp_path), 16, "val", val_fraction=0.2)
    assert len(tr) == 16 and len(va) == 4 and not set(tr.items) & set(va.items)
