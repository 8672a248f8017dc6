"""`python -m magvit2.bench [--device cuda] [--dtype bf16] [--quick]`: throughput of the hot paths on this hardware.

torch + einops only (runs on a bare GPU image): LFQ entropy (exact factorized vs the reference's dense N x 2^K),
tokenizer forward+backward, AR training step, AR sampling with and without KV cache. Prints a table of measured
times; nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import time

import torch

from magvit2.models.ar import ARConfig, FactorizedAR
from magvit2.models.tokenizer import Tokenizer
from magvit2.quantizers import LFQ, dense_entropy_terms, entropy_terms


def timeit(fn, device, warmup: int = 1, reps: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def bench_entropy(device, sizes):
    rows = []
    for n, k in sizes:
        z = torch.randn(n, k, device=device, requires_grad=True)

        def fact():
            hs, hc = entropy_terms(z, 0.01, 1e-5, sync=False)
            (hs - hc).backward()

        def dense():
            hs, hc = dense_entropy_terms(z, 0.01, 1e-5)
            (hs - hc).backward()
        t_f = timeit(fact, device)
        dense_bytes = n * 2 ** k * 4
        t_d = timeit(dense, device) if dense_bytes < (8e9 if device.type == "cuda" else 2e9) else float("nan")
        rows.append((f"LFQ entropy fwd+bwd N={n} K={k}", f"{t_f * 1e3:.1f} ms", f"dense {t_d * 1e3:.1f} ms"
                     if t_d == t_d else f"dense skipped ({dense_bytes / 1e9:.0f} GB)"))
    return rows


def bench_tokenizer(device, dtype, cfgs):
    rows = []
    for name, ch, mult, nb, res, bs in cfgs:
        m = Tokenizer(LFQ(18), ch=ch, ch_mult=mult, num_res_blocks=nb, resolution=res).to(device)
        m = m.to(memory_format=torch.channels_last)
        x = torch.randn(bs, 3, res, res, device=device).to(memory_format=torch.channels_last)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                xr, q = m(x)
                loss = (xr.float() - x).abs().mean() + q.loss
            loss.backward()
        t = timeit(step, device)
        rows.append((f"tokenizer {name} fwd+bwd batch {bs} @{res}px", f"{t * 1e3:.0f} ms", f"{bs / t:.1f} img/s"))
    return rows


def bench_ar(device, dtype, cfgs):
    rows = []
    for name, dim, ni, nintra, heads, grid, bs, gen_bs in cfgs:
        cfg = ARConfig(bits=(6, 12), dim=dim, n_inter=ni, n_intra=nintra, n_heads=heads, num_classes=1000, grid=grid)
        m = FactorizedAR(cfg).to(device)
        T = grid * grid
        sub = torch.stack([torch.randint(0, 64, (bs, T)), torch.randint(0, 4096, (bs, T))], -1).to(device)
        y = torch.randint(0, 1000, (bs,), device=device)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = m.loss(sub, y)
            loss.backward()
        t = timeit(step, device)
        rows.append((f"AR {name} train step batch {bs}", f"{t * 1e3:.0f} ms", f"{bs * T / t:,.0f} tokens/s"))
        labels = torch.randint(0, 1000, (gen_bs,), device=device)
        for cached in (True, False):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                t = timeit(lambda: m.generate(labels, cfg_scale=(1.9, 2.0), use_cache=cached), device, 0, 1)
            rows.append((f"AR {name} sample batch {gen_bs} CFG, {'KV cache' if cached else 'no cache'}",
                         f"{t:.2f} s", f"{gen_bs / t:.2f} img/s"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--full", action="store_true", help="paper sizes (256-L tokenizer, AR-B/L/XL); needs a GPU")
    a = ap.parse_args(argv)
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    if a.full:
        ent = [(2048, 18), (16384, 18), (65536, 18)]
        tok = [("256-L", 128, (1, 1, 2, 2, 4), 4, 256, 8)]
        ar = [("B", 1024, 24, 2, 16, 16, 32, 64), ("L", 1280, 36, 3, 20, 16, 16, 64), ("XL", 1536, 48, 4, 24, 16, 8, 64)]
    else:
        ent = [(1024, 12), (4096, 18)]
        tok = [("tiny", 24, (1, 2, 2), 1, 32, 16)]
        ar = [("tiny", 128, 4, 1, 4, 8, 16, 16)]
    rows = bench_entropy(device, ent) + bench_tokenizer(device, dtype, tok) + bench_ar(device, dtype, ar)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"magvit2.bench on {name}, torch {torch.__version__}, {a.dtype}")
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"  {r[0]:<{w}}  {r[1]:>10}  {r[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
