"""Pretrained networks for the metrics: a local file, else torch hub's cache, else a download into that cache.

Order for each file: its path setting (metrics.inception_weights / metrics.vgg16_weights; set but absent is an
error), then torch.hub.get_dir()/checkpoints/<library file name>, then the library's own URL (overridable, e.g. a
mirror; metrics.download=false switches it off). Only when all fail is the metric a Missing whose reason lists
what was tried, never a number from random weights.
LPIPS: the lpips package's calibrated linear layers ship inside its wheel; its trunk (torchvision VGG16/AlexNet)
is built randomly and then overwritten from a torchvision state_dict file.
FID/IS: torch-fidelity's InceptionV3 (pt_inception-2015-12-05 weights, the TF FID graph converted to PyTorch) on
uint8 images; rFID under metrics.protocol=reference: pytorch-fid's InceptionV3 (the original's network) on float
[0, 1] images, loaded from the same file (one key layout).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .missing import Missing

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: a firewalled cluster must not stall every evaluation for long


@dataclass(frozen=True)
class WeightFile:
    what: str  # for messages
    names: tuple[str, ...]  # file names in torch hub's checkpoint dir; a download is saved under the first
    setting: str  # the local path setting
    url_setting: str
    url: str  # the library's own URL
    sha256: str | None  # prefix checked when downloading from `url` (torchvision checks it too); None: not known


# torch-fidelity downloads the Inception to the first name, pytorch-fid to the second; same converted TF graph.
INCEPTION = WeightFile("InceptionV3 FID weights (torch-fidelity/pytorch-fid pt_inception-2015-12-05-6726825d.pth)",
                       ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
                       "metrics.inception_weights", "metrics.inception_url",
                       "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth", None)
LPIPS_TRUNKS = {
    "vgg": WeightFile("VGG16 weights (torchvision vgg16-397923af.pth)", ("vgg16-397923af.pth",),
                      "metrics.vgg16_weights", "metrics.vgg16_url",
                      "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"),
    "alex": WeightFile("AlexNet weights (torchvision alexnet-owt-7be5be79.pth)", ("alexnet-owt-7be5be79.pth",),
                       "metrics.alexnet_weights", "metrics.alexnet_url",
                       "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),
}
INCEPTION_FILES, INCEPTION_SETTING = INCEPTION.names, INCEPTION.setting
_FAILED: dict[str, str] = {}  # url -> error: periodic evaluations do not retry a dead download in one process


def hub_checkpoint(name: str) -> Path | None:
    """The file in torch.hub's checkpoint dir (where a previous online download would have put it), if present."""
    p = Path(torch.hub.get_dir()) / "checkpoints" / name
    return p if p.is_file() else None


def _existing(path: str | os.PathLike, setting: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{setting}={path}: no such file; point it at the downloaded weights or leave it unset")
    return p


def _download(url: str, dst: Path, sha256: str | None) -> str | None:
    """None on success, else the error. Atomic: torch.hub writes a .partial file and renames it."""
    if url in _FAILED:
        return _FAILED[url] + " (earlier in this process)"
    log.info(f"downloading {url} -> {dst}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # download_url_to_file takes no timeout; urlopen uses this one
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256, progress=False)
        return None
    except Exception as e:  # noqa: BLE001 - any failure (DNS, refused, HTTP error, hash) means "not available"
        _FAILED[url] = f"{type(e).__name__}: {e}"
        return _FAILED[url]
    finally:
        socket.setdefaulttimeout(old)


def find_weights(spec: WeightFile, path, url: str | None = None, download: bool = True) -> Path | Missing:
    """The weight file: `path` (must exist), else the hub cache, else a download from `url` (default: the
    library's) into the cache; Missing listing what was tried when all three fail."""
    if path is not None:
        return _existing(path, spec.setting)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    found = next((p for p in map(hub_checkpoint, spec.names) if p is not None), None)
    if found is not None:
        return found
    url = url or spec.url
    tried = [f"{spec.setting} unset", f"not in torch hub's cache {cache}"]
    if not download:
        tried.append("download off (metrics.download=false)")
    else:
        # the known hash only fits the library's own file; a mirror's file is checked by loading it strictly
        err = _download(url, cache / spec.names[0], spec.sha256 if url == spec.url else None)
        if err is None:
            return cache / spec.names[0]
        tried.append(f"download from {spec.url_setting}={url} failed ({err})")
    return Missing(f"no {spec.what}: {'; '.join(tried)}; set {spec.setting}=PATH")


def load_lpips(vgg_weights: str | os.PathLike | None, net: str = "vgg", *, url: str | None = None,
               download: bool = True) -> "lpips.LPIPS | Missing":  # noqa: F821
    """Frozen lpips.LPIPS (eval mode) with its trunk loaded from a torchvision state_dict, or Missing.

    `vgg_weights` is the trunk file (for net='alex' an AlexNet file); None: hub cache, then download (find_weights).
    """
    if net not in LPIPS_TRUNKS:
        raise ValueError(f"net={net!r}: supported LPIPS trunks are {sorted(LPIPS_TRUNKS)}")
    setting = LPIPS_TRUNKS[net].setting
    path = find_weights(LPIPS_TRUNKS[net], vgg_weights, url, download)
    if isinstance(path, Missing):
        return path

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


class FrozenNet(nn.Module):
    """A metric's network: no gradients, always in eval mode (BatchNorm statistics are part of the FID definition)."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenNet":
        return super().train(False)


class PytorchFidInception(FrozenNet):
    """pytorch-fid's FID InceptionV3, the network of the original's rFID: float [0,1] (B,3,H,W) -> (B, 2048) pool
    features. pytorch-fid's own forward resizes to 299 (F.interpolate, bilinear, align_corners=False) and maps to
    [-1, 1] (2x - 1)."""

    pool_dim, logits_dim, input_kind = 2048, 0, "unit_float"

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from unittest import mock

        import pytorch_fid.inception as pfi

        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # pytorch-fid fetches its weights by URL inside fid_inception_v3(): hand it the file the chain found instead
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
            self.net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[self.pool_dim]], resize_input=True,
                                       normalize_input=True, use_fid_inception=True)
        self.freeze()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PytorchFidInception: expected float [0,1] (B,3,H,W), got {x.dtype} {tuple(x.shape)}")
        return self.net(x)[0].flatten(1)


class InceptionFeatures(FrozenNet):
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
        self.freeze()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionFeatures: expected uint8 (B,3,H,W), got {x.dtype} {tuple(x.shape)}")
        pool, logits = self.net(x)
        return torch.cat([pool, logits], dim=1)


def inception_for_fid(weights: str | os.PathLike | None, *, url: str | None = None, download: bool = True,
                      kind: str = "uint8") -> InceptionFeatures | PytorchFidInception | Missing:
    """The FID/IS Inception from a pt_inception-2015-12-05 file; None: hub cache, then download (find_weights).
    kind "uint8": torch-fidelity's (FID and IS); "pytorch_fid": pytorch-fid's (rFID of the reference protocol)."""
    if kind not in ("uint8", "pytorch_fid"):
        raise ValueError(f"inception_for_fid: kind must be 'uint8' or 'pytorch_fid', got {kind!r}")
    path = find_weights(INCEPTION, weights, url, download)
    if isinstance(path, Missing):
        return path
    try:
        return InceptionFeatures(path) if kind == "uint8" else PytorchFidInception(path)
    except RuntimeError as e:  # load_state_dict key/shape mismatch
        raise ValueError(f"{INCEPTION_SETTING}={path}: not a pt_inception-2015-12-05 state_dict ({e})") from e


def inception_from_config(metrics_cfg, kind: str = "uint8") -> InceptionFeatures | PytorchFidInception | Missing:
    """inception_for_fid with the `metrics:` config block's settings (weights, url, download)."""
    g = metrics_cfg.get
    return inception_for_fid(g("inception_weights"), url=g("inception_url"), download=bool(g("download", True)),
                             kind=kind)


def lpips_from_config(metrics_cfg, net: str = "vgg") -> "lpips.LPIPS | Missing":  # noqa: F821
    """load_lpips with the `metrics:` config block's settings for that trunk (weights, url, download)."""
    g, spec = metrics_cfg.get, LPIPS_TRUNKS[net]
    return load_lpips(g(spec.setting.split(".", 1)[1]), net, url=g(spec.url_setting.split(".", 1)[1]),
                      download=bool(g("download", True)))
