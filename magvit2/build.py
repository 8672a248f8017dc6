"""The one place where config meets constructors: quantizers, tokenizer, discriminator, AR model, data sets.

To change what a setting does, read its group in conf/ and the one function here that hands it to a constructor.
Every setting is read directly: a run dir's config.yaml written before a setting existed is read through
config.load, whose migration (magvit2/config/migrate.py) fills in the value that run trained with.
"""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from torch import nn
from torch.utils.data import Dataset

from magvit2.config import to_dict, tokens_settings
from magvit2.errors import ConfigError
from magvit2.data.images import ImageFolder, PhotoCrops
from magvit2.data.tokens import TokenShards, variants
from magvit2.models.ar import ARConfig, FactorizedAR
from magvit2.models.discriminator import LeCAM, PatchDiscriminator
from magvit2.models.tokenizer import Tokenizer


def build_quantizer(cfg) -> nn.Module:
    """LFQ or VQ from `quantizer._target_` (conf/quantizer/*.yaml); its `name` labels runs, no constructor takes it."""
    return instantiate({k: v for k, v in to_dict(cfg.quantizer).items() if k != "name"})


def build_tokenizer(cfg) -> Tokenizer:
    t = cfg.tokenizer
    return Tokenizer(build_quantizer(cfg), ch=t.ch, ch_mult=tuple(t.ch_mult), num_res_blocks=t.num_res_blocks,
                     resolution=t.resolution, adagn_variance=t.adagn_variance, adagn_scale_init=t.adagn_scale_init)


def build_discriminator(cfg) -> tuple[PatchDiscriminator, LeCAM]:
    """The tokenizer's GAN critic (tokenizer.loss.disc_*) and the LeCAM regularizer's running means."""
    L = cfg.tokenizer.loss
    return PatchDiscriminator(3, ndf=L.disc_ndf, n_layers=L.disc_layers), LeCAM()


def build_ar_config(cfg, grid: int) -> ARConfig:
    """model + factorization groups; `grid`: the tokenizer's token grid side (tokens per image = grid^2)."""
    m = cfg.model
    return ARConfig(bits=tuple(cfg.factorization.bits), dim=m.dim, n_inter=m.n_inter, n_intra=m.n_intra,
                    n_heads=m.n_heads, num_classes=m.num_classes, grid=grid, class_dropout=m.class_dropout,
                    embed_dropout=m.embed_dropout, resid_dropout=m.resid_dropout, ffn_dropout=m.ffn_dropout,
                    class_rope=m.class_rope, intra_embed_dropout=m.intra_embed_dropout)


def build_ar(cfg, grid: int) -> FactorizedAR:
    return FactorizedAR(build_ar_config(cfg, grid))


def build_dataset(data_cfg, split: str, seed: int = 0) -> Dataset:
    """Images in [-1, 1] with class labels; `split`: train (random crops) or val (fixed crops)."""
    if data_cfg.name == "photos":
        size = data_cfg.train_size if split == "train" else data_cfg.val_size
        return PhotoCrops(list(data_cfg.photos), data_cfg.resolution, data_cfg.scale, size, split, seed,
                          data_cfg.crops)
    if data_cfg.name == "imagefolder":
        if data_cfg.path is None:
            raise ConfigError("data=imagefolder needs a folder: set path=/your/images (or data.path=...)")
        return ImageFolder(data_cfg.path, data_cfg.resolution, split, data_cfg.val_fraction,
                           data_cfg.val_size, seed, data_cfg.crops, data_cfg.resize, data_cfg.on_bad_image)
    raise ConfigError(f"data={data_cfg.name}: unknown data set; use data=photos or data=imagefolder")


def build_token_dataset(cfg, folder: Path, split: str) -> TokenShards:
    """Extracted token grids (magvit2/data/tokens.py): train holds the tokens.crops x flips variants per image,
    drawn per (seed, epoch, image); val one center-crop grid per image."""
    if split == "train":
        return TokenShards(folder, "train", variants(tokens_settings(cfg)), cfg.seed)
    return TokenShards(folder, split)
