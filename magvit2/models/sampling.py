"""Per-sub-token sampling: classifier-free guidance, temperature, top-k / top-p, multinomial draw."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def per_subtoken(value: Sequence[float] | float, m: int, name: str) -> tuple[float, ...]:
    """Broadcast a scalar to M values, or check a sequence has exactly M (one per sub-token)."""
    if isinstance(value, (int, float)):
        return (float(value),) * m
    vals = tuple(float(v) for v in value)
    if len(vals) != m:
        raise ValueError(f"{name} has {len(vals)} values but there are M={m} sub-tokens; give one value per "
                         f"sub-token or a single number")
    return vals


def guide(logits: Tensor, scale: float) -> Tensor:
    """CFG on a doubled batch [cond; uncond]: uncond + scale * (cond - uncond)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k and outside the smallest nucleus with mass >= top_p to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None, u: Tensor | None = None) -> Tensor:
    """Draw one index per row of logits (N, V) -> (N,) int64.

    u (N,) uniforms in [0, 1): row i takes the inverse CDF at u[i] (float64) instead of torch.multinomial, so a
    row's draw depends on its own uniform only, not on the batch it is in (per-sample seeds, split sampling)."""
    if u is not None:
        p = filter_logits(logits.double() / temperature, top_k, top_p).softmax(-1)
        cdf = p.cumsum(-1)
        # the first code whose cdf exceeds u: never one of probability 0 (its cdf equals its predecessor's)
        return torch.searchsorted(cdf, u.to(cdf)[:, None] * cdf[:, -1:], right=True).squeeze(-1).clamp(
            max=p.shape[-1] - 1)
    if logits.dtype in (torch.float16, torch.bfloat16):  # softmax / cumsum in full precision
        logits = logits.float()
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_sampling_args(top_k: int | None, top_p: float | None, temperature: tuple[float, ...]) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable)")
    if any(t <= 0 for t in temperature):
        raise ValueError(f"temperature={temperature} must be > 0 for every sub-token")
