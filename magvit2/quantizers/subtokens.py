"""Sub-token factorization of an LFQ index (Open-MAGVIT2's asymmetric token factorization).

A K-bit index is cut into M sub-tokens with bits [k1, ..., kM], sum = K, least significant bits first (the same
order as LFQ's index, so sub-token j holds a contiguous block of latent channels):
    s1 = idx & (2^k1 - 1),  s2 = (idx >> k1) & (2^k2 - 1),  ...
For [6, 12]: s1 = idx & 63 (vocab 64, channels 0..5), s2 = idx >> 6 (vocab 4096, channels 6..17).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_TOTAL_BITS = 62  # int64 indices


def validate_bits(bits: Sequence[int], total: int) -> None:
    """ValueError unless `bits` is a non-empty list of ints >= 1 summing to the tokenizer's `total` bits."""
    try:
        ks = [operator.index(k) for k in bits]
    except TypeError:
        raise ValueError(f"factorization bits must be a list of ints, got {bits!r} (tokenizer K = {total})") from None
    if any(isinstance(k, bool) for k in bits):
        raise ValueError(f"factorization bits must be ints, not bools: {bits!r}")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(
            f"factorization bits {ks} must be one or more ints >= 1 that sum to the tokenizer's K = {total}"
        )
    if sum(ks) != total:
        raise ValueError(
            f"factorization bits {ks} sum to {sum(ks)}, but the tokenizer has K = {total} bits: "
            f"choose bits that sum to {total} (e.g. [{total}] or a split like [{total // 3}, {total - total // 3}])"
        )


def _offsets(bits: Sequence[int]) -> list[int]:
    ks = [operator.index(k) for k in bits]
    validate_bits(ks, sum(ks))
    if sum(ks) > MAX_TOTAL_BITS:
        raise ValueError(f"factorization bits {ks} sum to {sum(ks)} > {MAX_TOTAL_BITS}, too many for int64 indices")
    return [sum(ks[:j]) for j in range(len(ks))]


def split_indices(indices: Tensor, bits: Sequence[int]) -> Tensor:
    """(...) int indices -> (..., M) int64 sub-tokens, sub-token j = bits [o_j, o_j + k_j) of the index.

    Indices are not range-checked (that would need a device sync): bits above sum(bits) are dropped.
    """
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    offsets = torch.tensor(_offsets(bits), dtype=torch.int64, device=indices.device)
    masks = (torch.ones_like(offsets) << torch.tensor(list(bits), dtype=torch.int64, device=indices.device)) - 1
    return (indices.long().unsqueeze(-1) >> offsets) & masks


def merge_subtokens(sub: Tensor, bits: Sequence[int]) -> Tensor:
    """(..., M) sub-tokens -> (...) int64 indices; inverse of split_indices for sub-tokens within their vocabularies."""
    if sub.is_floating_point() or sub.is_complex() or sub.dtype == torch.bool:
        raise ValueError(f"sub-tokens must be an integer tensor, got dtype {sub.dtype}")
    offsets = _offsets(bits)
    if sub.ndim == 0 or sub.shape[-1] != len(offsets):
        raise ValueError(f"sub-tokens must have last dim M = {len(offsets)} for bits {list(bits)}, got shape "
                         f"{tuple(sub.shape)}")
    shifts = torch.tensor(offsets, dtype=torch.int64, device=sub.device)
    return (sub.long() << shifts).sum(-1)
