"""A diverged run ends `diverged` (exit 1), keeps its last good checkpoint, and is never used as a tokenizer."""
from __future__ import annotations

import json
import math

import torch

from conftest import load_ckpt, run_train


def test_nan_loss_ends_the_run_diverged_and_no_ar_trains_on_it(root):
    # lr 1e6 blows the tokenizer up within a few steps; checkpoints every 2 steps
    p = run_train(root, "trainer.tokenizer.lr=1e6", "trainer.tokenizer.steps=12", check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "max_nonfinite_steps" in errors[0], p.stderr[-2000:]
    (rd,) = [d for d in (root / "runs" / "tokenizer").iterdir() if d.is_dir()]
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "diverged", st
    if (rd / "checkpoint.pt").exists():  # the last checkpoint on disk is a good one
        ck = load_ckpt(rd)
        assert ck["step"] < 12 and all(torch.isfinite(t).all() for t in ck["model"].values())
    assert not (root / "runs" / "ar").exists() or not any((root / "runs" / "ar").iterdir())
    # running it again does not mark it finished or train an AR on it
    p = run_train(root, "trainer.tokenizer.lr=1e6", "trainer.tokenizer.steps=12", check=False)
    assert p.returncode == 1 and json.loads((rd / "status.json").read_text())["state"] == "diverged"
    assert all(math.isfinite(v) for k, v in st.get("metrics", {}).items() if k == "train/loss")
