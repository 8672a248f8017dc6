"""A metric that could not be computed honestly (e.g. no pretrained weights) is a Missing, never a number."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class Missing:
    """Stands in for a metric value; `reason` says why and which setting would fix it."""

    reason: str

    def __str__(self) -> str:
        return f"MISSING ({self.reason})"


def metric_value(v: Any) -> float | None:
    """Plain float for logging (tensors and numpy scalars included); None for a Missing."""
    if isinstance(v, Missing):
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"metric_value: expected a scalar tensor, got shape {tuple(v.shape)}")
        return float(v.item())
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric_value: cannot turn {type(v).__name__} {v!r} into a float") from e


def missing_reasons(d: Mapping[str, Any]) -> dict[str, str]:
    """{name: reason} for every Missing entry of a metrics dict (to log as tags/params next to the numbers)."""
    return {k: v.reason for k, v in d.items() if isinstance(v, Missing)}


def finite_or_missing(x: float, what: str) -> float | Missing:
    """NaN/inf from a degenerate input is reported as Missing rather than logged as a number."""
    return x if math.isfinite(x) else Missing(f"{what} is not finite ({x})")
