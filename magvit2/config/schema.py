"""The typed part of the config: every choice-like setting and what each of its values means.

Hydra checks the group choices at compose time (`quantizer=vqq` lists the options); this table checks the settings
inside the groups at plan time (config.validate: the dry run and the sweeper run it for every member before a run
dir, lock, cache or MLflow run exists), so a typo fails in one line naming the setting and its allowed values
instead of inside the job. A setting a group does not have (quantizer.distance under lfq) is not checked.
Values compare by type too: `1` is not `true`. Rules across settings (bits sums, divisibility) stay in validate.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from magvit2.errors import ConfigError

STAGES = ("tokenizer", "ar")


@dataclass(frozen=True)
class Choice:
    values: dict  # allowed value -> what it means
    flag: str = ""  # the magvit2.sample flag that sets it too


def _flag(true: str, false: str) -> Choice:
    return Choice({True: true, False: false})


# trainer.<stage>.compile: a flag or a torch.compile backend (torch._dynamo.list_backends(), and its debug ones)
_COMPILE = {False: "eager PyTorch, the default", True: "torch.compile with inductor", "inductor": "the same",
            "aot_eager": "graph capture without code generation, to debug", "eager": "dynamo only, to debug",
            "cudagraphs": "CUDA graphs", "openxla": "XLA", "tvm": "TVM"}

CHOICES: dict[str, Choice] = {
    "stage": Choice({"ar": "train the generator, and the tokenizer it needs first", "tokenizer": "the tokenizer only"}),
    "dry_run": _flag("list what would run, train nothing", "run"),
    # data
    "data.crops": Choice({"per_epoch": "the original's: a new random crop every epoch",
                          "fixed": "the same crop in every epoch"}),
    "data.resize": Choice({"bilinear": "the original's torchvision T.Resize", "bicubic": "PIL bicubic"}),
    "data.fingerprint": Choice({"stat": "names, sizes, mtimes of the images; the default",
                                "content": "hashes every image's bytes: slow on large folders",
                                "none": "the path only"}),
    "data.on_bad_image": Choice({"error": "stop at an unreadable image, naming it; the default",
                                 "skip": "replace it by the next readable image, counted"}),
    # tokenizer + quantizer
    "tokenizer.adagn_variance": Choice({"unbiased": "the original's, torch.var's default",
                                        "population": "divide by N"}),
    "tokenizer.adagn_scale_init": Choice({"default": "the original's PyTorch init",
                                          "one": "bias 1: starts as plain GroupNorm"}),
    "tokenizer.loss.g_adv_reduce": Choice({"image": "the original's: mean patch logits per image, then the loss",
                                           "patch": "the loss per patch"}),
    "quantizer.codebook_entropy": Choice({"local": "the original's: each process's tokens",
                                          "global": "all-reduced over the processes"}),
    "quantizer.distance": Choice({"cosine": "l2-normalized codes", "euclidean": "VQGAN's raw codes"}),
    "quantizer.restart_dead": _flag("restart codes unused for dead_after steps", "never"),
    # AR input and model
    "tokens.weights": Choice({"raw": "the original's `use_ema: False`: the tokenizer's training weights",
                              "ema": "its EMA weights"}),
    "tokens.flips": _flag("also the horizontal flip of each crop", "the crops only"),
    "model.class_rope": Choice({"zero": "the original's: zeroes the class slot's q, k", "identity": "no rotation"}),
    "model.intra_embed_dropout": _flag("dropout on the intra blocks' sub-token inputs too", "the original's: none"),
    # schedules
    "trainer.tokenizer.precision": Choice({"no": "fp32", "bf16": "bfloat16 autocast", "fp16": "float16, scaled"}),
    "trainer.ar.precision": Choice({"no": "fp32", "bf16": "bfloat16 autocast", "fp16": "float16, scaled"}),
    "trainer.tokenizer.compile": Choice(_COMPILE),
    "trainer.ar.compile": Choice(_COMPILE),
    "trainer.tokenizer.fused_adam": _flag("the fused CUDA Adam kernel, the same update", "the plain kernel"),
    "trainer.ar.fused_adam": _flag("the fused CUDA Adam kernel, the same update", "the plain kernel"),
    "trainer.ar.weight_decay_on": Choice({"all": "the original's: every parameter group",
                                          "matrices": "only tensors with 2 or more dims"}),
    "trainer.ar.activation_checkpointing": _flag("recompute the blocks' activations in the backward, for memory",
                                                 "keep them, the default"),
    # sampling (speed only, and what is kept) and metrics
    "sampling.cache": Choice({"dynamic": "the growing KV cache, the default", "static": "preallocated, fixed shapes",
                              "none": "recompute the prefix every step"}, "--cache"),
    "sampling.compile": Choice({False: "the default", True: "torch.compile the static-cache sampler",
                                "cuda_graphs": "and CUDA graphs, CUDA only"}, "--compile"),
    "sampling.export_npz": _flag("write the ADM evaluator's .npz of the samples", "do not"),
    "metrics.precision_recall": _flag("the in-loop evaluation also gives precision / recall, keeping every image's "
                                      "Inception features", "the default"),
    "metrics.download": _flag("download missing metric weights", "never download: offline clusters"),
    "metrics.protocol": Choice({"reference": "the original's evaluation arithmetic (uint8-truncated PSNR / SSIM, "
                                             "pytorch-fid's rFID input, LPIPS Alex + VGG), the default",
                                "precise": "the floats, torch-fidelity's uint8 rFID input, rounding "
                                           "(metrics/protocol.py)"}, "--protocol"),
}

_ABSENT = object()


def _word(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _allowed(value, values) -> bool:
    return any(type(value) is type(a) and value == a for a in values)


def usage(key: str, value) -> str:
    """One line: the setting, its bad value and every allowed value with what it means."""
    c = CHOICES[key]
    alts = [f"{_word(v)} ({why})" for v, why in c.values.items()]
    flag = f" ({c.flag})" if c.flag else ""
    return f"{key}={value!r}{flag}: use {', '.join(alts[:-1])} or {alts[-1]}"


def check_choices(cfg: DictConfig) -> None:
    """ConfigError on the first choice-like setting whose value is not one of its allowed values."""
    for key, c in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not _allowed(value, c.values):
            raise ConfigError(usage(key, value))
