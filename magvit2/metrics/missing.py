"""A metric that could not be computed honestly (e.g. no pretrained weights) is a Missing, never a number."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Missing:
    """Stands in for a metric value; `reason` says why and which setting would fix it."""

    reason: str

    def __str__(self) -> str:
        return f"MISSING ({self.reason})"


def finite_or_missing(x: float, what: str) -> float | Missing:
    """NaN/inf from a degenerate input is reported as Missing rather than logged as a number."""
    return x if math.isfinite(x) else Missing(f"{what} is not finite ({x})")
