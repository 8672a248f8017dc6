"""Write a magvit2 run (or its checkpoint.pt) as a file the original Open-MAGVIT2 code loads:

    python -m magvit2.convert RUN_OR_CKPT --to reference OUT.ckpt

A tokenizer run gives the original's VQModel state_dict (encoder, decoder, the LitEma copy as model_ema.*, the
discriminator as loss.discriminator.*); an AR run gives Net2NetTransformer's (transformer.*, plus the tokenizer it
was trained on as first_stage_model.*, with the weights it used: tokens.weights). The original reads either with
`torch.load(path)["state_dict"]`, so its own evaluation scripts can check a model trained here.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from magvit2 import checkpoint, released
from magvit2.config import load as load_config
from magvit2.errors import ConfigError
from magvit2.runs import RunDir

log = logging.getLogger("magvit2.convert")
FIX = "give a tokenizer or AR run dir of this magvit2 (outputs/runs/<stage>/<signature>) or its checkpoint.pt"


def _levels(model_sd: dict) -> int:
    return 1 + max(int(k.split(".")[2]) for k in model_sd if k.startswith("decoder.levels."))


def tokenizer_reference(ckpt: dict) -> dict:
    ema = ckpt.get("ema")
    return released.export_tokenizer(ckpt["model"], _levels(ckpt["model"]), ema and ema["shadow"],
                                     ckpt.get("disc"), ema["decay"] if ema else 0.999)


def ar_reference(ckpt: dict, run_dir: Path) -> dict:
    """transformer.* from the AR checkpoint, first_stage_model.* from the tokenizer its config points at, with the
    weights the run used (tokens.weights)."""
    from magvit2.build import build_ar_config
    from magvit2.stages.resolve import load_tokenizer
    cfg_file = RunDir(run_dir).config
    if not cfg_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml beside the checkpoint, so its tokenizer is unknown; {FIX}")
    cfg = load_config(cfg_file)  # in today's schema (config/migrate.py)
    tokenizer, _, _ = load_tokenizer(cfg)
    ar_cfg = build_ar_config(cfg, tokenizer.token_grid)
    return released.export_ar(ckpt["model"], ar_cfg, tokenizer.state_dict(), len(tokenizer.decoder.levels))


def convert(source: Path, out: Path) -> str:
    path = RunDir(source).checkpoint if source.is_dir() else source
    if path.suffix == ".ckpt":
        raise ConfigError(f"{source}: already a file of the original's layout; nothing to convert")
    ckpt = checkpoint.load(path, str(source), FIX)
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: not a magvit2 run checkpoint (no 'model' state); {FIX}")
    try:
        if "encoder.conv_in.weight" in model:
            sd, what = tokenizer_reference(ckpt), "tokenizer (VQModel)"
        elif "class_emb.weight" in model:
            sd, what = ar_reference(ckpt, path.parent), "AR model (Net2NetTransformer)"
        else:
            raise ConfigError(f"{source}: neither a tokenizer nor an AR checkpoint; {FIX}")
    except ValueError as e:  # a model the original cannot express (e.g. 3 sub-tokens)
        raise ConfigError(f"{source}: {e}") from e
    released.files.write(out, sd, {"global_step": int(ckpt.get("step", 0)),
                                   "magvit2": {"source": str(path.resolve())}})
    return f"{what}, {len(sd)} tensors, step {ckpt.get('step', '?')} -> {out}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a magvit2 tokenizer or AR run dir, or its checkpoint.pt")
    ap.add_argument("--to", choices=["reference"], required=True, help="reference: the original's Lightning layout")
    ap.add_argument("out", type=Path, help="the .ckpt to write")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(convert(a.source, a.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
