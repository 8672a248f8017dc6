"""magvit2: an ablation platform for Open-MAGVIT2 (LFQ tokenizer + factorized autoregressive generators)."""

__version__ = "0.1.0"
