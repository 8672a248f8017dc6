"""The original's AR layout (Open-MAGVIT2 Net2NetTransformer: `transformer.*` = gpt.GPT, `first_stage_model.*` =
its frozen tokenizer) <-> magvit2's FactorizedAR. The blocks share their names (attention.wqkv, feed_forward.w1,
...); the rest are renames. The original has exactly two sub-tokens: pre_emb / head.0 for the k1 low bits,
post_emb / head.1 for the rest."""
from __future__ import annotations

import logging
import math
import re

from magvit2.models.ar import PRESETS, ARConfig

PREFIX = "transformer."
TOKENIZER_PREFIX = "first_stage_model."
RENAMES = [(r"^class_emb\.weight$", "class_emb.embedding_table.weight"),
           (r"^tok_emb\.0\.", "pre_emb."), (r"^tok_emb\.1\.", "post_emb."),
           (r"^inter\.", "spatial_blocks."), (r"^intra\.", "factorized_blocks."), (r"^heads\.", "head.")]
KV_CACHE = re.compile(r"\.kv_cache\.[kv]_cache$")  # inference caches, present if a file was saved after sampling
log = logging.getLogger(__name__)
HEAD_DIM = 64  # B, L and XL all use 64-wide heads (1024/16, 1280/20, 1536/24); n_heads is not in the weights


def check_layout(cfg: ARConfig) -> None:
    if len(cfg.bits) != 2:
        raise ValueError(f"the original's AR has exactly 2 sub-tokens (pre, post), this model has bits={cfg.bits}: "
                         f"use a two-part factorization such as factorization=k6_12 or k9_9")
    if cfg.n_intra < 1:
        raise ValueError("the original's AR always has intra (factorized) blocks; model.n_intra=0 (independent heads) "
                         "has no counterpart: use n_intra >= 1")


def reference_name(name: str) -> str:
    for pattern, repl in RENAMES:
        name = re.sub(pattern, repl, name)
    return PREFIX + name


def infer_config(sd: dict, grid: int = 16, n_heads: int | None = None) -> ARConfig:
    """The ARConfig of a file in the original's layout, from its shapes. The head count is not in them: a paper size
    (B / L / XL, recognised by width and depths) takes it from the paper's table; another size takes `n_heads`,
    else 64-wide heads, said in the log as the assumption it is (grid likewise: 16 unless given)."""
    dim = sd[PREFIX + "pre_emb.weight"].shape[1]
    bits = tuple(int(math.log2(sd[PREFIX + f"{p}_emb.weight"].shape[0])) for p in ("pre", "post"))
    count = lambda part: len({m.group(1) for k in sd if (m := re.match(rf"^{PREFIX}{part}\.(\d+)\.", k))})  # noqa: E731
    n_inter, n_intra = count("spatial_blocks"), count("factorized_blocks")
    size = next((name for name, p in PRESETS.items() if (dim, n_inter, n_intra) == (p["dim"], p["n_inter"], p["n_intra"])),
                None)
    if n_heads is None and size is not None:
        n_heads = PRESETS[size]["n_heads"]
    elif n_heads is None:
        n_heads = dim // HEAD_DIM if dim % HEAD_DIM == 0 else 1
        log.warning("AR file of no paper size (dim %d, %d + %d blocks): the head count is not stored in it; assuming "
                    "%d (%d-wide heads)", dim, n_inter, n_intra, n_heads, dim // n_heads)
    return ARConfig(bits=bits, dim=dim, n_inter=n_inter, n_intra=n_intra, n_heads=n_heads,
                    num_classes=sd[PREFIX + "class_emb.embedding_table.weight"].shape[0] - 1, grid=grid,
                    class_rope="zero")


def size_name(cfg: ARConfig) -> str | None:
    """B / L / XL when the shapes are one of the paper's sizes."""
    for name, p in PRESETS.items():
        if (cfg.dim, cfg.n_inter, cfg.n_intra) == (p["dim"], p["n_inter"], p["n_intra"]):
            return name
    return None


def shape_fix(sd: dict) -> str:
    c = infer_config(sd)
    size = size_name(c)
    return (f"the file holds an AR model with dim={c.dim}, {c.n_inter} inter and {c.n_intra} intra blocks, bits="
            f"{list(c.bits)} and {c.num_classes} classes: use " + (f"model={size} " if size else "a model config with "
            "those values ") + f"factorization=k{c.bits[0]}_{c.bits[1]} model.num_classes={c.num_classes}")


def take_ar(c, model) -> dict:
    """The AR weights from Consumer `c` as a magvit2 state_dict."""
    check_layout(model.cfg)
    out = {}
    for k, t in model.state_dict().items():
        got = c.take(reference_name(k), t)
        if got is not None:
            out[k] = got
    c.ignore([k for k in c.sd if KV_CACHE.search(k)], "inference KV caches")
    return out


def to_reference(model_sd: dict) -> dict:
    return {reference_name(k): t for k, t in model_sd.items()}
