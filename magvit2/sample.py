"""Sample from a trained AR run: `python -m magvit2.sample RUN_DIR [--per-class N] [--classes 0 1 ..]
[--cfg-scale 1.9 2.0] [--temperature 1.0 1.0] [--top-k K] [--top-p P] [--seed S] [--cache static]
[--compile true] [--out DIR]`.

RUN_DIR may also be its checkpoint.pt or a released Open-MAGVIT2 AR .ckpt (sampling settings: conf/sampling/<size>).
Writes samples.png (a grid, one row per class) and samples.npz (ADM-evaluator layout) into --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from magvit2.config import SAMPLER_CACHE, SAMPLER_COMPILE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="an AR run dir (outputs/runs/ar/<signature>), its checkpoint.pt or a "
                    "released Open-MAGVIT2 AR .ckpt")
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--classes", type=int, nargs="*", default=None, help="default: all classes")
    add_sampling_args(ap)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: <run_dir>/samples-<seed>")
    a = ap.parse_args(argv)
    bad = check_args(a)  # before any loading: a typo fails at once
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2

    from magvit2 import config as C  # (also registers resolvers)
    from magvit2.evaluate.sources import load_ar_source, sampling_settings
    from magvit2.metrics import export_adm_npz
    from magvit2.metrics.grids import as_numpy_uint8
    from magvit2.stages.generate import class_labels, grid_title, sample_images, sampler, save_sample_grid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # every file is loaded with weights_only=True: a checkpoint must never run code
        model, tokenizer, src = load_ar_source(a.run_dir)
        s = sampling_settings(src, a)
        sampler(s, device)  # the run's (or the flags') cache / compile: before sampling starts
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.per_class is not None:
        s.per_class = a.per_class
    model.to(device)
    tokenizer.to(device)
    num_classes = model.cfg.num_classes
    classes = a.classes if a.classes is not None else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        print(f"error: --classes {bad} out of range: this model has {num_classes} classes", file=sys.stderr)
        return 2
    labels = torch.tensor(classes).repeat_interleave(s.per_class) if a.classes is not None else \
        class_labels(num_classes, s.per_class)
    images = sample_images(model, tokenizer, labels, s, s.seed, s.batch_size, device)
    p = a.run_dir
    out = a.out or (p / f"samples-{s.seed}" if p.is_dir() else p.parent / f"{src.name}-samples-{s.seed}")
    out.mkdir(parents=True, exist_ok=True)
    from magvit2.data.images import class_names
    names = class_names(src.config.data) if src.config is not None else None
    grid_path = save_sample_grid(images, s.per_class, out / "samples.png", classes=classes, names=names,
                                 title=grid_title(s, src.step))
    export_adm_npz(as_numpy_uint8(images), out / "samples.npz")
    print(f"{len(images)} samples (step {src.step}): {grid_path} and {out / 'samples.npz'}")
    return 0


def add_sampling_args(ap) -> None:
    """The flags that override a model's sampling settings (also `python -m magvit2.evaluate ar`'s)."""
    ap.add_argument("--cfg-scale", type=float, nargs="*", default=None, help="one value, or one per sub-token")
    ap.add_argument("--temperature", type=float, nargs="*", default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cache", default=None, choices=list(SAMPLER_CACHE), help="sampling.cache: the KV cache "
                    "(speed only, the same draws): dynamic (growing, the default), static (preallocated), none")
    ap.add_argument("--compile", default=None, choices=list(SAMPLER_COMPILE), help="sampling.compile: "
                    "torch.compile the static-cache sampler (needs --cache static); cuda_graphs: CUDA only")


def apply_sampling_args(s, a):
    """The sampling config `s` with the flags of add_sampling_args that were given set in it."""
    for key, val in (("top_k", a.top_k), ("top_p", a.top_p), ("seed", a.seed), ("cache", a.cache)):
        if val is not None:
            s[key] = val
    if a.compile is not None:
        s.compile = SAMPLER_COMPILE[a.compile]
    if a.cfg_scale:
        s.cfg_scale = a.cfg_scale if len(a.cfg_scale) > 1 else a.cfg_scale[0]
    if a.temperature:
        s.temperature = a.temperature if len(a.temperature) > 1 else a.temperature[0]
    return s


def check_args(a) -> str | None:
    """The first bad argument's message, else None."""
    import math
    for flag, val in (("--per-class", a.per_class), ("--top-k", a.top_k), ("--batch-size", a.batch_size)):
        if val is not None and val < 1:
            return f"{flag} {val} must be >= 1" + (" (or leave it out: no top-k filter)" if flag == "--top-k" else "")
    if a.top_p is not None and not 0.0 < a.top_p <= 1.0:  # NaN fails this too
        return f"--top-p {a.top_p} must be in (0, 1] (or leave it out: no top-p filter)"
    for flag, vals in (("--cfg-scale", a.cfg_scale), ("--temperature", a.temperature)):
        if vals and not all(math.isfinite(v) for v in vals):
            return f"{flag} {' '.join(map(str, vals))}: every value must be a finite number"
    if a.temperature and min(a.temperature) <= 0:
        return f"--temperature {' '.join(map(str, a.temperature))}: every value must be > 0"
    return None


if __name__ == "__main__":
    sys.exit(main())
