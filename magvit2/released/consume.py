"""Accounting for an imported state_dict: every tensor in the file is used, set aside by name, or an error."""
from __future__ import annotations

from torch import Tensor

from magvit2.errors import ConfigError


class Consumer:
    def __init__(self, sd: dict, setting: str, fix_shapes: str):
        self.sd, self.setting, self.fix_shapes = sd, setting, fix_shapes
        self.used: set[str] = set()
        self.ignored: dict[str, int] = {}  # reason -> number of tensors
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def take(self, key: str, shape=None) -> Tensor | None:
        """The tensor at `key` (recorded as used), or None after recording it as missing / of the wrong shape."""
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        t = self.sd[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            self.mismatched.append(f"{key}: file {tuple(t.shape)} vs model {tuple(shape)}")
            return None
        return t

    def ignore(self, keys, reason: str) -> None:
        keys = [k for k in keys if k in self.sd and k not in self.used]
        if keys:
            self.used.update(keys)
            self.ignored[reason] = self.ignored.get(reason, 0) + len(keys)

    def finish(self) -> dict:
        """Raise one ConfigError for shape mismatches, missing keys or tensors nothing accounted for."""
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
            raise ConfigError(f"{self.setting}: the file does not match the original's layout for this model: "
                              f"{' and '.join(parts)}; {self.fix_shapes}")
        return {"tensors": len(self.sd), "ignored": dict(self.ignored)}
