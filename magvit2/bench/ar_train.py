"""`ar-train`: one AR training step (inter + intra, dropout, 2D RoPE, AdamW; fused on CUDA): eager, activation-
checkpointed (trainer.ar.activation_checkpointing: time and peak memory against eager's, and the second step's loss,
which the first step's gradients decide; the activations each form keeps for the backward) and torch.compile.
FLOPs: 6 x params x tokens (each block and head on the tokens it sees) + 12 x layers x dim x sequence per token for
attention (PaLM's count), checked against torch.utils.flop_counter; MFU against the measured matmul peak."""
from __future__ import annotations

import torch

from magvit2.models.ar import PRESETS, ARConfig, FactorizedAR, count_params, subtoken_loss
from magvit2.models.llama import block_params, ffn_hidden

from .common import compile_unavailable, count_flops, measure, mfu, row

TINY = dict(dim=128, n_inter=4, n_intra=1, n_heads=4)  # conf/model/tiny.yaml
BATCH = {"tiny": 16, "B": 24, "L": 12, "XL": 8}  # per-GPU batches of the recipe (conf/trainer/imagenet.yaml)


def config(size: str) -> ARConfig:
    if size == "tiny":
        return ARConfig(bits=(6, 12), num_classes=10, grid=8, **TINY)
    return ARConfig(bits=(6, 12), num_classes=1000, grid=16, **PRESETS[size])


def train_flops(cfg: ARConfig, batch: int) -> int:
    """Analytic FLOPs of one training step (forward + backward)."""
    T, M, d = cfg.seq_len, len(cfg.bits), cfg.dim
    blk = block_params(d, ffn_hidden(d, cfg.multiple_of))
    pos = batch * T  # inter positions; the intra stack sees M slots at each
    dense = 6 * (cfg.n_inter * blk * pos + cfg.n_intra * blk * pos * M + d * sum(cfg.vocab_sizes) * pos)
    attn = 12 * d * (cfg.n_inter * T * pos + cfg.n_intra * M * pos * M)
    return dense + attn


def make_step(size: str, device, dtype, compiled: bool = False, batch: int | None = None, checkpointed: bool = False):
    cfg = config(size)
    torch.manual_seed(0)
    model = FactorizedAR(cfg).to(device)
    model.activation_checkpointing = checkpointed
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, **fused)
    fwd = torch.compile(model) if compiled else model
    bs = batch or BATCH[size]
    g = torch.Generator().manual_seed(1)
    sub = torch.stack([torch.randint(0, v, (bs, cfg.seq_len), generator=g) for v in cfg.vocab_sizes], -1).to(device)
    y = torch.randint(0, cfg.num_classes, (bs,), generator=g).to(device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = subtoken_loss(fwd(sub, y), sub)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, cfg, bs, model


def saved_bytes(step, model) -> int:
    """Bytes one training step keeps for its backward (saved-tensor hooks; each storage once, parameters left out):
    what activation checkpointing cuts, exact on any device (a CPU's peak RSS is coarse at small sizes)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(kept.values())


def run(device, dtype, quick: bool, size=None, compile_on=True, matmul_peak=None, smoke=False, **_) -> dict:
    size = size if size in BATCH else ("tiny" if quick or device.type == "cpu" else "B")
    no_compile = compile_unavailable(device) if compile_on else "off (--no-compile)"
    rows, counted, losses = [], None, {}
    for name in ("eager", "checkpointed", "compile"):
        if name == "compile" and no_compile:
            rows.append(row(f"{size}", name, note=f"skipped: {no_compile}"))
            continue
        step, cfg, bs, model = make_step(size, device, dtype, compiled=name == "compile",
                                         checkpointed=name == "checkpointed")
        flops = train_flops(cfg, bs)  # the model's FLOPs: the checkpointed form's recompute is not counted
        seen = losses.setdefault(name, [])
        logged = lambda s=step, seen=seen: seen.append(s())  # keeps each step's loss
        kept = saved_bytes(logged, model) if name != "compile" else None  # (also the warm-up step)
        if counted is None:
            counted = count_flops(logged)
        m = measure(logged, device, warmup=2 if name == "compile" else 1, reps=1 if smoke else 3)
        rows.append(row(f"{size} batch {bs} T={cfg.seq_len}", name, **m, flops=flops,
                        mfu=mfu(flops, m["time_s"], matmul_peak), throughput=bs * cfg.seq_len / m["time_s"],
                        unit="tokens/s", saved_bytes=kept))
    eager = rows[0]
    for r in rows[1:]:
        if r.get("time_s"):  # > 1: faster / less memory than eager
            r["speedup"] = eager["time_s"] / r["time_s"]
            if r["variant"] == "checkpointed":
                r["memory_ratio"] = eager["peak_bytes"] / r["peak_bytes"] if eager["peak_bytes"] and \
                    r["peak_bytes"] else None
                # step 2's loss, decided by step 1's gradients (the same init and dropout draws in both forms)
                e, c = losses["eager"][1], losses["checkpointed"][1]
                r["rel_diff_loss"] = float((c - e).abs() / e.abs())
    return {"rows": rows, "summary": {"params": count_params(config(size)),
                                      "flops_analytic": train_flops(config(size), BATCH[size]),
                                      "flops_counter": counted}}
