"""Config checks: everything decided from a composed config before any work starts. Cheap and torch-free, so the
sweeper runs it for every member before launch (and the dry run imports no torch)."""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from magvit2.config.schema import STAGES, check_choices
from magvit2.errors import ConfigError


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad setting."""
    check_choices(cfg)
    K = cfg.tokenizer.bits
    if not isinstance(K, int) or K < 1:
        raise ConfigError(f"tokenizer.bits={K!r} must be a positive integer (18 for 2^18 codes)")
    res, down = cfg.tokenizer.resolution, 2 ** (len(cfg.tokenizer.ch_mult) - 1)
    if res % down:
        raise ConfigError(
            f"tokenizer.resolution={res} is not divisible by the tokenizer's downsampling {down} "
            f"(2^(len(tokenizer.ch_mult)-1)): pick a multiple of {down}")
    if cfg.stage == "ar":
        bits = list(cfg.factorization.bits)
        if any((not isinstance(k, int)) or k < 1 for k in bits):
            raise ConfigError(f"factorization.bits={bits} must be positive integers (e.g. factorization=k6_12)")
        if sum(bits) != K:
            raise ConfigError(
                f"factorization={cfg.factorization.name} (bits {bits}, sum {sum(bits)}) does not match "
                f"tokenizer={cfg.tokenizer.name} (tokenizer.bits={K}): the sub-token bits must add up to the "
                f"tokenizer's K; pick a factorization whose bits sum to {K}")
        tokens_settings(cfg)  # a bad tokens setting fails before the tokenizer trains
        for key in ("cfg_scale", "temperature"):  # before training, not after it
            vals = subtoken_values(cfg.sampling[key], len(bits), f"sampling.{key}")
            if key == "temperature" and min(vals) <= 0:
                raise ConfigError(f"sampling.temperature={vals} must be > 0 for every sub-token")
        sampler_settings(cfg.sampling)
        init = cfg.model.init_from
        if init not in (None, "") and not Path(str(init)).expanduser().exists():
            raise ConfigError(f"model.init_from={init} does not exist: give a released Open-MAGVIT2 AR .ckpt, an AR "
                              f"run's checkpoint.pt or its run dir, or null")
        if cfg.model.dim % cfg.model.n_heads or (cfg.model.dim // cfg.model.n_heads) % 4:
            raise ConfigError(
                f"model.dim={cfg.model.dim} / model.n_heads={cfg.model.n_heads} must give a head dim divisible "
                f"by 4 (2D RoPE rotates half the head dim by rows, half by columns)")
    if cfg.data.name == "imagefolder":
        p = cfg.data.path
        if p is None:
            raise ConfigError("data=imagefolder needs a folder: set path=/your/images (or data.path=...)")
        if not Path(p).is_dir():
            raise ConfigError(f"data.path={p} does not exist or is not a folder: point it at an image folder "
                              f"(ImageNet layout: <path>/train/<class>/*.JPEG)")
    _check_numbers(cfg)
    if cfg.stage == "ar":
        _check_classes(cfg)


def tokens_settings(cfg) -> dict:
    """The tokens group as the AR stage uses it: {name: online} or {name: cached, crops: C, flips: bool}."""
    t = cfg.tokens
    if t.name == "online":
        return {"name": "online"}
    if t.name != "cached":
        raise ConfigError(f"tokens={t.name!r}: use tokens=online (the original's) or tokens=cached")
    if not isinstance(t.crops, int) or isinstance(t.crops, bool) or t.crops < 1:
        raise ConfigError(f"tokens.crops={t.crops!r} must be a positive integer (crops per train image)")
    if t.crops > 1 and cfg.data.crops == "fixed":
        raise ConfigError(f"tokens.crops={t.crops} with data.crops=fixed gives {t.crops} identical crops: "
                          f"use data.crops=per_epoch or tokens.crops=1")
    return {"name": "cached", "crops": int(t.crops), "flips": bool(t.flips)}


# sampling.cache -> FactorizedAR.generate's use_cache: dynamic (the growing KV cache, the default), static
# (preallocated, the same shapes every step: what compile / CUDA graphs need), none (recompute the whole prefix).
SAMPLER_CACHE = {"dynamic": True, "static": "static", "none": False}
# sampling.compile as a command-line word (--compile) -> its config value
SAMPLER_COMPILE = {"false": False, "true": True, "cuda_graphs": "cuda_graphs"}


def sampler_settings(sampling) -> tuple[bool | str, bool | str]:
    """(use_cache, compile) from sampling.cache / sampling.compile (a bare sampling node without them: the
    defaults), or a ConfigError naming the setting. Speed only: every choice draws the same tokens (run signatures
    ignore them). Whether the device can run them (cuda_graphs) is checked where it samples: a SLURM submit host
    has no GPU."""
    cache, comp = sampling.get("cache", "dynamic"), sampling.get("compile", False)
    if not isinstance(cache, str) or cache not in SAMPLER_CACHE:
        raise ConfigError(f"sampling.cache={cache!r} (--cache): use dynamic (the growing KV cache, the default), "
                          f"static (preallocated, fixed shapes) or none (recompute the prefix every step)")
    if not isinstance(comp, bool) and comp != "cuda_graphs":
        raise ConfigError(f"sampling.compile={comp!r} (--compile): use {' | '.join(SAMPLER_COMPILE)}")
    if comp and cache != "static":
        raise ConfigError(f"sampling.compile={comp} compiles the static-cache sampler (fixed shapes): set "
                          f"sampling.cache=static (--cache static) too, or sampling.compile=false")
    return SAMPLER_CACHE[cache], comp


def subtoken_values(v, m: int, name: str) -> list[float]:
    """One sampling value per sub-token from a scalar (all the same), M values, or 2 values (the original's, made
    for M = 2) spread linearly from the first sub-token to the last (M = 1: their mean)."""
    vals = [float(a) for a in v] if isinstance(v, (list, tuple, ListConfig)) else [float(v)]
    if any(not math.isfinite(a) for a in vals):
        raise ConfigError(f"{name}={vals} must be finite numbers")
    if len(vals) == 1:
        return vals * m
    if len(vals) == m:
        return vals
    if len(vals) == 2:
        a, b = vals
        return [(a + b) / 2] if m == 1 else [a + (b - a) * j / (m - 1) for j in range(m)]
    raise ConfigError(f"{name} has {len(vals)} values but the factorization has M={m} sub-tokens: give one value, "
                      f"{m} values (one per sub-token) or 2 (spread over the sub-tokens)")


def _positive_int(value, name: str, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1: {fix}")


def _check_numbers(cfg: DictConfig) -> None:
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer (e.g. seed=0)")
    ts = cfg.tokens.seed if cfg.stage == "ar" else 0
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ConfigError(f"tokens.seed={ts!r} must be an integer: the seed of the tokenizer an AR run trains "
                          f"first (e.g. tokens.seed=0, the default, or tokens.seed='${{seed}}' for one per AR seed)")
    _positive_int(cfg.tracking.log_every, "tracking.log_every", "log every N steps, e.g. tracking.log_every=10")
    for stage in STAGES:
        t = cfg.trainer[stage]
        for key in ("steps", "batch_size", "grad_accum", "ckpt_every"):
            _positive_int(t[key], f"trainer.{stage}.{key}", f"set trainer.{stage}.{key} to a positive integer")
        if not (isinstance(t.lr, (int, float)) and math.isfinite(t.lr) and t.lr > 0):
            raise ConfigError(f"trainer.{stage}.lr={t.lr!r} must be a finite number > 0 (the original: "
                              f"{'1e-4' if stage == 'tokenizer' else '3e-4'})")


def _check_classes(cfg: DictConfig) -> None:
    """The class table must cover the data's classes (photos: one per photo; image folders: train/ subfolders)."""
    if cfg.data.name == "photos":
        n = len(cfg.data.photos)
    else:
        root = Path(cfg.data.path)
        folder = root / "train" if (root / "train").is_dir() else root
        n = sum(1 for d in folder.iterdir() if d.is_dir())
    if cfg.model.num_classes < n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is smaller than the data's {n} classes "
                          f"(data={cfg.data.name}): set model.num_classes={n} (or more)")
