"""`tokenizer`: one training step of the stage's (G: L1 + LFQ + GAN [+ LPIPS]; D: hinge + LeCAM; two Adams),
eager vs torch.compile vs channels_last; FLOPs from torch.utils.flop_counter, MFU against the measured matmul peak."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from magvit2.models.discriminator import LeCAM, PatchDiscriminator, generator_adv_loss, hinge_d_loss
from magvit2.models.tokenizer import Tokenizer
from magvit2.quantizers import LFQ

from .common import compile_unavailable, count_flops, measure, mfu, row

# name: (ch, ch_mult, num_res_blocks, resolution, disc ndf, disc layers, batch)
SIZES = {"tiny": (24, (1, 2, 2), 1, 32, 16, 2, 16), "256-L": (128, (1, 1, 2, 2, 4), 4, 256, 64, 3, 8),
         "128-L": (128, (1, 2, 2, 4), 4, 128, 64, 3, 16)}


def _lpips(device):
    """LPIPS-VGG from local weights only (never downloaded here); (model, None) or (None, why not)."""
    try:
        from magvit2.metrics.pretrained import load_lpips
        m = load_lpips(None, download=False)
    except ImportError as e:
        return None, f"LPIPS off: {e}"
    if not isinstance(m, torch.nn.Module):
        return None, f"LPIPS off: {getattr(m, 'reason', m)}"
    return m.to(device), None


def make_step(size: str, device, dtype, channels_last: bool = False, compiled: bool = False, lpips=None):
    """(step(x=None) -> G loss: one G + D update on x, default a fixed random batch; batch size; the parts)."""
    ch, mult, nb, res, ndf, layers, bs = SIZES[size]
    g = Tokenizer(LFQ(18), ch=ch, ch_mult=mult, num_res_blocks=nb, resolution=res).to(device)
    d, lecam = PatchDiscriminator(3, ndf, layers).to(device), LeCAM().to(device)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-4, (0.5, 0.9)), torch.optim.Adam(d.parameters(), 1e-4, (0.5, 0.9))
    x = torch.rand(bs, 3, res, res, device=device) * 2 - 1
    if channels_last:
        g, d, x = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    gf, df = (torch.compile(g), torch.compile(d)) if compiled else (g, d)
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(x=x):
        with torch.autocast(**amp):
            x_rec, q = gf(x)
            loss = F.l1_loss(x_rec.float(), x) + q.loss
            if lpips is not None:
                loss = loss + lpips(x_rec.float(), x).mean()
            d.requires_grad_(False)
            loss = loss + 0.1 * generator_adv_loss(df(x_rec))
            d.requires_grad_(True)
        loss.backward()
        opt_g.step(), opt_g.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            lr_, lf_ = df(x), df(x_rec.detach())
            d_loss = hinge_d_loss(lr_.float(), lf_.float()) + 0.01 * lecam(lr_.float(), lf_.float())
        d_loss.backward()
        opt_d.step(), opt_d.zero_grad(set_to_none=True)
        return loss.detach(), q
    return step, bs, dict(g=g, d=d, lecam=lecam, opt_g=opt_g, opt_d=opt_d)


def run(device, dtype, quick: bool, size=None, compile_on=True, matmul_peak=None, smoke=False, **_) -> dict:
    size = size if size in SIZES else ("tiny" if quick or device.type == "cpu" else "256-L")
    lpips, why = _lpips(device)
    no_compile = compile_unavailable(device) if compile_on else "off (--no-compile)"
    rows, flops = [], None
    for name, kw in (("eager", {}), ("channels_last", {"channels_last": True}), ("compile", {"compiled": True})):
        case = f"{size} batch {SIZES[size][-1]} @{SIZES[size][3]}px"
        if kw.get("compiled") and no_compile:
            rows.append(row(case, name, note=f"skipped: {no_compile}"))
            continue
        step, bs, _ = make_step(size, device, dtype, lpips=lpips, **kw)
        if flops is None:
            flops = count_flops(step)
        m = measure(step, device, warmup=2 if kw.get("compiled") else 1, reps=1 if smoke else 3)
        rows.append(row(case, name, **m, flops=flops, mfu=mfu(flops, m["time_s"], matmul_peak),
                        throughput=bs / m["time_s"], unit="img/s"))
    eager = rows[0]["time_s"]
    for r in rows[1:]:
        if r.get("time_s"):
            r["speedup"] = eager / r["time_s"]
    return {"rows": rows, "summary": {"lpips": "on (local VGG16 weights)" if lpips is not None else why,
                                      "flops_per_step": flops, "flops_source": "torch.utils.flop_counter"}}
