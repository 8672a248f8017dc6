"""Random-weight files in the exact layouts of the real pretrained files, to exercise the loading code paths.

The numbers they produce are meaningless; tests only check behaviour (FID(x, x) ~ 0, LPIPS(x, x) = 0, the loaded
tensors equal the file's), never report them as metric values.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torchvision


def make_vgg16_weights(path: str | os.PathLike, seed: int = 0) -> str:
    """A torchvision vgg16 state_dict (layout of vgg16-397923af.pth) with torchvision's random init."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return os.fspath(path)


def make_inception_weights(path: str | os.PathLike, seed: int = 0) -> str:
    """A state_dict for torch-fidelity's FeatureExtractorInceptionV3 (layout of pt_inception-2015-12-05), random.

    The class loads weights in its constructor (download when no path), so it is built from a placeholder file
    with loading disabled. Convs get He-normal init: with PyTorch's default init the 2048-d features shrink to
    ~1e-8 and FID differences drown in float32 rounding.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None  # keep the random init

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        placeholder = os.path.join(d, "empty.pth")
        torch.save({}, placeholder)
        net = Skeleton("skeleton", ["2048"], feature_extractor_weights_path=placeholder)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=net.fc.in_features**-0.5)
    torch.save(net.state_dict(), path)
    return os.fspath(path)


def make_alexnet_weights(path: str | os.PathLike, seed: int = 0) -> str:
    """A torchvision alexnet state_dict (layout of alexnet-owt-7be5be79.pth) with torchvision's random init."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return os.fspath(path)
