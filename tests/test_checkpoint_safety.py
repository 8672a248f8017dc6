"""Issue 11.1: a checkpoint file must never run code. Every checkpoint is loaded with weights_only=True, so the RNG
state magvit2 stores is tensors + plain values; a crafted pickle is refused before any of it runs, with one line
naming the file and the setting."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from conftest import run_train
from magvit2.errors import ConfigError
from magvit2 import checkpoint


class _Payload:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil(path, marker, fmt: str):
    if fmt == "torch":  # torch.save's zip format, as a real checkpoint.pt
        torch.save({"model": {"w": torch.zeros(1)}, "ema": _Payload(marker), "step": 6}, path)
    else:  # a bare pickle stream: torch.load's legacy path unpickles it too
        with open(path, "wb") as f:
            pickle.dump(_Payload(marker), f)
    return path


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_crafted_tokenizer_checkpoint_is_refused_unrun(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / "evil.pt", marker, fmt)
    p = run_train(tmp_path, f"tokens.tokenizer={evil}", check=False, timeout=300)
    out = p.stdout + p.stderr
    assert not marker.exists(), "the checkpoint's payload ran"
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert f"tokens.tokenizer={evil}" in errors[0] and "refused" in errors[0], errors[0]
    if fmt == "torch":
        assert "os.system" in errors[0] or "posix.system" in errors[0], errors[0]  # says what it would have run


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in the Python state, the part easiest to lose
    np.random.randn()
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3).tolist()) \
        == expected


def test_old_format_checkpoint_is_refused_with_what_to_do(tmp_path):
    """Before the fix the RNG state was pickled numpy/Python objects; such a file is refused, not half-loaded."""
    old = {"model": {"w": torch.zeros(1)}, "step": 2,
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError) as e:
        checkpoint.load(tmp_path / "checkpoint.pt", f"run dir {tmp_path}", "delete the run dir to train it again")
    msg = str(e.value)
    assert str(tmp_path / "checkpoint.pt") in msg and "refused" in msg and "delete the run dir" in msg, msg
    assert "\n" not in msg
