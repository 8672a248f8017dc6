"""Stage I: train the MAGVIT-v2 tokenizer with LFQ (or VQ) on accelerate, evaluate with EMA weights.

Per optimizer step: generator step (L1 + LPIPS + quantizer aux + non-saturating GAN), then discriminator step
(hinge + LeCAM). Two Adam optimizers, lr x0.1 at the configured steps, EMA of the tokenizer's weights.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from magvit2 import metrics as M
from magvit2 import tracking
from magvit2.metrics import protocol as P
from magvit2.build import build_dataset, build_discriminator, build_tokenizer
from magvit2.data.images import skipped_images
from magvit2.data.sampler import GlobalBatchSampler
from magvit2.models.discriminator import generator_adv_loss, hinge_d_loss
from magvit2.models.ema import EMA
from magvit2.runs import Ckpt
from magvit2.runtime.context import RunContext, train_stage
from magvit2.metrics.grids import save_grid

log = logging.getLogger(__name__)


def _step_decay(milestones):
    ms = sorted(int(m) for m in milestones)
    return lambda step: 0.1 ** sum(step >= m for m in ms)


def fused(t, device) -> dict:
    """trainer.<stage>.fused_adam: the fused CUDA kernel for the Adam(W) update (same update, one kernel), CUDA only."""
    return {"fused": True} if t.get("fused_adam", False) and device.type == "cuda" else {}


def compiled(t, model):
    """trainer.<stage>.compile: false | true (torch.compile's default inductor) | a backend name (e.g. aot_eager:
    the same graph capture without code generation, to debug). After accelerate.prepare; the caller keeps the
    unwrapped module, whose state_dict has no `_orig_mod.` prefix."""
    c = t.get("compile", False)
    if not c:
        return model
    return torch.compile(model) if c is True else torch.compile(model, backend=str(c))


def train_tokenizer(cfg) -> dict:
    return train_stage(cfg, "tokenizer", lambda ctx: _train(cfg, ctx), "tokenizer")


def _train(cfg, ctx: RunContext) -> dict:
    t, L, acc = ctx.t, cfg.tokenizer.loss, ctx.acc
    ckpt = ctx.open()
    model = build_tokenizer(cfg)
    disc, lecam = build_discriminator(cfg)
    opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas), **fused(t, acc.device))
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.lr, betas=tuple(t.betas), **fused(t, acc.device))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _step_decay(t.lr_decay_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _step_decay(t.lr_decay_steps))
    start = 0
    if ckpt is not None:
        Ckpt.restore(ckpt, model=model, disc=disc, lecam=lecam, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g,
                     sched_d=sched_d)  # the EMA once it is built
        start = int(ckpt[Ckpt.STEP])
        log.info(f"resuming tokenizer {ctx.signature} at step {start}")
    else:
        n = sum(p.numel() for p in model.parameters())
        ctx.log_params({"derived.params": n, "derived.codebook_size": model.quantizer.codebook_size,
                        "derived.disc_params": sum(p.numel() for p in disc.parameters())})

    lpips_model = M.lpips_from_config(cfg.metrics)  # path, hub cache, then download
    use_lpips = L.perceptual_weight > 0 and not isinstance(lpips_model, M.Missing)
    if L.perceptual_weight > 0 and not use_lpips and ctx.is_main:
        log.warning(f"perceptual loss off: {lpips_model.reason}")
        ctx.tracker.log_missing("train/perceptual", lpips_model.reason)
    if use_lpips:
        lpips_model = lpips_model.to(acc.device)

    model, disc, opt_g, opt_d = acc.prepare(model, disc, opt_g, opt_d)
    lecam = lecam.to(acc.device)
    raw, raw_disc = acc.unwrap_model(model), acc.unwrap_model(disc)
    model, disc = compiled(t, model), compiled(t, disc)
    # the EMA is built after prepare() moved the model, so its shadow lives on the accelerator too
    ema = EMA(raw, decay=t.ema_decay)
    if ckpt is not None:
        Ckpt.restore(ckpt, ema=ema)
    train_ds = build_dataset(cfg.data, "train", cfg.seed)
    sampler = GlobalBatchSampler(len(train_ds), t.batch_size, cfg.seed, start, acc.process_index,
                                 acc.num_processes, t.grad_accum)
    batches = iter(DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                              persistent_workers=cfg.data.num_workers > 0))

    def payload():
        return Ckpt.state("tokenizer", model=raw, disc=raw_disc, lecam=lecam, ema=ema, opt_g=opt_g, opt_d=opt_d,
                          sched_g=sched_g, sched_d=sched_d)

    ctx.restore_rng(ckpt)
    bar = ctx.progress(start, t.steps, "tokenizer")
    last = {}
    for step in range(start, t.steps):
        gan_on = step >= L.disc_start
        for _ in range(t.grad_accum):
            x = next(batches)[0].to(acc.device)
            with acc.accumulate(model, disc):
                # generator: D is used through its unwrapped module with frozen params, so its grads (and DDP's
                # reducer) only see the discriminator step
                with acc.autocast():
                    x_rec, q = model(x)
                    rec = F.l1_loss(x_rec.float(), x)
                    p_loss = lpips_model(x_rec.float(), x).mean() if use_lpips else torch.zeros((), device=x.device)
                    raw_disc.requires_grad_(False)
                    g_adv = (generator_adv_loss(raw_disc(x_rec), L.g_adv_reduce) if gan_on
                             else torch.zeros((), device=x.device))
                    raw_disc.requires_grad_(True)
                    loss = rec + L.perceptual_weight * p_loss * use_lpips + q.loss + L.adv_weight * g_adv
                acc.backward(loss)
                opt_g.step(), opt_g.zero_grad(set_to_none=True)
                # discriminator: hinge + LeCAM on real vs detached reconstructions
                if gan_on:
                    with acc.autocast():
                        lr_, lf_ = disc(x), disc(x_rec.detach())
                        d_hinge = hinge_d_loss(lr_.float(), lf_.float())
                        reg = lecam(lr_.float(), lf_.float())  # updates its EMAs of the mean logits first
                        d_loss = d_hinge + L.lecam_weight * reg
                    acc.backward(d_loss)
                    opt_d.step(), opt_d.zero_grad(set_to_none=True)
        lr = sched_g.get_last_lr()[0]  # the lr this step used (after sched_g.step() it is the next step's)
        sched_g.step()
        with warnings.catch_warnings():  # D's lr decay follows the global step, also before disc_start
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
            sched_d.step()
        ema.update(raw)
        step1 = step + 1

        def metrics():
            m = {"train/loss": loss, "train/rec_l1": rec, "train/perceptual": p_loss, "train/g_adv": g_adv,
                 "train/lr": lr, "train/utilization_batch":
                 torch.unique(q.indices).numel() / raw.quantizer.codebook_size,
                 **{f"train/{k}": v for k, v in q.stats.items()}}
            if gan_on:
                m.update({"train/d_loss": d_hinge, "train/lecam": reg})
            m.update(skipped_images(train_ds))  # data.on_bad_image=skip: unreadable images replaced so far
            return {k: float(acc.reduce(v.detach().float(), "mean")) if torch.is_tensor(v) else float(v)
                    for k, v in m.items()}
        last = ctx.end_step(step1, bar, metrics, lambda: evaluate(cfg, ctx, raw, ema, lpips_model, save_images=False),
                            payload, {"loss": "train/loss", "l1": "train/rec_l1"},
                            losses=(loss, d_loss) if gan_on else (loss,)) or last
    bar.close()
    ctx.save(t.steps, payload())
    results = evaluate(cfg, ctx, raw, ema, lpips_model, save_images=True)
    ctx.log(results, t.steps)
    return ctx.finish(t.steps, {**last, **results})


@torch.no_grad()
def evaluate(cfg, ctx: RunContext, raw, ema: EMA, lpips_model, save_images: bool) -> dict:
    """Held-out split with EMA weights: PSNR, SSIM, LPIPS, rFID, utilization, perplexity (missing ones tagged),
    with their N: eval/n_images (all ranks) and eval/n_tokens (the codes behind utilization and perplexity)."""
    acc = ctx.acc
    ds = build_dataset(cfg.data, "val", cfg.seed)
    idx = list(range(acc.process_index, len(ds), acc.num_processes))
    loader = DataLoader(torch.utils.data.Subset(ds, idx), batch_size=32, num_workers=cfg.data.num_workers)
    # every rank accumulates its shard; torchmetrics all-reduces the states in compute() (called on all ranks)
    proto = P.get(cfg.metrics.protocol)  # the network and the arithmetic: metrics/protocol.py
    inception = M.inception_from_config(cfg.metrics, kind=proto.rfid_input)  # path, hub cache, then download
    alex = M.lpips_from_config(cfg.metrics, "alex") if "alex" in proto.lpips_nets else None
    rm = M.ReconstructionMetrics(raw.quantizer.codebook_size, lpips_model=lpips_model, inception=inception,
                                 device=acc.device, protocol=proto.name, lpips_alex=alex)
    was_training = raw.training
    raw.eval()
    with ema.swap(raw):
        out, first = M.reconstruct(raw, loader, rm, acc.autocast)
    raw.train(was_training)
    if not ctx.is_main:
        return {}
    ctx.tracker.set_tags({tracking.METRICS_PROTOCOL: proto.name})
    res = {}
    for k, v in out.items():
        if isinstance(v, M.Missing):
            ctx.tracker.log_missing(f"eval/{k}", v.reason)
        else:
            res[f"eval/{k}"] = float(v)
    if save_images and first is not None:
        path = save_grid(first, ctx.run_dir / "recon_grid.png", labels=("original", "reconstruction"))
        ctx.tracker.log_artifact(str(path))
    return res
