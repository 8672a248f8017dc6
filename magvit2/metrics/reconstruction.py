"""Tokenizer evaluation: PSNR, two SSIMs, LPIPS, rFID and codebook usage, accumulated over an eval pass.

All on [0,1] images after clipping both inputs to [-1,1]; every value is a mean over images. `protocol`
(metrics/protocol.py) says how: under `reference` (the default, the original's arithmetic) PSNR and both SSIMs see
the images truncated to uint8 levels, rFID's network is pytorch-fid's on the floats, and LPIPS-Alex is added when
its model is given; under `precise` they see the floats and rFID's network gets rounded uint8.
- 'psnr': torchmetrics PSNR, data_range 1, per image (dim=(1,2,3)), then averaged.
- 'ssim': torchmetrics SSIM: Gaussian window 11x11, sigma 1.5, population covariance, data_range 1; torchmetrics
  1.9 averages the SSIM map over the whole image, its mirror-padded border included.
- 'ssim_skimage': scikit-image's default SSIM (7x7 uniform window, sample covariance, border cropped, per channel,
  data_range 1), which is what the reference reports. The two differ: always say which one a table shows.
- 'lpips': lpips package (VGG trunk unless another model is given), inputs in [-1,1]; 'lpips_alex': AlexNet trunk.
- 'rfid': Frechet distance of Inception pool features, originals ('real') vs reconstructions ('fake'). FID is biased
  upwards at small N (a 2048-d covariance needs thousands of images; the reference uses the 50k ImageNet val
  images), so 'n_images' is reported next to it: compare rFIDs only at equal N.
- 'utilization': share of the codebook_size codes that occurred at least once; 'perplexity': exp(entropy) of the
  code histogram (= number of codes in use if they were used equally often). Both come from one histogram summed
  over every batch of the pass and every rank, never from one batch; 'n_tokens' is its total.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from .accumulators import CodeHistogram, Count, MeanOverImages
from . import protocol as P
from .inception import check_images, check_inception, inception_input, make_fid, to_unit, uint8_levels
from .missing import Missing, finite_or_missing
from .ssim import ssim_uniform


def codebook_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(utilization, perplexity) of a code histogram."""
    total = counts.sum()
    if total == 0:
        raise ValueError("codebook_stats: empty histogram (no indices seen)")
    used = counts > 0  # the usage bitmap
    p = counts[used].double() / total
    return float(used.sum()) / counts.numel(), math.exp(float(-(p * p.log()).sum()))


class ReconstructionMetrics:
    """Accumulates over update() calls; device-agnostic; works without weights (LPIPS/rFID then Missing)."""

    def __init__(self, codebook_size: int, lpips_model=None, inception=None, device="cpu", protocol=None,
                 lpips_alex=None):
        """lpips_alex: None leaves 'lpips_alex' out of the results; a model or a Missing reports it."""
        if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive int (2**K for LFQ), got {codebook_size!r}")
        self.codebook_size, self.device = codebook_size, torch.device(device)
        self.protocol = P.get(protocol)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(self.device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(self.device)
        self.ssim_skimage = MeanOverImages().to(self.device)
        self.codes = CodeHistogram(codebook_size).to(self.device)
        self.n_images = Count().to(self.device)

        if lpips_model is None:
            lpips_model = Missing("no LPIPS model given: set metrics.vgg16_weights=PATH (torchvision vgg16-397923af.pth)")
        self.lpips = lpips_model if isinstance(lpips_model, Missing) else lpips_model.to(self.device).eval()
        self.lpips_mean = MeanOverImages().to(self.device)
        self.lpips_alex = lpips_alex if lpips_alex is None or isinstance(lpips_alex, Missing) else \
            lpips_alex.to(self.device).eval()
        self.lpips_alex_mean = MeanOverImages().to(self.device)

        self.inception = check_inception(inception, "ReconstructionMetrics")
        if not isinstance(self.inception, Missing):
            self.inception = self.inception.to(self.device)
            self.fid = make_fid(self.inception, self.device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_rec: torch.Tensor, indices: torch.Tensor) -> None:
        """x, x_rec: (B,3,H,W) in [-1,1]; indices: (B,h,w) integer codes in [0, codebook_size)."""
        check_images(x, "x")
        if not isinstance(x_rec, torch.Tensor) or x_rec.shape != x.shape:
            got = tuple(x_rec.shape) if isinstance(x_rec, torch.Tensor) else type(x_rec).__name__
            raise ValueError(f"x_rec must have the shape of x {tuple(x.shape)}, got {got}")
        if indices.dim() != 3 or indices.shape[0] != x.shape[0] or indices.numel() == 0 or indices.is_floating_point():
            raise ValueError(
                f"indices must be non-empty integer (B,h,w) with B={x.shape[0]}, got {indices.dtype} {tuple(indices.shape)}"
            )
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"indices must lie in [0, codebook_size={self.codebook_size}), got [{lo}, {hi}]")

        real, fake = to_unit(x.to(self.device)), to_unit(x_rec.to(self.device))
        pr, pf = (uint8_levels(real), uint8_levels(fake)) if self.protocol.pixels == "trunc" else (real, fake)
        self.psnr.update(pf, pr)
        self.ssim.update(pf, pr)
        self.ssim_skimage.update(ssim_uniform(pf, pr))
        self.codes.update(indices.to(self.device))
        if not isinstance(self.lpips, Missing):
            self.lpips_mean.update(self.lpips(real * 2 - 1, fake * 2 - 1))
        if self.lpips_alex is not None and not isinstance(self.lpips_alex, Missing):
            self.lpips_alex_mean.update(self.lpips_alex(real * 2 - 1, fake * 2 - 1))
        if not isinstance(self.inception, Missing):
            mode = self.protocol.to_uint8
            self.fid.update(self.inception(inception_input(self.inception, real, mode)), real=True)
            self.fid.update(self.inception(inception_input(self.inception, fake, mode)), real=False)
        self.n_images.update(x.shape[0])

    def _metrics(self):
        yield from (self.psnr, self.ssim, self.ssim_skimage, self.codes, self.n_images, self.lpips_mean,
                    self.lpips_alex_mean)
        if not isinstance(self.inception, Missing):
            yield self.fid

    def reset(self) -> None:
        """Start a new eval pass (keeps the networks)."""
        for m in self._metrics():
            m.reset()

    def compute(self) -> dict[str, float | Missing]:
        if self.n_images.update_count == 0:
            raise RuntimeError("ReconstructionMetrics.compute() before any update()")
        n = self.n_images.total()
        counts = self.codes.compute()
        utilization, perplexity = codebook_stats(counts)
        out: dict[str, float | Missing] = {
            "psnr": float(self.psnr.compute()),
            "ssim": float(self.ssim.compute()),
            "ssim_skimage": float(self.ssim_skimage.compute()),
            "lpips": self.lpips if isinstance(self.lpips, Missing) else float(self.lpips_mean.compute()),
            "utilization": utilization,
            "perplexity": perplexity,
            "n_images": float(n),
            "n_tokens": float(counts.sum()),
        }
        if self.lpips_alex is not None:
            out["lpips_alex"] = self.lpips_alex if isinstance(self.lpips_alex, Missing) else \
                float(self.lpips_alex_mean.compute())
        if isinstance(self.inception, Missing):
            out["rfid"] = self.inception
        elif n < 2:
            out["rfid"] = Missing(f"rFID needs >= 2 images, got {n}")
        else:
            out["rfid"] = finite_or_missing(float(self.fid.compute()), "rFID")
        return out


@torch.no_grad()
def reconstruct(tokenizer, batches, rm: ReconstructionMetrics, autocast=contextlib.nullcontext) -> tuple[dict, tuple]:
    """The tokenizer evaluation loop of training and of `python -m magvit2.evaluate tokenizer`: every batch (images,
    or (images, labels)) through `tokenizer` (in the mode and weights the caller set) into `rm`. -> (rm.compute(),
    the first batch's first 8 (originals, reconstructions) on the CPU, for a grid; None without batches). Every rank
    must call it: compute() sums the states over the process group."""
    first = None
    for x in batches:
        x = (x[0] if isinstance(x, (list, tuple)) else x).to(rm.device)
        with autocast():
            x_rec, q = tokenizer(x)
        x_rec = x_rec.float().clamp(-1, 1)
        rm.update(x, x_rec, q.indices)
        if first is None:
            first = (x[:8].cpu(), x_rec[:8].cpu())
    return rm.compute(), first
