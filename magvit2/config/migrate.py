"""One migration: a run dir's config.yaml of any age -> today's schema. A setting added after runs existed is
filled with the value a config written before it means (what those runs did), so build and the stages read every
setting directly, with one default each (its conf/ yaml). Read stored configs through load().

Signatures do not move: of what is filled here, the keys configs since the recipe settings (tokens group, model.
class_rope, ...) can lack are all outside the signature (config/identity.py); the older configs still named
tokenizer.checkpoint, which no signature of today's reproduces, so their run dirs had lost theirs already.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

# setting -> its value in a config written before the setting existed
OLD = {
    "model.class_rope": "identity",
    "model.intra_embed_dropout": True,
    "model.init_from": None,
    "tokenizer.adagn_variance": "population",
    "tokenizer.adagn_scale_init": "one",
    "data.crops": "per_epoch",
    "sampling.cache": "dynamic",
    "sampling.compile": False,
    "trainer.ar.activation_checkpointing": False,
    "metrics.precision_recall": False,
    "metrics.protocol": "precise",  # the in-loop evaluation's arithmetic before metrics.protocol (metrics/protocol.py)
}
OLD_IMAGEFOLDER = {  # data=imagefolder only
    "data.resize": "bicubic",
    "data.on_bad_image": "error",
}


def quantizer_name(q) -> str:
    """The name of the conf/quantizer file a stored quantizer group came from (configs before `name:`)."""
    cls = str(q._target_).rsplit(".", 1)[-1].lower()
    return "vq_plain" if cls == "vq" and q.get("distance") == "euclidean" else cls


def migrate(cfg: DictConfig) -> DictConfig:
    """`cfg` (a stored config) with every setting added since it was written, at its old value; in place."""
    with open_dict(cfg):
        if "tokens" not in cfg:  # before the tokens group: tokenizer.checkpoint / ar_weights, online tokens
            tok = cfg.tokenizer
            cfg.tokens = {"name": "online", "tokenizer": tok.get("checkpoint", "auto"),
                          "weights": tok.get("ar_weights", "raw")}
        if "seed" not in cfg.tokens:  # before tokens.seed an AR run's tokenizer trained with the AR's seed
            cfg.tokens.seed = cfg.seed
        if "quantizer" in cfg and "name" not in cfg.quantizer:
            cfg.quantizer.name = quantizer_name(cfg.quantizer)
        old = {**OLD, **(OLD_IMAGEFOLDER if cfg.get("data", {}).get("name") == "imagefolder" else {})}
        for key, value in old.items():
            group, leaf = key.rsplit(".", 1)
            node = OmegaConf.select(cfg, group)
            if node is not None and leaf not in node:
                node[leaf] = value
    return cfg


def load(path) -> DictConfig:
    """A run dir's config.yaml (or the file itself) in today's schema."""
    p = Path(path)
    return migrate(OmegaConf.load(p / "config.yaml" if p.is_dir() else p))
