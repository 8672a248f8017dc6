"""Accounting for an imported state_dict: every tensor in the file is used, set aside by name, or an error."""
from __future__ import annotations

import torch
from torch import Tensor

from magvit2.errors import ConfigError


def _kind(t: Tensor) -> str:
    return "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else \
        "complex" if t.is_complex() else "int"


class Consumer:
    def __init__(self, sd: dict, setting: str, fix_shapes: str):
        self.sd, self.setting, self.fix_shapes = sd, setting, fix_shapes
        self.used: set[str] = set()
        self.ignored: dict[str, int] = {}  # reason -> number of tensors
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.wrong_kind: list[str] = []

    def take(self, key: str, like: Tensor | None = None) -> Tensor | None:
        """The tensor at `key` (recorded as used), or None after recording it as missing, or of another shape or
        dtype kind than `like` (the model's tensor: an integer tensor is never cast into a float parameter)."""
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        t = self.sd[key]
        if like is not None and tuple(t.shape) != tuple(like.shape):
            self.mismatched.append(f"{key}: file {tuple(t.shape)} vs model {tuple(like.shape)}")
            return None
        if like is not None and _kind(t) != _kind(like):
            self.wrong_kind.append(f"{key}: file {t.dtype} vs model {like.dtype}")
            return None
        return t

    def ignore(self, keys, reason: str) -> None:
        keys = [k for k in keys if k in self.sd and k not in self.used]
        if keys:
            self.used.update(keys)
            self.ignored[reason] = self.ignored.get(reason, 0) + len(keys)

    def finish(self) -> dict:
        """Raise one ConfigError for dtype kinds, shape mismatches, missing keys or tensors nothing accounted for."""
        if self.wrong_kind:
            raise ConfigError(f"{self.setting}: {len(self.wrong_kind)} tensors of another dtype kind than this "
                              f"model's (first: {'; '.join(self.wrong_kind[:3])}): the file is not a checkpoint of "
                              f"this model (nothing is cast); give the released file or one written by "
                              f"magvit2.convert")
        if self.mismatched:
            raise ConfigError(f"{self.setting}: the file's tensors have other shapes than this model's "
                              f"({len(self.mismatched)}, first: {'; '.join(self.mismatched[:3])}); {self.fix_shapes}")
        unknown = sorted(set(self.sd) - self.used)
        if self.missing or unknown:
            parts = []
            if self.missing:
                parts.append(f"{len(self.missing)} tensors missing from the file (first: {self.missing[:3]})")
            if unknown:
                parts.append(f"{len(unknown)} tensors this model has no place for (first: {unknown[:3]})")
            # the shapes fit (checked above), so the architecture is right: the file is incomplete or another layout
            raise ConfigError(f"{self.setting}: the file does not match the original's layout for this model: "
                              f"{' and '.join(parts)}; give a released Open-MAGVIT2 .ckpt as downloaded, or a file "
                              f"written by `python -m magvit2.convert RUN --to reference`")
        return {"tensors": len(self.sd), "ignored": dict(self.ignored)}
