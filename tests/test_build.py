"""magvit2/build.py from composed configs, in-process (hydra.compose): types, shapes, the paper's parameter counts,
the defaults old run dirs' configs build with, and which group's settings enter which stage's signature."""
from __future__ import annotations

import ast
import copy
import functools

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

import magvit2.train  # noqa: F401  (resolvers, sweeper/launcher config nodes)
from conftest import REPO, TINY
from magvit2 import build as B
from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.data.images import ImageFolder, PhotoCrops
from magvit2.data.tokens import TokenShards
from magvit2.models.ar import FactorizedAR, count_params
from magvit2.models.discriminator import LeCAM, PatchDiscriminator
from magvit2.models.tokenizer import Tokenizer
from magvit2.quantizers import LFQ, VQ


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/magvit2-unused", *overrides])


def cfg_of(*overrides: str, tiny: bool = True):
    return copy.deepcopy(_composed((*(TINY if tiny else []), *overrides)))  # a copy: tests edit their configs


@pytest.mark.parametrize("quantizer,cls", [("lfq", LFQ), ("vq", VQ)])
def test_tokenizer_and_quantizer(quantizer, cls):
    cfg = cfg_of(f"quantizer={quantizer}")
    tok = B.build_tokenizer(cfg).eval()
    assert isinstance(tok, Tokenizer) and isinstance(tok.quantizer, cls)
    assert tok.quantizer.codebook_size == 2 ** cfg.tokenizer.bits and tok.token_grid == 4  # 16px, 4x down
    with torch.no_grad():
        assert tok.encode(torch.zeros(2, 3, 16, 16)).indices.shape == (2, 4, 4)


def test_discriminator_and_lecam():
    disc, lecam = B.build_discriminator(cfg_of("tokenizer.loss.disc_layers=2"))
    assert isinstance(disc, PatchDiscriminator) and isinstance(lecam, LeCAM)
    assert disc(torch.zeros(2, 3, 16, 16)).shape[:2] == (2, 1)
    assert next(disc.parameters()).shape[0] == 8  # tokenizer.loss.disc_ndf (TINY)


@pytest.mark.parametrize("fact", ["k6_12", "k2_4_6_6", "none"])
def test_ar_model_owns_its_split_and_merge(fact):
    cfg = cfg_of(f"factorization={fact}")
    model = B.build_ar(cfg, grid=4)
    assert isinstance(model, FactorizedAR) and model.cfg.bits == tuple(cfg.factorization.bits)
    assert model.cfg.num_classes == cfg.data.num_classes and model.cfg.seq_len == 16
    idx = torch.randint(0, 2 ** 18, (3, 16))
    sub = model.split(idx)
    assert sub.shape == (3, 16, len(cfg.factorization.bits))
    assert all(int(sub[..., j].max()) < v for j, v in enumerate(model.cfg.vocab_sizes))
    assert torch.equal(model.merge(sub), idx)
    logits = model(sub, torch.zeros(3, dtype=torch.long))
    assert [lg.shape for lg in logits] == [(3, 16, v) for v in model.cfg.vocab_sizes]


@pytest.mark.parametrize("size,millions", [("B", 343.6), ("L", 804.4), ("XL", 1486.7)])
def test_paper_parameter_counts(size, millions):
    cfg = cfg_of(f"model={size}", "factorization=k6_12", tiny=False)
    with torch.device("meta"):  # the real modules, no memory
        model = B.build_ar(cfg, grid=16)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(model.cfg) and round(n / 1e6, 1) == millions


def test_configs_from_before_a_setting_build_what_they_trained():
    cfg = cfg_of()
    with open_dict(cfg):
        for key in ("class_rope", "intra_embed_dropout"):
            del cfg.model[key]
        for key in ("adagn_variance", "adagn_scale_init"):
            del cfg.tokenizer[key]
        for key in ("crops",):
            del cfg.data[key]
    cfg = C.migrate(cfg)  # what config.load does to a stored config.yaml
    ar = B.build_ar_config(cfg, 4)
    assert (ar.class_rope, ar.intra_embed_dropout) == ("identity", True)
    tok = B.build_tokenizer(cfg)
    norms = [m for m in tok.modules() if type(m).__name__ == "AdaptiveGroupNorm"]
    assert norms and all(m.correction == 0 for m in norms)  # population variance
    assert B.build_dataset(cfg.data, "train").crops == "per_epoch"
    # and today's defaults are the original's
    now = B.build_ar_config(cfg_of(), 4)
    assert (now.class_rope, now.intra_embed_dropout) == ("zero", False)


def test_datasets(tmp_path):
    cfg = cfg_of()
    train, val = B.build_dataset(cfg.data, "train", 3), B.build_dataset(cfg.data, "val")
    assert isinstance(train, PhotoCrops) and (len(train), len(val), train.seed) == (256, 20, 3)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / split / "a" / "0.png")
    folder = B.build_dataset(cfg_of("data=imagefolder", f"path={tmp_path}", "tokenizer.resolution=16", tiny=False).data,
                             "val")
    assert isinstance(folder, ImageFolder) and folder[0][0].shape == (3, 16, 16) and folder.resize == "bilinear"
    with pytest.raises(ConfigError, match="path=/your/images"):
        B.build_dataset(cfg_of("data=imagefolder", tiny=False).data, "train")
    with open_dict(cfg):
        cfg.data.name = "nope"
    with pytest.raises(ConfigError, match="data=nope"):
        B.build_dataset(cfg.data, "train")


def test_token_datasets(tmp_path):
    cfg = cfg_of("tokens=cached", "tokens.crops=2", "tokens.flips=true", "seed=5")
    for split, n, v in (("train", 3, 4), ("val", 2, 1)):
        np.savez(tmp_path / f"{split}-r0-00000.npz", index=np.arange(n * v), labels=np.arange(n * v) // v,
                 tokens=np.zeros((n * v, 4, 4), np.int32))
    train, val = B.build_token_dataset(cfg, tmp_path, "train"), B.build_token_dataset(cfg, tmp_path, "val")
    assert isinstance(train, TokenShards) and (train.V, train.seed, len(train)) == (4, 5, 3)
    assert (val.V, len(val)) == (1, 2) and val[1][0].shape == (4, 4)


# Which group belongs to which stage: a tokenizer run is found by its signature from every AR member of a sweep, so
# an AR-only setting in it would train the same tokenizer again; the AR signature depends on every group it uses.
# An AR run's seed is AR-only: its tokenizer trains with tokens.seed, so AR seeds share one tokenizer.
AR_ONLY = ["factorization=k9_9", "model.dim=64", "sampling.per_class=3", "tokens=cached", "tokens.weights=ema",
           "trainer.ar.lr=1e-4", "seed=1"]
BOTH = ["tokenizer.ch=24", "quantizer=vq", "data.crops=fixed", "trainer.tokenizer.lr=1e-4", "tokens.seed=1"]


@pytest.mark.parametrize("override", AR_ONLY + BOTH)
def test_each_setting_enters_the_signatures_of_the_stages_that_use_it(override):
    base, cfg = cfg_of(), cfg_of(override)
    assert (C.tokenizer_signature(cfg) != C.tokenizer_signature(base)) == (override in BOTH)
    assert C.ar_signature(cfg) != C.ar_signature(base)


def test_ar_seeds_share_the_tokenizer_of_tokens_seed():
    ar = {seed: cfg_of(f"seed={seed}") for seed in (0, 1, 2)}
    assert len({C.tokenizer_signature(c) for c in ar.values()}) == 1
    assert len({C.ar_signature(c) for c in ar.values()}) == 3
    # the tokenizer run an AR run trains first is the tokenizer-stage run with seed=tokens.seed
    tok = C.tokenizer_config(cfg_of("seed=2", "tokens.seed=5"))
    assert (tok.stage, tok.seed) == ("tokenizer", 5)
    assert C.tokenizer_signature(tok) == C.tokenizer_signature(cfg_of("stage=tokenizer", "seed=5")) \
        == C.tokenizer_signature(cfg_of("seed=2", "tokens.seed=5"))
    # a tokenizer run's own seed is its seed
    assert C.tokenizer_signature(cfg_of("stage=tokenizer", "seed=1")) != C.tokenizer_signature(cfg_of("stage=tokenizer"))
    # one tokenizer per AR seed, when asked for
    per = [cfg_of(f"seed={s}", "tokens.seed=${seed}") for s in (0, 1)]
    assert C.tokenizer_signature(per[0]) != C.tokenizer_signature(per[1])
    with pytest.raises(ConfigError, match=r"tokens.seed='x' must be an integer"):
        C.validate(cfg_of("tokens.seed=x"))


@pytest.mark.parametrize("override", ["trainer.ar.ckpt_every=7", "trainer.tokenizer.eval_every=5",
                                      "data.num_workers=3", "tracking.log_every=3", "metrics.download=true"])
def test_cadence_settings_change_no_signature(override):
    base, cfg = cfg_of(), cfg_of(override)
    assert (C.tokenizer_signature(cfg), C.ar_signature(cfg)) == (C.tokenizer_signature(base), C.ar_signature(base))


def test_models_and_quantizers_import_no_hydra_mlflow_or_submitit():
    for pkg in ("models", "quantizers"):
        for f in (REPO / "magvit2" / pkg).glob("*.py"):
            tree = ast.parse(f.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            bad = {m for m in names if m.split(".")[0] in ("hydra", "omegaconf", "mlflow", "submitit", "accelerate")}
            assert not bad, f"{f.name} imports {bad}"
