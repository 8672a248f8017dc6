"""`loop`: the tokenizer stage's per-step work around the model step, against the bare step on a fixed batch, and
the training time one checkpoint save stalls.

Reconstructed from the stage's real pieces (magvit2.stages.tokenizer needs Hydra's config and accelerate, which this
benchmark does not import): PhotoCrops + GlobalBatchSampler + DataLoader (the CPU recipe: data=photos, 0 workers),
the G + D step, both LR schedulers, EMA.update, the metrics' host syncs every tracking.log_every steps (floats +
torch.unique), and RunDir.save (the real atomic checkpoint: RNG file, temp file, fsync, rename, previous kept).
Not included: MLflow calls (an HTTP/sqlite write per log step) and the progress bar. Needs the project's full
install (magvit2.runs imports magvit2.config: omegaconf); without it the mode is skipped, named."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import row, sync
from .tokenizer import make_step

LOG_EVERY, CKPT_EVERY = 10, 100  # conf/config.yaml tracking.log_every, conf/trainer/cpu.yaml ckpt_every
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "ihc", "retina",
          "color", "brick"]  # conf/data/photos.yaml


def _ar_payload(size: str, device) -> dict:
    """An AR checkpoint's payload: weights + AdamW moments (states made by one step on zero gradients)."""
    from magvit2.models.ar import FactorizedAR

    from .ar_train import config
    model = FactorizedAR(config(size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def _stall(rd, payload: dict, device, reps: int = 2) -> float:
    times = []
    for i in range(reps):  # from the second save on, the previous checkpoint is rotated as in training
        sync(device)
        t = time.perf_counter()
        rd.save(i + 1, payload)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:] if reps > 1 else times)


def run(device, dtype, quick: bool, size=None, smoke=False, **_) -> dict:
    from magvit2.data.images import PhotoCrops
    from magvit2.data.sampler import GlobalBatchSampler
    from magvit2.models.ema import EMA
    from magvit2.runs import RunDir

    log_every = 2 if smoke else LOG_EVERY
    step, bs, parts = make_step("tiny", device, dtype)
    g, opt_g, opt_d = parts["g"], parts["opt_g"], parts["opt_d"]
    ds = PhotoCrops(PHOTOS, 32, 128, 2048, "train", 0)
    batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=GlobalBatchSampler(len(ds), bs, 0), num_workers=0))
    ema = EMA(g, decay=0.98)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: 1.0)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: 1.0)
    fixed = next(batches)[0].to(device)
    parts_t = {"data": 0.0, "ema": 0.0, "log": 0.0}
    n_loop = 0

    def loop_step(i: int):
        nonlocal n_loop
        t0 = time.perf_counter()
        x = next(batches)[0].to(device)
        t1 = time.perf_counter()
        loss, q = step(x)
        sched_g.step(), sched_d.step()
        sync(device)
        t2 = time.perf_counter()
        ema.update(g)
        sync(device)
        t3 = time.perf_counter()
        if (i + 1) % log_every == 0:  # the stage's metrics(): one host sync per value
            [float(v) for v in (loss, q.loss.detach(), *q.stats.values())]
            torch.unique(q.indices).numel()
        t4 = time.perf_counter()
        parts_t["data"] += t1 - t0
        parts_t["ema"] += t3 - t2
        parts_t["log"] += t4 - t3
        n_loop += 1

    def block(fn, n: int) -> float:
        sync(device)
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        sync(device)
        return (time.perf_counter() - t) / n

    step(fixed), loop_step(0)  # warmup
    parts_t.update(data=0.0, ema=0.0, log=0.0)
    n_loop = 0
    bare, loop = [], []
    for _ in range(1 if smoke else 2 if quick else 6):  # interleaved: other processes' load hits both alike
        bare.append(block(lambda i: step(fixed), log_every))
        loop.append(block(loop_step, log_every))
    b, lp = statistics.median(bare), statistics.median(loop)
    rows = [row(f"tokenizer tiny batch {bs}", "bare model step", time_s=b),
            row(f"tokenizer tiny batch {bs}", "loop step (no checkpoint)", time_s=lp, overhead=(lp - b) / b,
                **{f"{k}_s": v / max(n_loop, 1) for k, v in parts_t.items()})]
    payload = lambda: {"model": g.state_dict(), "disc": parts["d"].state_dict(), "lecam": parts["lecam"].state_dict(),
                       "ema": ema.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                       "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict()}
    with tempfile.TemporaryDirectory(prefix="magvit2-bench-") as tmp:
        rd = RunDir(Path(tmp) / "tokenizer")
        stall = _stall(rd, payload(), device, 1 if smoke else 2)
        rows.append(row("checkpoint tokenizer tiny", "RunDir.save stall", time_s=stall,
                        bytes=rd.checkpoint.stat().st_size,
                        per_step_at_ckpt_every=stall / CKPT_EVERY / b))
        ar_size = size or ("tiny" if quick else "B")
        rd = RunDir(Path(tmp) / "ar")
        stall = _stall(rd, _ar_payload(ar_size, device), device, 1 if smoke else 2)
        rows.append(row(f"checkpoint AR {ar_size} (weights + AdamW)", "RunDir.save stall", time_s=stall,
                        bytes=rd.checkpoint.stat().st_size))
    return {"rows": rows, "summary": {"overhead": (lp - b) / b, "log_every": log_every, "ckpt_every": CKPT_EVERY,
                                      "reconstructed": "stage pieces, not magvit2.stages.tokenizer (see module doc)"}}
