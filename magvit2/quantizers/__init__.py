"""Quantizers: LFQ (lookup-free, 2^K implicit codes) and VQ (cosine-similarity codebook), plus sub-token splitting.
Each satisfies the Quantizer protocol (base.py), the one interface the tokenizer uses.

Imports torch and einops only.
"""

from .base import Quantizer, QuantizerOutput
from .lfq import LFQ, bits_to_indices, dense_entropy_terms, entropy_terms, indices_to_bits
from .subtokens import merge_subtokens, split_indices, validate_bits
from .vq import VQ

__all__ = [
    "LFQ",
    "VQ",
    "Quantizer",
    "QuantizerOutput",
    "bits_to_indices",
    "dense_entropy_terms",
    "entropy_terms",
    "indices_to_bits",
    "merge_subtokens",
    "split_indices",
    "validate_bits",
]
