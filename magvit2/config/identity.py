"""Run identity: a run's signature is a hash of the parts of its resolved config that change its result. Its run
dir is derived from it, so re-running a sweep finds every member's state (finished -> skip, checkpoint -> resume).
Member names and the group choices ablations compare come from each group's `name:`.

Not in any signature: the keys below that never change a result, the labels added after run dirs existed
(quantizer.name), tokens.seed (held by the tokenizer's own signature) and model.init_from while unset; so the run
dirs written before those settings keep their signatures.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from magvit2.config.validate import tokens_settings
from magvit2.data.identity import data_identity

# Keys that never change a run's result (cadence, parallelism, data loading speed, kernel choice).
_CADENCE_KEYS = ("ckpt_every", "eval_every", "log_every", "num_workers",
                 "max_nonfinite_steps",  # a healthy run ignores it; raising it resumes a diverged run
                 "compile", "fused_adam",  # the same math in other kernels (float rounding aside)
                 "cache", "activation_checkpointing")  # sampler KV-cache layout; memory traded for recompute


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def _strip(d: dict) -> dict:
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in _CADENCE_KEYS}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data(cfg: DictConfig) -> dict:
    return _strip(data_identity(cfg.data))


def _quantizer(cfg: DictConfig) -> dict:
    q = to_dict(cfg.quantizer)
    q.pop("name", None)  # a label (conf/quantizer/*.yaml gained it after runs existed); _target_ + settings identify
    return q


def tokenizer_signature(cfg: DictConfig) -> str:
    """What determines a trained tokenizer: architecture, quantizer, losses, data, schedule, seed."""
    return _hash({"tokenizer": to_dict(cfg.tokenizer), "quantizer": _quantizer(cfg), "data": _data(cfg),
                  "trainer": _strip(to_dict(cfg.trainer.tokenizer)), "seed": tokenizer_seed(cfg)})


def tokenizer_seed(cfg: DictConfig) -> int:
    """The tokenizer's seed: `seed` in a tokenizer run; in an AR run, tokens.seed (fixed, so AR seeds share it)."""
    return cfg.seed if cfg.stage == "tokenizer" else cfg.tokens.seed


def tokenizer_config(cfg: DictConfig) -> DictConfig:
    """The config of the tokenizer run an AR run (tokens.tokenizer=auto) trains first."""
    return OmegaConf.merge(cfg, {"stage": "tokenizer", "seed": tokenizer_seed(cfg)})


def tokenizer_source(cfg: DictConfig) -> str:
    """Identity of the tokenizer an AR run uses: its signature (auto) or the explicit checkpoint reference."""
    ck, w = cfg.tokens.tokenizer, cfg.tokens.weights
    return (f"sig:{tokenizer_signature(cfg)}" if ck in (None, "auto") else f"ckpt:{ck}") + f":{w}"


def _model(cfg: DictConfig) -> dict:
    m = to_dict(cfg.model)
    if m.get("init_from") in (None, ""):  # only when set: runs from before the setting keep their run dirs
        m.pop("init_from", None)
    return m


def _tokens(cfg: DictConfig) -> dict:
    t = to_dict(cfg.tokens)
    t.pop("seed", None)  # in tokenizer_source already, through the tokenizer's signature
    return t


def ar_signature(cfg: DictConfig) -> str:
    return _hash({"tokenizer": tokenizer_source(cfg), "factorization": list(cfg.factorization.bits),
                  "model": _model(cfg), "data": _data(cfg), "tokens": _tokens(cfg),
                  "trainer": _strip(to_dict(cfg.trainer.ar)), "sampling": _strip(to_dict(cfg.sampling)),
                  "seed": cfg.seed})


def signature(cfg: DictConfig) -> str:
    return tokenizer_signature(cfg) if cfg.stage == "tokenizer" else ar_signature(cfg)


def run_dir(cfg: DictConfig, stage: str | None = None) -> Path:
    stage = stage or cfg.stage
    sig = tokenizer_signature(cfg) if stage == "tokenizer" else ar_signature(cfg)
    return Path(cfg.paths.runs) / stage / sig


def token_cache_key(cfg: DictConfig, tokenizer_id: str) -> dict:
    """What the AR's extracted tokens depend on (magvit2/data/tokens.py cache_dir): tokenizer, data, tokens, seed."""
    return {"tok": tokenizer_id, "data": _data(cfg), "tokens": tokens_settings(cfg), "seed": cfg.seed}


def member_name(cfg: DictConfig) -> str:
    """A short human name for a run: the group choices that usually differ in ablations."""
    if cfg.stage == "tokenizer":
        return f"{cfg.tokenizer.name}-{cfg.quantizer.name}"
    return f"{cfg.factorization.name}-{cfg.model.name}"


def choices(cfg: DictConfig) -> dict:
    """The config-group choices ablations compare (each group's `name:`), as the analysis reads them (choice.*)."""
    return {g: cfg[g].name for g in ("tokenizer", "quantizer", "factorization", "model", "data")}
