"""The original's released files (Open-MAGVIT2 Lightning checkpoints) in and out of magvit2.

- `load_tokenizer(path)` / `load_ar(path)`: a model built from the file's shapes, with the settings that make its
  forward pass the original's (adaptive GroupNorm with the unbiased variance, class-slot RoPE zeroed, ...).
- `into_tokenizer(path, model)` / `into_ar(path, model)`: a file's weights into a model built from a config
  (tokens.tokenizer=FILE.ckpt, model.init_from=FILE.ckpt); shapes that differ name the setting that fixes them.
- `export_tokenizer(...)` / `export_ar(...)`: the other way (python -m magvit2.convert).
Every tensor of a file is used, set aside by name (e.g. the loss's LPIPS copy), or reported in one error.
"""
from __future__ import annotations

import logging

from magvit2.errors import ConfigError
from magvit2.models.ar import FactorizedAR
from magvit2.models.tokenizer import Tokenizer
from magvit2.quantizers import LFQ

from . import ar as A
from . import files
from . import tokenizer as T
from .consume import Consumer
from .files import kind

log = logging.getLogger(__name__)

# The settings the original's forward pass has; a file loaded here runs with them.
TOKENIZER_SETTINGS = {"adagn_variance": "unbiased", "adagn_scale_init": "default"}
AR_SETTINGS = {"class_rope": "zero"}
WEIGHTS = ("raw", "ema")

__all__ = ["kind", "load_tokenizer", "load_ar", "into_tokenizer", "into_ar",
           "export_tokenizer", "export_ar", "TOKENIZER_SETTINGS", "AR_SETTINGS"]


def _tokenizer_prefix(sd: dict, setting: str) -> str:
    k = kind(sd)
    if k is None:
        raise ConfigError(f"{setting}: not an Open-MAGVIT2 tokenizer or AR checkpoint (no encoder.conv_in.weight or "
                          f"transformer.* keys)")
    return "" if k == "tokenizer" else A.TOKENIZER_PREFIX


def _state(path_or_sd, setting: str) -> dict:
    """A file is read once (an XL file is ~6 GB): callers holding its state_dict pass it on."""
    return path_or_sd if isinstance(path_or_sd, dict) else files.read(path_or_sd, setting)


def into_tokenizer(path, model: Tokenizer, setting: str, weights: str = "raw", disc=None) -> dict:
    """Load a released tokenizer (or the tokenizer inside a released AR file; `path` or its state_dict) into
    `model`; it switches the decoder's adaptive GroupNorm to the original's settings (logged when that changes)."""
    sd = _state(path, setting)
    prefix = _tokenizer_prefix(sd, setting)
    norms = [level.norm for level in model.decoder.levels]
    if any(n.correction != 1 for n in norms):
        for n in norms:  # the initial scale (adagn_scale_init) does not matter: the file overwrites the weights
            n.correction = 1
        log.warning("%s: a released Open-MAGVIT2 file: the decoder's adaptive GroupNorm now uses the original's "
                    "unbiased variance (tokenizer.adagn_variance=unbiased)", setting)
    c = Consumer(sd, setting, T.arch_fix(sd, prefix))
    if prefix:  # an AR file: its transformer is not this model's business
        c.ignore([k for k in sd if k.startswith(A.PREFIX) or not k.startswith(prefix)], "the AR transformer")
    if weights not in WEIGHTS:
        raise ConfigError(f"{setting}: weights={weights!r}; use raw or ema")
    got = T.take_tokenizer(c, model, prefix, disc)
    info = c.finish()  # before anything is loaded: a bad file changes nothing
    if weights == "ema" and got["ema"] is None:
        raise ConfigError(f"{setting}: the file has no EMA copy (model_ema.*; an AR file's tokenizer never has one); "
                          f"use the raw weights (tokens.weights=raw, --weights raw)")
    model.load_state_dict(got["ema"] if weights == "ema" else got["raw"])
    return {**info, "weights": weights, "ema_decay": got["ema_decay"], "discriminator": got["disc"],
            "settings": dict(TOKENIZER_SETTINGS), "source": "reference"}


def load_tokenizer(path, weights: str = "ema", resolution: int = 256) -> tuple[Tokenizer, dict]:
    """A released tokenizer file (or the tokenizer of a released AR file) as an eval-mode Tokenizer built from its
    shapes. `resolution` only sets `token_grid` (the model is fully convolutional)."""
    setting = f"released file {path if not isinstance(path, dict) else '(in memory)'}"
    sd = _state(path, setting)
    prefix = _tokenizer_prefix(sd, setting)
    if prefix and weights == "ema":
        weights = "raw"  # the original trains its AR on the raw tokenizer weights (`use_ema: False`)
    a = T.infer_arch(sd, prefix)
    model = Tokenizer(LFQ(bits=a["bits"]), ch=a["ch"], ch_mult=a["ch_mult"], num_res_blocks=a["num_res_blocks"],
                      resolution=resolution, **TOKENIZER_SETTINGS)
    info = into_tokenizer(sd, model, setting, weights)
    log.info("%s: tokenizer %s, %s weights, with the original's settings %s", setting, a, weights, TOKENIZER_SETTINGS)
    return model.eval().requires_grad_(False), {**info, "arch": a}


def into_ar(path, model: FactorizedAR, setting: str) -> dict:
    """Load a released AR file's transformer (`path` or its state_dict) into `model`; its tokenizer is set aside."""
    sd = _state(path, setting)
    if kind(sd) != "ar":
        raise ConfigError(f"{setting}: not an Open-MAGVIT2 AR checkpoint (no transformer.* keys); "
                          f"a tokenizer file goes to tokens.tokenizer")
    if model.cfg.class_rope != "zero":
        raise ConfigError(f"{setting}: the original's AR zeroes the class slot's RoPE, this model has "
                          f"model.class_rope={model.cfg.class_rope}: use model.class_rope=zero")
    c = Consumer(sd, setting, A.shape_fix(sd))
    try:
        state = A.take_ar(c, model)
    except ValueError as e:
        raise ConfigError(f"{setting}: {e}") from e
    c.ignore([k for k in sd if k.startswith(A.TOKENIZER_PREFIX)], "its tokenizer (first_stage_model)")
    info = c.finish()
    model.load_state_dict(state)
    return {**info, "settings": dict(AR_SETTINGS), "source": "reference", "model_size": A.size_name(model.cfg)}


def load_ar(path, grid: int = 16, n_heads: int | None = None) -> tuple[FactorizedAR, Tokenizer, dict]:
    """A released AR file as (eval-mode FactorizedAR, the tokenizer it carries, info with model_size B/L/XL)."""
    setting = f"released file {path}"
    sd = files.read(path, setting)
    if kind(sd) != "ar":
        raise ConfigError(f"{setting}: not an Open-MAGVIT2 AR checkpoint (no transformer.* keys)")
    model = FactorizedAR(A.infer_config(sd, grid, n_heads))
    info = into_ar(sd, model, setting)
    down = 2 ** (len(T.infer_arch(sd, A.TOKENIZER_PREFIX)["ch_mult"]) - 1)
    tokenizer, tok_info = load_tokenizer(sd, "raw", resolution=grid * down)
    log.info("%s: AR %s (%s), with the original's settings %s", path, info["model_size"] or "custom size",
             model.cfg, AR_SETTINGS)
    return model.eval().requires_grad_(False), tokenizer, {**info, "tokenizer": tok_info}


def export_tokenizer(model_sd: dict, num_levels: int, ema: dict | None = None, disc_sd: dict | None = None,
                     ema_decay: float = 0.999) -> dict:
    return T.to_reference(model_sd, num_levels, ema, disc_sd, ema_decay)


def export_ar(model_sd: dict, cfg, tokenizer_sd: dict | None = None, num_levels: int | None = None) -> dict:
    """The original's Net2NetTransformer state_dict: transformer.* and, when given, first_stage_model.*."""
    A.check_layout(cfg)
    out = A.to_reference(model_sd)
    if tokenizer_sd is not None:
        out.update({A.TOKENIZER_PREFIX + k: v for k, v in T.to_reference(tokenizer_sd, num_levels).items()})
    return out
