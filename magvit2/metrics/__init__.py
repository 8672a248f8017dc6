"""Evaluation metrics: reconstruction (PSNR, SSIM, LPIPS, rFID, codebook usage) and generation (FID, IS).

Pretrained networks: local file, hub cache or download (pretrained.py); without them a metric is a
Missing(reason), never a number.
"""
from .adm import AdmNpzWriter, export_adm_npz
from .generation import GenerationMetrics
from .missing import Missing
from .pretrained import (InceptionFeatures, find_weights, inception_for_fid, inception_from_config, load_lpips,
                         lpips_from_config)
from .reconstruction import ReconstructionMetrics, codebook_stats
from .ssim import ssim_uniform

__all__ = [
    "GenerationMetrics",
    "InceptionFeatures",
    "Missing",
    "ReconstructionMetrics",
    "codebook_stats",
    "AdmNpzWriter",
    "export_adm_npz",
    "find_weights",
    "inception_for_fid",
    "inception_from_config",
    "load_lpips",
    "lpips_from_config",
    "ssim_uniform",
]
