"""What a run cost: model FLOPs per optimizer step, the device's peak, peak memory. Logged at the end of a run by
RunContext (compute/* metrics); tables read them back (magvit2.results).

FLOPs per step:
- AR: analytic (Kaplan et al. 2020, "6N + attention"): per image token 6 x (inter-block params + M x intra-block
  params + head params) + 6 x dim x (n_inter x T + n_intra x M^2), T = grid^2 positions. Embedding lookups cost no
  FLOPs and are left out; the intra blocks run once per sub-token slot (M slots per token).
- tokenizer: measured with torch.utils.flop_counter.FlopCounterMode on meta tensors (shapes only, no compute) for
  one image: encoder + decoder, the generator's PatchGAN pass and the discriminator's real + fake passes, forward
  and backward. The quantizer (LFQ entropy / VQ lookup) and LPIPS are not counted.
"""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16/fp16 tensor-core peaks (TFLOP/s), from the vendors' data sheets; matched on torch's device name.
# Only mixed precision (bf16/fp16) has a peak here: fp32/TF32 runs are reported without one.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "A100": 312.0,
               "L40S": 362.1}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({sys.platform})"


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, what it is) or (None, why there is none): never a guess."""
    name = device_name(device)
    if device.type != "cuda":
        return None, f"no known peak for {name}"
    if precision not in ("bf16", "fp16"):
        return None, f"trainer precision {precision!r}: only bf16/fp16 tensor-core peaks are tabulated"
    hit = next((k for k in PEAK_TFLOPS if k in name), None)
    if hit is None:
        return None, f"no known peak for {name!r} (magvit2.runtime.compute.PEAK_TFLOPS)"
    return PEAK_TFLOPS[hit] * 1e12, f"{name}: {PEAK_TFLOPS[hit]:g} TFLOP/s dense {precision}"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(metric key, GiB): torch.cuda.max_memory_allocated on a GPU; on CPU the process's max RSS (a different
    quantity: every allocation of the process, the interpreter and libraries included), under its own key."""
    if device.type == "cuda":
        return "compute/peak_gpu_mem_gib", torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "compute/peak_rss_gib", rss / (2**30 if sys.platform == "darwin" else 2**20)


def ar_flops_per_token(cfg, grid: int) -> float:
    from magvit2.build import build_ar
    with torch.device("meta"):  # parameter shapes only: an XL model costs nothing to build here
        m = build_ar(cfg, grid)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    big_m, t, d = len(cfg.factorization.bits), grid * grid, int(cfg.model.dim)
    dense = n(m.inter) + big_m * n(m.intra) + n(m.heads) + n(m.norm)
    attention = d * (len(m.inter) * t + len(m.intra) * big_m * big_m)
    return 6.0 * (dense + attention)


def tokenizer_flops_per_image(cfg) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from magvit2.build import build_discriminator, build_tokenizer
    r = int(cfg.tokenizer.resolution)
    with torch.device("meta"):
        g, (d, _) = build_tokenizer(cfg), build_discriminator(cfg)
        x = torch.zeros(1, 3, r, r)
    with FlopCounterMode(display=False) as fc:
        x_rec = g.decoder(g.encoder(x))
        (x_rec.abs().mean() + d(x_rec).mean()).backward()
        (d(x).mean() + d(x_rec.detach()).mean()).backward()
    return float(fc.get_total_flops())


def flops_per_step(cfg, stage: str, grid: int | None) -> tuple[float | None, str]:
    """(model FLOPs of one optimizer step over all processes, how they were counted) or (None, why not)."""
    batch = int(cfg.trainer[stage].batch_size)  # global batch (GlobalBatchSampler)
    try:
        if stage == "ar":
            if not grid:
                return None, "token grid unknown (derived.grid not recorded)"
            return ar_flops_per_token(cfg, grid) * batch * grid * grid, "analytic: 6N + attention (Kaplan)"
        return tokenizer_flops_per_image(cfg) * batch, "measured: FlopCounterMode (G enc+dec, PatchGAN; fwd+bwd)"
    except Exception as e:  # noqa: BLE001 - a model the counter cannot trace is reported, not guessed
        return None, f"FLOP count failed: {type(e).__name__}: {e}"

# MLflow tags of a run's accounting: the device, how its FLOPs were counted, where its peak came from (or why none)
DEVICE_TAG, FLOPS_TAG, PEAK_TAG = "magvit2.compute.device", "magvit2.compute.flops", "magvit2.compute.peak"
