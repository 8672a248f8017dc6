"""Evaluation metrics: reconstruction (PSNR, SSIM, LPIPS, rFID, codebook usage) and generation (FID, IS).

Pretrained networks come from local files only; without them a metric is a Missing(reason), never a number.
"""
from .adm import export_adm_npz
from .generation import GenerationMetrics
from .missing import Missing, metric_value, missing_reasons
from .pretrained import InceptionFeatures, inception_for_fid, load_lpips
from .reconstruction import ReconstructionMetrics, codebook_stats
from .ssim import ssim_uniform

__all__ = [
    "GenerationMetrics",
    "InceptionFeatures",
    "Missing",
    "ReconstructionMetrics",
    "codebook_stats",
    "export_adm_npz",
    "inception_for_fid",
    "load_lpips",
    "metric_value",
    "missing_reasons",
    "ssim_uniform",
]
