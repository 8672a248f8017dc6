"""`ar-sample`: class-conditional sampling with CFG: the plain loop (whole prefix every step) vs the growing KV
cache vs the static preallocated cache (fixed shapes), compiled, and CUDA-graphed on a GPU; the sampled tokens are
compared with the plain loop's for the same seed; images/s (tokens/s) at several batch sizes."""
from __future__ import annotations

import torch

from magvit2.models.ar import FactorizedAR

from .ar_train import config
from .common import compile_unavailable, row, timeit

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
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    rows, reference = [], {}
    for name, use_cache, skip in variants(device, compile_on):
        if skip:
            rows.append(row(f"{size} CFG", name, note=f"skipped: {skip}"))
            continue
        if "compile" in name or "CUDA" in name:
            model.compile_sampling(cuda_graphs="CUDA" in name)
        for b in batches:
            labels = torch.arange(b, device=device) % cfg.num_classes

            def go():
                with torch.autocast(**amp):
                    return model.generate(labels, cfg_scale=CFG_SCALE, use_cache=use_cache,
                                          generator=torch.Generator(device).manual_seed(0))
            out = go()  # warmup (compilation, graph capture) and the tokens to compare
            if name == "plain loop":
                reference[b] = out
            t = timeit(go, device, warmup=0, reps=1 if quick else 2)
            rows.append(row(f"{size} CFG batch {b}", name, time_s=t, throughput=b / t, unit="img/s",
                            tokens_per_s=b * cfg.seq_len / t,
                            identical_to_plain=bool(torch.equal(out, reference[b])) if b in reference else None))
        model._compiled = model._graph_caches = None
    plain = {r["case"]: r["time_s"] for r in rows if r["variant"] == "plain loop"}
    for r in rows:
        if r.get("time_s") and r["case"] in plain:
            r["speedup"] = plain[r["case"]] / r["time_s"]
    return {"rows": rows, "summary": {"seq_len": cfg.seq_len, "cfg_scale": CFG_SCALE, "batches": batches}}
