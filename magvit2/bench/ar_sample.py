"""`ar-sample`: class-conditional sampling with CFG: the plain loop (whole prefix every step) vs the growing KV
cache vs the static preallocated cache (fixed shapes), compiled, and CUDA-graphed on a GPU; the sampled tokens are
compared with the plain loop's for the same seed; images/s (tokens/s) at several batch sizes."""
from __future__ import annotations

import statistics

import torch

from magvit2.models.ar import FactorizedAR

from .ar_train import config
from .common import compile_unavailable, interleaved, paired_ratio, row

CFG_SCALE = (1.9, 2.0)  # conf/sampling/B.yaml


def variants(device, compile_on: bool) -> list[tuple[str, object, str | None]]:
    """(name, use_cache, why skipped); compiled variants are set up in run()."""
    no_compile = compile_unavailable(device) if compile_on else "off (--no-compile)"
    no_graphs = no_compile or (None if device.type == "cuda" else "CUDA graphs need a CUDA device")
    return [("plain loop", False, None), ("KV cache", True, None), ("static cache", "static", None),
            ("static + compile", "static", no_compile), ("static + CUDA graphs", "static", no_graphs)]


def run(device, dtype, quick: bool, size=None, compile_on=True, smoke=False, **_) -> dict:
    size = size or ("tiny" if quick or device.type == "cpu" else "B")
    cfg = config(size)
    cfg.class_dropout = 0.0
    torch.manual_seed(0)
    model = FactorizedAR(cfg).to(device).eval()
    for h in model.heads:  # zero heads (the init) would sample uniformly whatever the model computes
        torch.nn.init.normal_(h.weight, 0.0, 0.02)
    batches = [2] if smoke else [4, 16] if quick else ([8, 32] if device.type == "cpu" else [16, 64, 256, 512])
    rounds = 1 if smoke else 2 if quick else 5
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    rows = []
    todo = [(n, c) for n, c, skip in variants(device, compile_on) if not skip]
    rows += [row(f"{size} CFG", n, note=f"skipped: {skip}") for n, _, skip in variants(device, compile_on) if skip]
    # one sampler object per variant (the compiled ones keep their graphs), timed interleaved round by round
    samplers = {}
    for name, use_cache in todo:
        m = FactorizedAR(cfg).to(device).eval()
        m.load_state_dict(model.state_dict())
        if "compile" in name or "CUDA" in name:
            m.compile_sampling(cuda_graphs="CUDA" in name)
        samplers[name] = (m, use_cache)
    for b in batches:
        labels = torch.arange(b, device=device) % cfg.num_classes

        def go(m, use_cache):
            with torch.autocast(**amp):
                return m.generate(labels, cfg_scale=CFG_SCALE, use_cache=use_cache,
                                  generator=torch.Generator(device).manual_seed(0))
        outs = {name: go(*s) for name, s in samplers.items()}  # warmup (compilation, capture) and the tokens
        times = interleaved({name: (lambda s=s: go(*s)) for name, s in samplers.items()}, device, rounds)
        plain, cached = times.get("plain loop"), times.get("KV cache")
        for name, ts in times.items():
            t = statistics.median(ts)
            rows.append(row(f"{size} CFG batch {b}", name, time_s=t, throughput=b / t, unit="img/s",
                            tokens_per_s=b * cfg.seq_len / t, rounds=len(ts),
                            speedup=paired_ratio(plain, ts) if plain else None,
                            vs_kv_cache=paired_ratio(cached, ts) if cached else None,
                            identical_to_plain=bool(torch.equal(outs[name], outs["plain loop"]))
                            if "plain loop" in outs else None))
    return {"rows": rows, "summary": {"seq_len": cfg.seq_len, "cfg_scale": CFG_SCALE, "batches": batches,
                                      "timing": f"interleaved, {rounds} rounds; ratios: median of paired rounds"}}
