"""What every quantizer is and returns, so the tokenizer can swap LFQ and VQ (or a new arm) without caring which."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class QuantizerOutput:
    """Result of one quantizer forward pass.

    codes:   (B, D, H, W) straight-through quantized latent: the forward value is the code, the gradient goes to z.
    indices: (B, H, W) int64 code indices.
    loss:    scalar, the quantizer's own weighted auxiliary loss (LFQ: commitment + entropy; VQ: commitment +
             codebook). The caller adds it to the reconstruction loss unchanged.
    stats:   detached scalars for logging (names depend on the quantizer).
    """

    codes: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Quantizer(Protocol):
    """The interface models.tokenizer.Tokenizer, the training stage and the evaluations rely on. A quantizer is an
    nn.Module (called as quantizer(z), so its parameters and buffers are the tokenizer's) with:"""

    dim: int
    """D, the latent channels it quantizes: the encoder's output and the decoder's input channels."""
    codebook_size: int
    """The number of codes; indices lie in [0, codebook_size). The AR model's sub-tokens must cover it
    (2^sum(bits)), and codebook utilization / perplexity are counted over it."""

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, D, H, W) encoder output -> QuantizerOutput: codes (B, D, H, W) straight-through (z's dtype),
        indices (B, H, W) int64, loss a scalar the caller adds unweighted to its loss (LFQ: commit_weight x
        commitment + entropy_weight x (sample_weight x H_sample - codebook_weight x H_codebook); VQ: codebook +
        commit_weight x commitment), and
        stats {name: detached scalar} that training logs as train/<name> (LFQ: commit, entropy_sample,
        entropy_codebook, entropy_aux, unique_codes; VQ: commit, codebook, unique_codes, dead_codes, restarted).
        A ValueError names the expected shape when z's is wrong. In training mode with torch.distributed
        initialized it may be a collective (LFQ's global codebook entropy, VQ's usage counts): every process calls
        it equally often."""
        ...

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, H, W) integer indices in [0, codebook_size) -> (B, D, H, W) codes of `dtype`: what forward's codes
        hold for those indices, for the decoder. A ValueError for another shape or an index out of range."""
        ...


def _distributed() -> bool:
    """torch.distributed is initialized with more than one process: only then do quantizers all-reduce."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
