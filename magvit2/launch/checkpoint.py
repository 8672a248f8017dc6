"""Loading checkpoint files safely: a checkpoint is data, never code.

Every checkpoint is read with torch.load(weights_only=True): a pickle that names anything but tensors and plain
values (a `__reduce__` calling os.system, a numpy array, an old-format RNG state) is refused before any of it runs.
The RNG state magvit2 stores is tensors + plain numbers for this reason (magvit2.launch.dist.rng_state).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from magvit2.config import ConfigError


def load(path, setting: str, fix: str) -> dict:
    """torch.load(path, weights_only=True) or a ConfigError naming `setting` (what pointed at the file), why the
    file was refused, and `fix` (what to do about it)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of hand-made files; the error says more
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is reported the same way, with its reason
        raise ConfigError(f"{setting}: {path} was refused unread ({_reason(e)}): checkpoints are loaded as tensors "
                          f"and plain values only, never as code; {fix}") from e


def _reason(e: Exception) -> str:
    text = str(e)
    m = re.search(r"unsupported (GLOBAL \S+)", text, re.I)  # torch's message names the object it would have built
    if m:
        return f"it would run code to build {m.group(1).replace('GLOBAL ', '')}"
    m = re.search(r"^\s*(Unsupported [^\n]+)", text, re.M)
    if m:
        return f"not a plain-tensor checkpoint: {m.group(1).strip().lower()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a readable torch checkpoint: {type(e).__name__}{': ' + first[:200] if first else ''}"
