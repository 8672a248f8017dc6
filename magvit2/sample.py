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

from magvit2.errors import ConfigError
from magvit2.sampling_flags import add_sampling_args, check_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="an AR run dir (outputs/runs/ar/<signature>), its checkpoint.pt or a "
                    "released Open-MAGVIT2 AR .ckpt")
    ap.add_argument("--per-class", type=int, default=None, help="samples per class (default: the run's "
                    "sampling.per_class, 50 in conf/sampling/)")
    ap.add_argument("--classes", type=int, nargs="*", default=None, help="class indices to sample (default: all "
                    "classes)")
    add_sampling_args(ap)
    ap.add_argument("--batch-size", type=int, default=None, help="samples drawn at once (default: the run's "
                    "sampling.batch_size); the draws depend on it and on --seed")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/samples-<seed>, or "
                    "<signature or file stem>-samples-<seed> beside a checkpoint file)")
    a = ap.parse_args(argv)
    bad = check_args(a)  # before any loading: a typo fails at once
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2

    from magvit2.evaluate.sources import load_ar_source, sampling_settings
    from magvit2.metrics import export_adm_npz
    from magvit2.metrics.grids import as_numpy_uint8
    from magvit2.stages.generate import class_labels, grid_title, sample_images, sampler, save_sample_grid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # every file is loaded with weights_only=True: a checkpoint must never run code
        model, tokenizer, src = load_ar_source(a.run_dir)
        s = sampling_settings(src, a)
        sampler(s, device)  # the run's (or the flags') cache / compile: before sampling starts
    except ConfigError as e:
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


if __name__ == "__main__":
    sys.exit(main())
