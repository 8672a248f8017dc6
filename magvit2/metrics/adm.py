"""Samples in the ADM evaluator's input format (openai/guided-diffusion evaluations/evaluator.py reads arr_0)."""
from __future__ import annotations

import os
import zipfile

import numpy as np

from magvit2.tempfiles import mkstemp


def _nhwc3(a, name: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name}: expected a uint8 NHWC array with 3 channels (N,H,W,3), got {desc}")


def export_adm_npz(images_uint8: np.ndarray, path: str | os.PathLike) -> None:
    """Write (N,H,W,3) uint8 images as np.savez(path, arr_0=images) would, atomically."""
    _nhwc3(images_uint8, "images_uint8")
    with AdmNpzWriter(path, images_uint8.shape) as w:
        w.write(images_uint8)


class AdmNpzWriter:
    """Streams (n,H,W,3) uint8 chunks into `path` as the arr_0 of an npz that np.load reads as usual, so memory holds
    one chunk, not all N images (the paper's 50k samples at 256 px are 9.8 GB). The file appears, whole, only when
    exactly `shape[0]` images were written and the block ends without an error (temp file + os.replace)."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int, int]):
        if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
            raise ValueError(f"shape: expected (N,H,W,3) with N, H, W >= 1, got {tuple(shape)}")
        self.path, self.shape, self.n = os.fspath(path), tuple(int(s) for s in shape), 0

    def __enter__(self) -> "AdmNpzWriter":
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self._tmp = mkstemp(folder, ".tmp-", ".npz")  # readable as open() would make it, not 0600
        self._file = os.fdopen(fd, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)  # np.savez's layout
        self._entry = self._zip.open("arr_0.npy", "w", force_zip64=True)  # size unknown to zipfile up front
        np.lib.format.write_array_header_1_0(self._entry, {"descr": "|u1", "fortran_order": False,
                                                            "shape": self.shape})
        return self

    def write(self, chunk: np.ndarray) -> None:
        _nhwc3(chunk, "chunk")
        if chunk.shape[1:] != self.shape[1:] or self.n + len(chunk) > self.shape[0]:
            raise ValueError(f"chunk {chunk.shape} after {self.n} images does not fit the declared {self.shape}")
        self._entry.write(np.ascontiguousarray(chunk).data)
        self.n += len(chunk)

    def __exit__(self, kind, err, tb) -> None:
        try:
            self._entry.close()
            self._zip.close()  # writes the zip's central directory
            if kind is None:
                self._file.flush()
                os.fsync(self._file.fileno())  # on disk before the rename makes it the file
            self._file.close()
            if kind is None and self.n != self.shape[0]:
                raise ValueError(f"{self.n} images written, {self.shape[0]} declared: {self.path} not written")
            if kind is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
