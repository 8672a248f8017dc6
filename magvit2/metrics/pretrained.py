"""Pretrained networks for the metrics, from local files only (nothing may be downloaded at run time).

LPIPS: the lpips package's calibrated linear layers ship inside its wheel; its trunk (torchvision VGG16/AlexNet)
is built randomly and then overwritten from a torchvision state_dict file.
FID/IS: torch-fidelity's InceptionV3 (pt_inception-2015-12-05 weights, the TF FID graph converted to PyTorch).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .missing import Missing

# torchvision file name of each LPIPS trunk, and the setting that points at it.
LPIPS_TRUNKS = {
    "vgg": ("vgg16-397923af.pth", "metrics.vgg16_weights", "torchvision vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "metrics.alexnet_weights", "torchvision alexnet-owt-7be5be79.pth"),
}
# torch-fidelity downloads to the first name, pytorch-fid to the second; same converted TF graph, same keys.
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SETTING = "metrics.inception_weights"


def hub_checkpoint(name: str) -> Path | None:
    """The file in torch.hub's checkpoint dir (where a previous online download would have put it), if present."""
    p = Path(torch.hub.get_dir()) / "checkpoints" / name
    return p if p.is_file() else None


def _existing(path: str | os.PathLike, setting: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{setting}={path}: no such file; point it at the downloaded weights or leave it unset")
    return p


def load_lpips(vgg_weights: str | os.PathLike | None, net: str = "vgg") -> "lpips.LPIPS | Missing":  # noqa: F821
    """Frozen lpips.LPIPS (eval mode) with its trunk loaded from a local torchvision state_dict, or Missing.

    `vgg_weights` is the trunk file (for net='alex' an AlexNet file); None looks in torch.hub's checkpoint dir.
    """
    if net not in LPIPS_TRUNKS:
        raise ValueError(f"net={net!r}: supported LPIPS trunks are {sorted(LPIPS_TRUNKS)}")
    fname, setting, what = LPIPS_TRUNKS[net]
    if vgg_weights is None:
        found = hub_checkpoint(fname)
        if found is None:
            trunk = "VGG16" if net == "vgg" else "AlexNet"
            return Missing(f"no {trunk} weights: set {setting}=PATH ({what})")
        path = found
    else:
        path = _existing(vgg_weights, setting)

    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips names each trunk layer by its torchvision index: net.sliceK.<i>.weight <- features.<i>.weight
    mapped = {}
    for key in model.net.state_dict():
        src = "features." + re.sub(r"^slice\d+\.", "", key)
        if src not in state:
            raise ValueError(f"{setting}={path}: not a torchvision {net} state_dict (no key {src!r})")
        mapped[key] = state[src]
    model.net.load_state_dict(mapped, strict=True)
    model.requires_grad_(False)
    return model.eval()


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3; uint8 (B,3,H,W) -> (B, 2048 + 1008): pool features, then unbiased logits.

    One pass feeds both FID (pool) and IS (logits, as torch-fidelity/torchmetrics use for IS). Inputs are resized
    to 299 inside with torch-fidelity's TF1-compatible bilinear resize (no antialias, as the original FID graph).
    """

    pool_dim = 2048
    logits_dim = 1008

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # BatchNorm statistics are part of the FID definition

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionFeatures: expected uint8 (B,3,H,W), got {x.dtype} {tuple(x.shape)}")
        pool, logits = self.net(x)
        return torch.cat([pool, logits], dim=1)


def inception_for_fid(weights: str | os.PathLike | None) -> InceptionFeatures | Missing:
    """The FID/IS Inception from a local pt_inception-2015-12-05 file; None looks in torch.hub's checkpoint dir."""
    if weights is None:
        found = next((p for p in map(hub_checkpoint, INCEPTION_FILES) if p is not None), None)
        if found is None:
            return Missing(
                f"no InceptionV3 FID weights: set {INCEPTION_SETTING}=PATH (torch-fidelity/pytorch-fid "
                f"pt_inception-2015-12-05-6726825d.pth)"
            )
        path = found
    else:
        path = _existing(weights, INCEPTION_SETTING)
    try:
        return InceptionFeatures(path)
    except RuntimeError as e:  # load_state_dict key/shape mismatch
        raise ValueError(f"{INCEPTION_SETTING}={path}: not a pt_inception-2015-12-05 state_dict ({e})") from e
