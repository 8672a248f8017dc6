"""Loading checkpoint files safely: a checkpoint is data, never code.

Every checkpoint is read with torch.load(weights_only=True): a pickle that names anything but tensors and plain
values (a `__reduce__` calling os.system, a numpy array, an old-format RNG state) is refused before any of it runs.
The RNG state magvit2 stores is tensors + plain numbers for this reason (rng_state below).
"""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from magvit2.errors import ConfigError

RNG_FORMAT = 2  # 1 (unversioned): pickled Python/numpy objects, refused by weights_only loading


def load(path, setting: str, fix: str) -> dict:
    """torch.load(path, weights_only=True) or a ConfigError naming `setting` (what pointed at the file), why the
    file was refused, and `fix` (what to do about it)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of hand-made files; the error says more
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is reported the same way, with its reason
        reason = _reason(e)
        if reason.startswith(("it would run code", "not a plain-tensor")) or "Weights only load failed" in str(e):
            raise ConfigError(f"{setting}: {path} was refused unread ({reason}): checkpoints are loaded as tensors "
                              f"and plain values only, never as code; {fix}") from e
        raise ConfigError(f"{setting}: {path} is not a loadable checkpoint ({_unreadable(path, e)}); {fix}") from e


def check_finite(sd: dict, where: str) -> None:
    """Refuse weights with NaN / inf: a NaN tokenizer quantizes every latent to bit 0 (all tokens 0) and an AR
    trained on them ends `finished` with black samples, so the file is refused by name instead."""
    for key, t in sd.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() and \
                not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"{where}: tensor {key!r} has {n} non-finite values (NaN/inf) of {t.numel()}: the "
                              f"weights are broken (a diverged run, a bad conversion); give another file")


_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # torch.save's zip format; the legacy (pre-1.6) pickle format


def _unreadable(path: Path, e: Exception) -> str:
    """Why a file that is not refused for code still does not load: missing, empty, truncated, not a checkpoint."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as oe:
        return f"cannot be read: {oe.strerror or oe}"
    detail = _reason(e).removeprefix("not a readable torch checkpoint: ")
    if size == 0:
        return "an empty file (0 bytes): a write that never finished"
    if head.startswith(_ZIP) or head.startswith(_PICKLE):
        return (f"truncated or damaged: a torch checkpoint of {size} bytes that ends early or is corrupt, e.g. from a "
                f"crash or a full disk while it was written ({detail[:160]})")
    return f"not a torch checkpoint: {size} bytes starting with {head[:12]!r} ({detail[:120]})"


def _reason(e: Exception) -> str:
    text = str(e)
    # torch's message names the object it would have built
    m = re.search(r"unsupported (?:global:\s*)?GLOBAL (\S+)", text, re.I)
    if m:
        return f"it would run code to build {m.group(1)}"
    m = re.search(r"^\s*(Unsupported [^\n]+)", text, re.M)
    if m:
        return f"not a plain-tensor checkpoint: {m.group(1).strip().lower()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a readable torch checkpoint: {type(e).__name__}{': ' + first[:200] if first else ''}"


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers only, so checkpoints load with torch.load(weights_only=True)
    (a pickled numpy array or Python object would need the unpickler to run code)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"format": RNG_FORMAT,
          "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                     "gauss": None if gauss is None else float(gauss)},
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    if not isinstance(st, dict) or st.get("format") != RNG_FORMAT:
        raise ValueError(f"RNG state of an unknown format ({type(st).__name__}): written by another magvit2 version")
    py, npy = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
