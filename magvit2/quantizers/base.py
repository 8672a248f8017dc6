"""What every quantizer returns, so the tokenizer can swap LFQ and VQ without caring which one it has."""

from __future__ import annotations

from dataclasses import dataclass, field

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
