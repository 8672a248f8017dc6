"""Samples in the ADM evaluator's input format (openai/guided-diffusion evaluations/evaluator.py reads arr_0)."""
from __future__ import annotations

import os
import tempfile

import numpy as np


def export_adm_npz(images_uint8: np.ndarray, path: str | os.PathLike) -> None:
    """Write (N,H,W,3) uint8 images as np.savez(path, arr_0=images), atomically (temp file + os.replace)."""
    a = images_uint8
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"images_uint8: expected a uint8 NHWC array with 3 channels (N,H,W,3), got {desc}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append '.npz' to the name
            np.savez(f, arr_0=a)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
