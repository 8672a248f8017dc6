"""python -m magvit2.evaluate tokenizer SOURCE --data DIR [--resolution 256] [--num-images N] [--weights ema|raw]
python -m magvit2.evaluate ar SOURCE [--tokenizer SOURCE] [--per-class 50] [--num-classes N] [--seed S]
                              [--ref-batch VIRTUAL_imagenet256_labeled.npz | --ref-dir DIR] [--precision-recall]

SOURCE: a finished run dir (outputs/runs/<stage>/<signature>), its checkpoint.pt, or a released Open-MAGVIT2 .ckpt.
`ar` splits its sampling over the processes of `accelerate launch` / torchrun / a SLURM job step (RANK/WORLD_SIZE or
SLURM_PROCID/SLURM_NTASKS); run it again to resume (drawn shards are kept).
"""
from __future__ import annotations

import argparse
import logging
import sys

from magvit2.errors import ConfigError


def main(argv=None) -> int:
    from magvit2.evaluate import ar, tokenizer
    ap = argparse.ArgumentParser(prog="python -m magvit2.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    for name, mod, what in (("tokenizer", tokenizer, "reconstruction metrics on an image folder"),
                            ("ar", ar, "class-conditional samples, FID and IS (and precision / recall)")):
        p = sub.add_parser(name, help=what, description=mod.__doc__)
        mod.add_args(p)
        p.set_defaults(run=mod.run)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        a.run(a)
    except ConfigError as e:  # a bad SOURCE, folder or setting: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
