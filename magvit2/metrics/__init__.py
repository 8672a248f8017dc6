"""Evaluation metrics: reconstruction (PSNR, SSIM, LPIPS, rFID, codebook usage) and generation (FID, IS), and the
registry (registry.py) that names every logged metric.

Pretrained networks: local file, hub cache or download (pretrained.py); without them a metric is a
Missing(reason), never a number. The names below load on first use, so that importing the registry (a sweep's
status, the report's labels) does not import torch.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "AdmNpzWriter": "adm",
    "export_adm_npz": "adm",
    "GenerationMetrics": "generation",
    "Missing": "missing",
    "InceptionFeatures": "pretrained",
    "find_weights": "pretrained",
    "inception_for_fid": "pretrained",
    "inception_from_config": "pretrained",
    "load_lpips": "pretrained",
    "lpips_from_config": "pretrained",
    "ReconstructionMetrics": "reconstruction",
    "codebook_stats": "reconstruction",
    "reconstruct": "reconstruction",
    "ssim_uniform": "ssim",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
