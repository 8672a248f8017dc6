"""torchmetrics FID / IS fed from one Inception pass per batch.

The Inception (InceptionFeatures, or any nn.Module with `pool_dim`/`logits_dim` mapping uint8 (B,3,H,W) to
(B, pool_dim + logits_dim)) runs once per batch; torchmetrics' FrechetInceptionDistance and InceptionScore get a
`feature=` module that only selects their columns, so their own statistics code (running sums, covariance,
matrix square root, IS splits) does the rest. torchmetrics skips its [0,1]->uint8 cast for custom modules, and
its IS would otherwise build (and download) its own Inception.
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from .missing import Missing


class Columns(nn.Module):
    """feature= module for torchmetrics: columns [start, start + num_features) of precomputed features."""

    def __init__(self, start: int, num_features: int):
        super().__init__()
        self.start, self.num_features = start, num_features  # torchmetrics FID reads num_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats[:, self.start : self.start + self.num_features]


def check_inception(inception, who: str) -> nn.Module | Missing:
    """None -> Missing (not configured); Missing passes through; otherwise it must look like InceptionFeatures."""
    if inception is None:
        return Missing("no Inception given: set metrics.inception_weights=PATH (pt_inception-2015-12-05-6726825d.pth)")
    if isinstance(inception, Missing):
        return inception
    if not (isinstance(inception, nn.Module) and hasattr(inception, "pool_dim") and hasattr(inception, "logits_dim")):
        raise ValueError(f"{who}: inception must come from inception_for_fid() (or be Missing/None), got {type(inception)}")
    return inception


def make_fid(inception: nn.Module, device) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(feature=Columns(0, inception.pool_dim)).to(device)


def make_is(inception: nn.Module, splits: int, device) -> InceptionScore:
    import warnings

    with warnings.catch_warnings():  # "IS will save all extracted features in buffer": 1008 floats per image, fine
        warnings.simplefilter("ignore", UserWarning)
        return InceptionScore(feature=Columns(inception.pool_dim, inception.logits_dim), splits=splits).to(device)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] model space -> [0,1] float32 (out-of-range reconstructions are clipped, as when saved as images)."""
    return (x.float().clamp(-1, 1) + 1) / 2


def to_uint8(x01: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """[0,1] -> uint8. "trunc": `.to(uint8)` of x*255, as the original's evaluation and `chw_to_pillow` do (43% of
    pixels land one level below rounding); "round": as torchvision.utils.save_image."""
    if mode not in ("trunc", "round"):
        raise ValueError(f"to_uint8: mode must be 'trunc' or 'round', got {mode!r}")
    x = x01 * 255
    return (x if mode == "trunc" else x.round()).to(torch.uint8)


def uint8_levels(x01: torch.Tensor) -> torch.Tensor:
    """[0,1] floats quantized as the original quantizes them before PSNR / SSIM: truncated to uint8, then /255."""
    return to_uint8(x01, "trunc").float() / 255


def inception_input(net: nn.Module, x01: torch.Tensor, uint8_mode: str) -> torch.Tensor:
    """What `net` takes: float [0,1] for pytorch-fid's network (input_kind "unit_float"), else uint8."""
    return x01 if getattr(net, "input_kind", "uint8") == "unit_float" else to_uint8(x01, uint8_mode)


def check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected an image batch (B,3,H,W), got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
