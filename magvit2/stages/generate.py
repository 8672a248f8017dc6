"""Sampling with the trained generator: class-conditional images, grids, FID/IS, ADM-style npz."""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from magvit2 import metrics as M
from magvit2 import tracking
from magvit2.metrics import protocol as P
from magvit2.config import sampler_settings, subtoken_values
from magvit2.errors import ConfigError
from magvit2.metrics.grids import as_numpy_uint8, save_grid

log = logging.getLogger(__name__)


def sampler(sampling, device) -> tuple[bool | str, bool | str]:
    """(use_cache, compile) of sampling.cache / sampling.compile (config.sampler_settings), checked against the
    device that samples."""
    use_cache, comp = sampler_settings(sampling)
    if comp == "cuda_graphs" and torch.device(device).type != "cuda":
        raise ConfigError(f"sampling.compile=cuda_graphs (--compile cuda_graphs) needs a CUDA device, this one is "
                          f"{torch.device(device).type}: use sampling.compile=true (torch.compile only) or false "
                          f"(--compile true|false)")
    return use_cache, comp


@torch.no_grad()
def sample_images(model, tokenizer, labels: torch.Tensor, sampling, seed: int, batch_size: int, device,
                  show: bool = True, item_seeds: list[int] | None = None) -> torch.Tensor:
    """-> images in [-1, 1], (N, 3, H, W), for the given labels; reproducible for a seed and batch size.

    item_seeds (one per label): each sample draws from its own seed instead (`seed` is then unused), so its draws
    do not depend on which batch, process or batch size drew it. Equal batches give equal bits; other batch sizes
    can round the batched matmuls and convs differently (pixels off by one, rarely a draw at a near-tie)."""
    use_cache, comp = sampler(sampling, device)
    if comp and model._compiled is None:  # once per model: later calls reuse the compiled step
        model.compile_sampling(cuda_graphs=comp == "cuda_graphs")
    was = model.training
    model.eval()
    out = []
    grid, m = model.cfg.grid, model.num_subtokens
    for s in tqdm(range(0, len(labels), batch_size), desc="sampling", disable=not show, mininterval=1.0):
        y = labels[s:s + batch_size].to(device)
        g, u = None, None
        if item_seeds is None:
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + s)
        else:
            u = item_uniforms(item_seeds[s:s + batch_size], model.cfg.seq_len * m, device)
        sub = model.generate(y, cfg_scale=subtoken_values(sampling.cfg_scale, m, "sampling.cfg_scale"),
                             temperature=subtoken_values(sampling.temperature, m, "sampling.temperature"),
                             top_k=sampling.top_k, top_p=sampling.top_p, generator=g, uniforms=u,
                             use_cache=use_cache)
        idx = model.merge(sub).view(-1, grid, grid)
        out.append(tokenizer.decode_indices(idx).float().clamp(-1, 1).cpu())
    model.train(was)
    return torch.cat(out)


def item_seed(seed: int, label: int, index: int) -> int:
    """The seed of sample `index` of class `label`: a hash, so no two (seed, label, index) share a stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}:{index}".encode()).digest()[:8], "little")


def item_uniforms(seeds: list[int], n: int, device) -> torch.Tensor:
    """(len(seeds), n) float64 uniforms, row i from its own CPU generator seeded with seeds[i]."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in seeds]).to(device)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


def save_sample_grid(images: torch.Tensor, per_class: int, path: Path, classes=None, names=None,
                     title: str | None = None, max_classes: int = 10, max_per_class: int = 8) -> Path:
    """One row per class block of `images` (`per_class` each); row i is class classes[i] (default i), labelled with
    its name from `names` (the data set's class names) when known."""
    n = min(max_classes, len(images) // per_class)
    rows = [images[i * per_class:i * per_class + min(per_class, max_per_class)] for i in range(n)]
    ids = list(classes)[:n] if classes is not None else list(range(n))
    labels = [names[c] if names is not None and c < len(names) else f"class {c}" for c in ids]
    return save_grid(rows, path, labels=labels, title=title)


def grid_title(sampling, step) -> str:
    """What a sample grid was drawn with: CFG scales, temperatures, top-k/p, the checkpoint step."""
    extra = "".join(f", {k} {sampling[k]}" for k in ("top_k", "top_p") if sampling.get(k) is not None)
    return f"CFG {_fmt(sampling.cfg_scale)}, temperature {_fmt(sampling.temperature)}{extra}, step {step}"


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")" if not isinstance(v, (int, float)) else f"{v:g}"


def evaluate_generation(cfg, ctx, model, tokenizer) -> dict:
    """Samples per class (split over processes), a grid artifact, FID/IS against the val images, npz export.

    This in-loop FID (eval/fid: eval/n_samples samples vs eval/n_real val images, tag magvit2.fid_protocol) tracks
    progress; it is not the paper's gFID (50 samples x 1000 classes vs the ADM ImageNet-256 reference batch)."""
    from magvit2.build import build_dataset
    acc, s = ctx.acc, cfg.sampling
    prc = bool(cfg.metrics.get("precision_recall", False))  # metrics.precision_recall (validated in config)
    labels = class_labels(cfg.model.num_classes, s.per_class)
    mine = torch.arange(acc.process_index, len(labels), acc.num_processes)
    # throughput: all samples / the slowest rank's seconds (tokens, decode, and sampling.compile's compilation);
    # sample_images ends on a host copy, so the clock stops after the device work
    tic = time.perf_counter()
    imgs = sample_images(model, tokenizer, labels[mine], s, s.seed + acc.process_index, s.batch_size, acc.device,
                         show=ctx.is_main)
    secs = float(acc.gather(torch.tensor([time.perf_counter() - tic], device=acc.device)).max())
    inception = M.inception_from_config(cfg.metrics)  # path, hub cache, then download
    res = {"eval/n_samples": float(len(labels)), "compute/sample_images_per_s": len(labels) / max(secs, 1e-9)}
    if not isinstance(inception, M.Missing):  # all ranks: torchmetrics all-reduces the states in compute()
        gm = M.GenerationMetrics(inception, device=acc.device, precision_recall=prc, protocol=cfg.metrics.protocol)
        val = build_dataset(cfg.data, "val", cfg.seed)
        mine_val = list(range(acc.process_index, len(val), acc.num_processes))
        for i in range(0, len(mine_val), 64):
            gm.update_real(torch.stack([val[j][0] for j in mine_val[i:i + 64]]).to(acc.device))
        for i in range(0, len(imgs), 64):
            gm.update_fake(imgs[i:i + 64].to(acc.device))
        out = gm.compute()
    gathered = acc.gather(imgs.to(acc.device)).cpu()
    if not ctx.is_main:
        return {}
    # undo the round-robin split so images are ordered by label again
    order = torch.cat([torch.arange(r, len(labels), acc.num_processes) for r in range(acc.num_processes)])
    images = torch.empty_like(gathered[:len(labels)])
    images[order] = gathered[:len(labels)]
    from magvit2.data.images import class_names
    grid = save_sample_grid(images, s.per_class, ctx.run.samples_grid, names=class_names(cfg.data),
                            title=grid_title(s, ctx.t.steps))
    ctx.tracker.log_artifact(str(grid))
    if s.export_npz:
        npz = ctx.run.samples_npz
        M.export_adm_npz(as_numpy_uint8(images, P.get(cfg.metrics.protocol).to_uint8), npz)
        ctx.tracker.set_tags({tracking.SAMPLES_NPZ: str(npz)})
    if isinstance(inception, M.Missing):
        for k in ("eval/fid", "eval/is") + (("eval/precision", "eval/recall") if prc else ()):
            ctx.tracker.log_missing(k, inception.reason)
        return res
    for k, v in out.items():
        if isinstance(v, M.Missing):
            ctx.tracker.log_missing(f"eval/{k}", v.reason)
        else:
            res[f"eval/{k}"] = float(v)
    ctx.tracker.set_tags({tracking.METRICS_PROTOCOL: cfg.metrics.protocol, tracking.FID_PROTOCOL: f"in-loop: {len(labels)} samples ({s.per_class} per class) vs "
                          f"{int(out['n_real'])} val images; not the paper's gFID (50k vs the ADM reference batch)"})
    return res
