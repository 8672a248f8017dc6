"""What SOURCE names: a finished run dir, its checkpoint.pt, or a released Open-MAGVIT2 Lightning .ckpt file.

One loader per model kind; a released file is a single call into magvit2.released.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.runs import RunDir

log = logging.getLogger(__name__)
_KINDS = "a finished run dir (outputs/runs/<stage>/<signature>), its checkpoint.pt, or a released Open-MAGVIT2 .ckpt"


@dataclass
class Source:
    """A loaded model and where it came from. `reference`: the weights are a released file."""
    path: Path
    name: str  # run signature or file stem: names outputs and the MLflow run
    reference: bool
    step: int | None = None
    config: object = None  # the run's saved config (None for a released file)
    info: dict = field(default_factory=dict)


def _existing(source, flag: str) -> Path:
    p = Path(source).expanduser()
    if not p.exists():
        raise ConfigError(f"{flag} {source}: no such file or folder; give {_KINDS}")
    return p.resolve()


def _run(p: Path, stage: str, flag: str) -> tuple[RunDir, Path, object] | None:
    """(run dir, checkpoint, saved config) when `p` is a run dir or a file inside one, None for a lone file."""
    rd = RunDir(p if p.is_dir() else p.parent)
    if not rd.config.exists():
        if p.is_dir():
            raise ConfigError(f"{flag} {p}: not a run dir (no config.yaml); give {_KINDS}")
        return None
    ckpt = p if p.is_file() else rd.checkpoint
    if not ckpt.is_file():
        raise ConfigError(f"{flag} {p}: the run has no checkpoint.pt (never trained, or deleted): train it first")
    cfg = OmegaConf.load(rd.config)
    if cfg.get("stage") != stage:
        kind = "an AR" if stage == "ar" else "a tokenizer"
        raise ConfigError(f"{flag} {p}: a run of stage {cfg.get('stage')}; give {kind} run "
                            f"(outputs/runs/{stage}/<signature>)")
    if not rd.finished():
        log.warning(f"{rd.path} has not finished (state {rd.read_status()['state']}): evaluating its last checkpoint")
    return rd, ckpt, cfg


def load_tokenizer_source(source, weights: str, flag: str = "SOURCE") -> tuple[object, Source]:
    """-> (tokenizer in eval mode, Source). weights: ema (the tokenizer stage's evaluation weights) or raw."""
    if weights not in ("ema", "raw"):
        raise ConfigError(f"--weights {weights!r}: use ema (the original's evaluation weights) or raw")
    p = _existing(source, flag)
    found = _run(p, "tokenizer", flag)
    if found is None:
        from magvit2 import released
        tok, info = released.load_tokenizer(p, weights=weights)
        return tok.eval().requires_grad_(False), Source(p, p.stem, True, info=dict(info))
    from magvit2.stages.resolve import load_tokenizer
    rd, ckpt, cfg = found
    cfg.tokens.tokenizer, cfg.tokens.weights = str(ckpt), weights
    tok, _, info = load_tokenizer(cfg)  # the AR stage's loader: checks and messages for a run's checkpoint
    return tok, Source(p, rd.signature, False, info.get("step"), cfg, info)


def load_ar_source(source, tokenizer=None, tokenizer_weights: str | None = None) -> tuple[object, object, Source]:
    """-> (AR model, its tokenizer, Source). `tokenizer` (a tokenizer SOURCE) replaces the one the AR names: the
    run's own tokens.tokenizer, or the one a released AR file carries. tokenizer_weights: default the run's
    tokens.weights (raw for a released file: the original's AR trains on and decodes with its raw weights)."""
    p = _existing(source, "SOURCE")
    found = _run(p, "ar", "SOURCE")
    model = tok = None
    if found is None:
        from magvit2 import released
        model, tok, info = released.load_ar(p)
        src = Source(p, p.stem, True, info=dict(info))
        if tok is not None and tokenizer is None and tokenizer_weights is not None:
            raise ConfigError(f"--tokenizer-weights {tokenizer_weights}: {p} carries its own tokenizer; give "
                                f"--tokenizer too to decode with other weights")
    else:
        rd, ckpt_path, cfg = found
        src = Source(p, rd.signature, False, config=cfg, info={"checkpoint": str(ckpt_path)})
    weights = tokenizer_weights or (cfg.tokens.weights if found else "raw")
    if tokenizer is not None:
        tok = load_tokenizer_source(tokenizer, weights, "--tokenizer")[0]
    elif found:
        from magvit2.stages.resolve import load_tokenizer
        cfg.tokens.weights = weights
        tok = load_tokenizer(cfg)[0]
    if tok is None:
        raise ConfigError(f"SOURCE {p} carries no tokenizer: give one with --tokenizer (a tokenizer run dir, its "
                            f"checkpoint.pt or a released tokenizer .ckpt)")
    if model is None:
        from magvit2.build import build_ar
        ckpt = rd.load(ckpt_path, fix="give an AR run dir trained by this magvit2")
        model = build_ar(cfg, tok.token_grid)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ConfigError(f"SOURCE {p}: its weights do not fit a model for this tokenizer's "
                                f"{tok.token_grid}x{tok.token_grid} tokens ({str(e).splitlines()[0]})") from e
        src.step = ckpt.get("step")
    if tok.quantizer.codebook_size != 2 ** sum(model.cfg.bits):
        raise ConfigError(f"the tokenizer has {tok.quantizer.codebook_size} codes but the AR model's sub-tokens "
                            f"cover 2^{sum(model.cfg.bits)}: give the tokenizer the model was trained with")
    src.info.setdefault("tokenizer_weights", weights)
    return model.eval().requires_grad_(False), tok.eval().requires_grad_(False), src


def sampling_settings(src, a):
    """The run's saved sampling config, or conf/sampling/<model size>.yaml for a released file; flags override."""
    if src.config is not None:
        s = OmegaConf.create(OmegaConf.to_container(src.config.sampling, resolve=True))
    else:
        from magvit2.resources import conf_dir
        size = src.info.get("model_size")
        path = conf_dir() / "sampling" / f"{size}.yaml"
        if size is None or not path.is_file():
            if not (a.cfg_scale and a.temperature):
                raise ConfigError(f"SOURCE {src.path}: model size {size!r} has no conf/sampling/<size>.yaml: give "
                                  f"--cfg-scale and --temperature")
            path = conf_dir() / "sampling" / "B.yaml"  # batch size and the rest; both scales come from the flags
        s = OmegaConf.load(path)
    from magvit2.sample import apply_sampling_args
    s = apply_sampling_args(s, a)
    if a.batch_size is not None:
        s.batch_size = a.batch_size
    return s
