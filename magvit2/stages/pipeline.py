"""What a training command runs: find or train the tokenizer; stage=ar then trains the AR on its tokens (extracted
or encoded inside train_ar, magvit2/data/tokens.py). A finished step is found by its signature and not trained."""
from __future__ import annotations

from magvit2 import config as C


def run(cfg) -> dict:
    from magvit2.stages.tokenizer import train_tokenizer
    if cfg.stage == "tokenizer":
        return train_tokenizer(cfg)
    if cfg.tokens.tokenizer in (None, "auto"):  # else a given checkpoint: nothing to train
        # all ranks, and after the run's lock: a run another member is training is waited for, not trained twice
        train_tokenizer(C.tokenizer_config(cfg))
        # accelerate keeps one AcceleratorState per process and refuses an Accelerator with another mixed precision
        # (trainer.ar.precision may differ from trainer.tokenizer's); the process group (PartialState) is kept
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=False)
    from magvit2.stages.ar import train_ar
    return train_ar(cfg)
