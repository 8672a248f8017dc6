"""Which tokenizer an AR run uses: `tokens.tokenizer: auto | PATH | runs:/<mlflow run id>`.

auto: the finished tokenizer run with the same tokenizer signature (stages/pipeline.py trains it first when a
training command needs it). Resolving only finds: sampling or evaluating never trains.
"""
from __future__ import annotations

import logging
from pathlib import Path

from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.runs import Ckpt, RunDir

log = logging.getLogger(__name__)


def checkpoint_path(cfg) -> tuple[Path, str]:
    ck = cfg.tokens.tokenizer
    if ck in (None, "auto"):
        sig = C.tokenizer_signature(cfg)
        run = RunDir.find(cfg.paths.runs, "tokenizer", sig)
        if run is None:
            raise ConfigError(
                f"tokens.tokenizer=auto: no finished tokenizer run with signature {sig} under "
                f"{Path(cfg.paths.runs) / 'tokenizer'} (deleted, moved or never finished): train it again with "
                f"`python -m magvit2.train` and this run's settings, or set tokens.tokenizer to a tokenizer "
                f"checkpoint.pt, its run dir or runs:/<mlflow run id>")
        return run.checkpoint, f"auto:{sig}"
    ck = str(ck)
    if ck.startswith("runs:/"):
        from magvit2 import tracking
        run_id = ck[len("runs:/"):].strip("/").split("/")[0]
        try:
            tags = tracking.run_tags(run_id, str(cfg.paths.root), cfg.tracking.uri)
        except Exception as e:
            raise ConfigError(f"tokens.tokenizer={ck}: no such MLflow run ({e}); use a tokenizer run id "
                                f"from the magvit2-tokenizer experiment") from e
        rd = tags.get(tracking.RUN_DIR)
        if not rd:
            raise ConfigError(f"tokens.tokenizer={ck}: run {run_id} is not a magvit2 tokenizer run "
                                f"(no {tracking.RUN_DIR} tag)")
        return RunDir(rd).checkpoint, ck
    p = Path(ck).expanduser()
    if p.is_dir():
        p = RunDir(p).checkpoint
    if not p.is_file():
        raise ConfigError(f"tokens.tokenizer={ck}: file not found; give a tokenizer checkpoint.pt, its run "
                            f"dir, runs:/<mlflow run id>, or auto")
    return p, f"path:{p.resolve()}"


_REFUSED_FIX = ("give the checkpoint.pt of a tokenizer run of this magvit2 (or its run dir), runs:/<mlflow run id> "
                "or auto; a run dir from an older magvit2 (pickled RNG state) has to be deleted and trained again; "
                "a released Open-MAGVIT2 file is read (as data only) under its .ckpt name")


def load_tokenizer(cfg):
    """-> (frozen tokenizer in eval mode, identity string for caches, info dict).

    tokens.weights: raw (the original's `use_ema: False` in its AR configs: the tokenizer's training weights)
    or ema (its EMA weights, with which the tokenizer stage evaluates)."""
    from magvit2.build import build_tokenizer
    weights = cfg.tokens.weights
    if weights not in ("raw", "ema"):
        raise ConfigError(f"tokens.weights={weights!r}: use raw (the original's) or ema")
    path, source = checkpoint_path(cfg)
    setting = f"tokens.tokenizer={cfg.tokens.tokenizer}"
    model = build_tokenizer(cfg)
    from magvit2 import checkpoint, released  # weights_only / data-only reads: a checkpoint file never runs code
    ckpt = None if path.suffix == ".ckpt" else checkpoint.load(path, setting, _REFUSED_FIX)
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if ckpt is None or (isinstance(sd, dict) and released.kind(sd)):  # a released Open-MAGVIT2 file (or the
        released.into_tokenizer(path if ckpt is None else sd, model, setting, weights)  # tokenizer of an AR file)
        model.eval().requires_grad_(False)
        return model, f"{source}:reference:{weights}", {"source": source, "path": str(path), "step": None,
                                                        "metrics": {}, "weights": weights, "reference": True}
    checkpoint.check_finite(ckpt.get(Ckpt.MODEL, ckpt.get("state_dict", {})), f"{setting}: {path}")
    if weights == "ema" and Ckpt.EMA in ckpt:
        checkpoint.check_finite(ckpt[Ckpt.EMA].get("shadow", {}), f"{setting}: {path} (its EMA weights)")
    try:
        if Ckpt.EMA in ckpt:
            model.load_state_dict(ckpt[Ckpt.MODEL])
            if weights == "ema":
                _load_ema(model, ckpt[Ckpt.EMA])
        else:
            model.load_state_dict(ckpt.get("state_dict", ckpt))
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"tokens.tokenizer={cfg.tokens.tokenizer}: {path} does not fit "
                            f"tokenizer={cfg.tokenizer.name} quantizer={C.choices(cfg)['quantizer']} ({e}); use the "
                            f"tokenizer config it was trained with") from e
    model.eval().requires_grad_(False)
    ident = f"{source}@step{ckpt.get(Ckpt.STEP, '?')}:{weights}"
    st = RunDir(path.parent).read_status()
    metrics = {k: v for k, v in st.get("metrics", {}).items() if k.startswith("eval/")}
    return model, ident, {"source": source, "path": str(path), "step": ckpt.get(Ckpt.STEP), "metrics": metrics,
                          "weights": weights}


def _load_ema(model, ema_state) -> None:
    from magvit2.models.ema import EMA
    ema = EMA(model)
    ema.load_state_dict(ema_state)
    ema.copy_to(model)


def init_weights(cfg, model) -> str | None:
    """model.init_from: starting weights for a new AR run (a resumed run continues from its own checkpoint).
    A released AR .ckpt, a magvit2 AR run's checkpoint.pt or its run dir. -> a description for the log, or None."""
    src = cfg.model.get("init_from")
    if src in (None, ""):
        return None
    setting = f"model.init_from={src}"
    p = Path(str(src)).expanduser()
    if p.is_dir():
        p = RunDir(p).checkpoint
    if not p.is_file():
        raise ConfigError(f"{setting}: file not found; give a released Open-MAGVIT2 AR .ckpt, an AR run's "
                            f"checkpoint.pt or its run dir")
    if p.suffix == ".ckpt":
        from magvit2 import released
        info = released.into_ar(p, model, setting)
        return f"released {info['model_size'] or 'AR'} file {p} ({info['tensors']} tensors)"
    from magvit2 import checkpoint
    ckpt = checkpoint.load(p, setting, _REFUSED_FIX.replace("a tokenizer run", "an AR run"))
    checkpoint.check_finite(ckpt.get(Ckpt.MODEL, {}), f"{setting}: {p}")
    try:
        model.load_state_dict(ckpt[Ckpt.MODEL])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"{setting}: {p} does not fit model={cfg.model.name} factorization="
                            f"{C.choices(cfg).get('factorization')} ({str(e).splitlines()[0][:200]}); use the model "
                            f"and factorization it was trained with") from e
    return f"{p} (step {ckpt.get(Ckpt.STEP, '?')})"
