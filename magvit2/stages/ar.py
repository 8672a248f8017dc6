"""Stage II: the class-conditional Llama generator with asymmetric token factorization and next-sub-token
prediction, trained on the frozen tokenizer's tokens (encoded every step or cached: magvit2/data/tokens.py);
sampling and FID/IS at the end."""
from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader

from magvit2 import config as C
from magvit2 import tracking
from magvit2.data import tokens as T
from magvit2.data.images import skipped_images
from magvit2.data.sampler import GlobalBatchSampler
from magvit2.build import build_ar, build_dataset, build_token_dataset
from magvit2.models.ar import subtoken_loss
from magvit2.runs import Ckpt
from magvit2.runtime.context import RunContext, train_stage
from magvit2.stages.generate import evaluate_generation, sampler
from magvit2.stages.resolve import init_weights, load_tokenizer
from magvit2.stages.tokenizer import compiled, fused

log = logging.getLogger(__name__)


def lr_lambda(t):
    """The original's AR schedule (VAR's lr_wd_annealing): linear warmup from 0.005x over warmup_steps; then, with
    progress p = (step - warmup) / (steps - 1 - warmup), flat at the peak while p < flat_fraction, then linear
    decay from 1 at p = flat_fraction to final_lr_ratio at p = 1."""
    warm, total, T, end = round(t.warmup_steps), int(t.steps), float(t.flat_fraction), float(t.final_lr_ratio)

    def f(step: int) -> float:
        if step < warm:
            return 0.005 + (1 - 0.005) * step / warm
        p = (step - warm) / max(1, total - 1 - warm)
        return 1.0 if p < T else end + (1 - end) * (1 - p) / (1 - T)
    return f


def param_groups(model, weight_decay: float, decay_on: str = "all"):
    """decay_on="all" (the original's: its schedule sets weight_decay on every group, so norms, embeddings and
    heads are decayed too) or "matrices" (the nanoGPT convention: only tensors with 2 or more dims)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_on == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    if decay_on == "matrices":
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    raise ValueError(f"trainer.ar.weight_decay_on={decay_on!r}: use all (the original's) or matrices")


def token_cache(cfg, tokenizer_id: str):
    """This config's token cache folder (magvit2/data/tokens.py) under paths.cache."""
    return T.cache_dir(cfg.paths.cache, C.token_cache_key(cfg, tokenizer_id))


def extract_tokens(cfg, tokenizer, tokenizer_id: str, acc):
    """The token cache, extracted once: val tokens in both modes, the train variants with tokens=cached."""
    out = token_cache(cfg, tokenizer_id)
    if not T.extracted(out):
        tokens = C.tokens_settings(cfg)
        splits = ("train", "val") if T.variants(tokens) else ("val",)
        images = {s: build_dataset(cfg.data, s, cfg.seed) for s in splits}
        T.extract(out, images, tokens, tokenizer, tokenizer_id, acc, cfg.data.num_workers)
    return out


def train_input(cfg, tokenizer, folder, device):
    """-> (train data set for GlobalBatchSampler, fn: a loader batch's first item -> token grids on device):
    tokens=cached reads the extracted variants, tokens=online encodes each step's train crops."""
    if T.variants(C.tokens_settings(cfg)):
        return build_token_dataset(cfg, folder, "train"), lambda tok: tok.to(device)
    return build_dataset(cfg.data, "train", cfg.seed), lambda x: T.encode(tokenizer, x.to(device))


def train_ar(cfg) -> dict:
    # the device check of the sampler settings, before the AR stage works (the device make_accelerator will pick)
    sampler(cfg.sampling, "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, tok_id, tok_info = load_tokenizer(cfg)
    out = train_stage(cfg, "ar", lambda ctx: _train(cfg, ctx, tokenizer.to(ctx.acc.device), tok_id, tok_info),
                      "AR run")
    return {**out, "tokenizer": {"run_dir": tok_info["path"], **tok_info.get("metrics", {})}}


def _train(cfg, ctx: RunContext, tokenizer, tok_id: str, tok_info: dict) -> dict:
    t, acc = ctx.t, ctx.acc
    shards = extract_tokens(cfg, tokenizer, tok_id, acc)  # tokens=online: val tokens only
    train_ds, to_tokens = train_input(cfg, tokenizer, shards, acc.device)
    val_ds = build_token_dataset(cfg, shards, "val")
    grid = val_ds.tokens.shape[-1]
    tokens = C.tokens_settings(cfg)
    mode = tokens["name"]
    bits = list(cfg.factorization.bits)
    ckpt = ctx.open()
    model = build_ar(cfg, grid)
    model.activation_checkpointing = bool(t.get("activation_checkpointing", False))  # validated in config
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay, t.weight_decay_on), lr=t.lr, betas=tuple(t.betas),
                            **fused(t, acc.device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    start = 0
    if ckpt is not None:
        Ckpt.restore(ckpt, model=model, opt=opt, sched=sched)
        start = int(ckpt[Ckpt.STEP])
        log.info(f"resuming AR {ctx.signature} at step {start}")
    else:
        ctx.log_params({"derived.M": len(bits), "derived.bits": "-".join(map(str, bits)),
                        "derived.params": sum(p.numel() for p in model.parameters()),
                        "derived.codebook_size": 2 ** sum(bits), "derived.grid": grid,
                        "derived.tokenizer": tok_info.get("source", ""), "derived.tokens": mode,
                        "derived.train_tokens": len(train_ds) * max(1, T.variants(tokens))})
        if ctx.is_main:
            ctx.tracker.set_tags({tracking.TOKENIZER: tok_info.get("source", "")})
        init = init_weights(cfg, model)
        if init:
            log.info(f"AR {ctx.signature} starts from {init}")
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)  # plain names for checkpoints and sampling; only the training forward compiles
    model = compiled(t, model)
    sampler = GlobalBatchSampler(len(train_ds), t.batch_size, cfg.seed, start, acc.process_index,
                                 acc.num_processes, t.grad_accum)
    workers = cfg.data.num_workers if mode == "online" else 0  # cached tokens are in memory
    batches = iter(DataLoader(train_ds, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0))

    def payload():
        return Ckpt.state("ar", model=raw, opt=opt, sched=sched)

    ctx.restore_rng(ckpt)
    bar = ctx.progress(start, t.steps, f"AR {cfg.factorization.name}-{cfg.model.name}")
    last, tic, seen = {}, time.perf_counter(), 0
    for step in range(start, t.steps):
        for _ in range(t.grad_accum):
            x, y = next(batches)  # images (online: encoded here) or cached token grids
            sub = raw.split(to_tokens(x).flatten(1))
            with acc.accumulate(model):
                with acc.autocast():
                    logits = model(sub, y.to(acc.device))
                    loss, stats = subtoken_loss(logits, sub, accuracy=ctx.logs_at(step + 1))
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step(), opt.zero_grad(set_to_none=True)
            seen += sub.shape[0] * sub.shape[1]
        lr = sched.get_last_lr()[0]  # the lr this step used (after sched.step() it is the next step's)
        sched.step()
        step1 = step + 1

        def metrics():
            nonlocal tic, seen
            dt = time.perf_counter() - tic
            m = {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in stats.items()},
                 "train/lr": lr}
            out = {k: float(acc.reduce(v.float(), "mean")) if torch.is_tensor(v) else float(v) for k, v in m.items()}
            out["train/tokens_per_s"] = seen * acc.num_processes / max(dt, 1e-9)
            out.update(skipped_images(train_ds))  # data.on_bad_image=skip (tokens=online): images replaced so far
            tic, seen = time.perf_counter(), 0
            return out
        last = ctx.end_step(step1, bar, metrics, lambda: val_loss(raw, val_ds, acc), payload,
                            {"loss": "train/loss"}, losses=(loss,)) or last
    bar.close()
    ctx.save(t.steps, payload())
    results = {**val_loss(raw, val_ds, acc)}
    results.update(evaluate_generation(cfg, ctx, raw, tokenizer))
    ctx.log(results, t.steps)
    return ctx.finish(t.steps, {**last, **results})


@torch.no_grad()
def val_loss(model, val_ds, acc, batch_size: int = 64) -> dict:
    """Teacher-forced loss and accuracy per sub-token on the held-out tokens (true labels, no label dropout)."""
    was = model.training
    model.eval()
    idx = list(range(acc.process_index, len(val_ds), acc.num_processes))
    sums, n = {}, 0
    for s in range(0, len(idx), batch_size):
        tok, y = zip(*(val_ds[i] for i in idx[s:s + batch_size]))
        sub = model.split(torch.stack(tok).flatten(1).to(acc.device))
        loss, stats = model.loss(sub, torch.stack(y).to(acc.device))
        b = sub.shape[0]
        for k, v in {"loss": loss, **stats}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
    model.train(was)
    out = torch.tensor([sums.get(k, 0.0) for k in sorted(sums)] + [n], dtype=torch.float64, device=acc.device)
    out = acc.reduce(out, "sum")
    total = max(float(out[-1]), 1.0)
    if not sums:
        return {}
    res = {f"val/{k}": float(v) / total for k, v in zip(sorted(sums), out[:-1])}
    return {**res, "val/n_images": float(out[-1]), "val/n_tokens": float(out[-1]) * val_ds[0][0].numel()}
