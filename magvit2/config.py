"""Config checks, signatures and run dirs: everything decided from a composed config before any work starts.

A run's signature is a hash of the parts of its resolved config that change its result. Its run dir is derived
from it, so re-running a sweep finds every member's state (finished -> skip, checkpoint -> resume).
"""
from __future__ import annotations

import hashlib
import math
import json
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from magvit2.errors import ConfigError

STAGES = ("tokenizer", "ar")
# Keys that never change a run's result (cadence, parallelism, data loading speed, kernel choice).
_CADENCE_KEYS = ("ckpt_every", "eval_every", "log_every", "num_workers",
                 "max_nonfinite_steps",  # a healthy run ignores it; raising it resumes a diverged run
                 "compile", "fused_adam",  # the same math in other kernels (float rounding aside)
                 "cache", "activation_checkpointing")  # sampler KV-cache layout; memory traded for recompute


def _pow2(k) -> int:
    return 2 ** int(k)


def _epochs_to_steps(epochs, images, batch):
    """Optimizer steps of `epochs` (a number or a list) with ceil(images / batch) steps per epoch (Lightning's count
    with a padding DistributedSampler and drop_last off, as in the original's runs)."""
    per_epoch = -(-int(images) // int(batch))
    if isinstance(epochs, (list, tuple, ListConfig)):
        return ListConfig([int(round(float(e) * per_epoch)) for e in epochs])
    return int(round(float(epochs) * per_epoch))


for _name, _fn in (("eval_pow2", _pow2), ("epochs_to_steps", _epochs_to_steps)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad setting; cheap, so it runs for every sweep member before launch."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is not one of {list(STAGES)}: use stage=ar or stage=tokenizer")
    K = cfg.tokenizer.bits
    if not isinstance(K, int) or K < 1:
        raise ConfigError(f"tokenizer.bits={K!r} must be a positive integer (18 for 2^18 codes)")
    res, down = cfg.tokenizer.resolution, 2 ** (len(cfg.tokenizer.ch_mult) - 1)
    if res % down:
        raise ConfigError(
            f"tokenizer.resolution={res} is not divisible by the tokenizer's downsampling {down} "
            f"(2^(len(tokenizer.ch_mult)-1)): pick a multiple of {down}")
    if cfg.stage == "ar":
        bits = list(cfg.factorization.bits)
        if any((not isinstance(k, int)) or k < 1 for k in bits):
            raise ConfigError(f"factorization.bits={bits} must be positive integers (e.g. factorization=k6_12)")
        if sum(bits) != K:
            raise ConfigError(
                f"factorization={cfg.factorization.name} (bits {bits}, sum {sum(bits)}) does not match "
                f"tokenizer={cfg.tokenizer.name} (tokenizer.bits={K}): the sub-token bits must add up to the "
                f"tokenizer's K; pick a factorization whose bits sum to {K}")
        from magvit2.data.tokens import tokens_cfg
        tokens_cfg(cfg)  # a bad tokens setting fails before the tokenizer trains
        for key in ("cfg_scale", "temperature"):  # before training, not after it
            vals = subtoken_values(cfg.sampling[key], len(bits), f"sampling.{key}")
            if key == "temperature" and min(vals) <= 0:
                raise ConfigError(f"sampling.temperature={vals} must be > 0 for every sub-token")
        sampler_settings(cfg.sampling)
        ac = cfg.trainer.ar.get("activation_checkpointing", False)
        if not isinstance(ac, bool):
            raise ConfigError(f"trainer.ar.activation_checkpointing={ac!r}: use true (recompute the blocks' "
                              f"activations in the backward, for memory) or false (keep them, the default)")
        prc = cfg.get("metrics", {}).get("precision_recall", False)
        if not isinstance(prc, bool):
            raise ConfigError(f"metrics.precision_recall={prc!r}: use true (the in-loop evaluation also gives "
                              f"precision / recall, keeping every image's Inception features) or false (the default)")
        init = cfg.model.get("init_from")
        if init not in (None, "") and not Path(str(init)).expanduser().exists():
            raise ConfigError(f"model.init_from={init} does not exist: give a released Open-MAGVIT2 AR .ckpt, an AR "
                              f"run's checkpoint.pt or its run dir, or null")
        if cfg.model.dim % cfg.model.n_heads or (cfg.model.dim // cfg.model.n_heads) % 4:
            raise ConfigError(
                f"model.dim={cfg.model.dim} / model.n_heads={cfg.model.n_heads} must give a head dim divisible "
                f"by 4 (2D RoPE rotates half the head dim by rows, half by columns)")
    if cfg.data.name == "imagefolder":
        p = cfg.data.path
        if p is None:
            raise ConfigError("data=imagefolder needs a folder: set path=/your/images (or data.path=...)")
        if not Path(p).is_dir():
            raise ConfigError(f"data.path={p} does not exist or is not a folder: point it at an image folder "
                              f"(ImageNet layout: <path>/train/<class>/*.JPEG)")
    _check_numbers(cfg)
    if cfg.stage == "ar":
        _check_classes(cfg)


# sampling.cache -> FactorizedAR.generate's use_cache: dynamic (the growing KV cache, the default), static
# (preallocated, the same shapes every step: what compile / CUDA graphs need), none (recompute the whole prefix).
SAMPLER_CACHE = {"dynamic": True, "static": "static", "none": False}
# sampling.compile as a command-line word (--compile) -> its config value
SAMPLER_COMPILE = {"false": False, "true": True, "cuda_graphs": "cuda_graphs"}


def sampler_settings(sampling) -> tuple[bool | str, bool | str]:
    """(use_cache, compile) from sampling.cache / sampling.compile (absent in older runs' configs: the defaults), or a
    ConfigError naming the setting. Speed only: every choice draws the same tokens (run signatures ignore them).
    Whether the device can run them (cuda_graphs) is checked where it samples: a SLURM submit host has no GPU."""
    cache, comp = sampling.get("cache", "dynamic"), sampling.get("compile", False)
    if not isinstance(cache, str) or cache not in SAMPLER_CACHE:
        raise ConfigError(f"sampling.cache={cache!r} (--cache): use dynamic (the growing KV cache, the default), "
                          f"static (preallocated, fixed shapes) or none (recompute the prefix every step)")
    if not isinstance(comp, bool) and comp != "cuda_graphs":
        raise ConfigError(f"sampling.compile={comp!r} (--compile): use {' | '.join(SAMPLER_COMPILE)}")
    if comp and cache != "static":
        raise ConfigError(f"sampling.compile={comp} compiles the static-cache sampler (fixed shapes): set "
                          f"sampling.cache=static (--cache static) too, or sampling.compile=false")
    return SAMPLER_CACHE[cache], comp


def _positive_int(value, name: str, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1: {fix}")


def _check_numbers(cfg: DictConfig) -> None:
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer (e.g. seed=0)")
    ts = cfg.tokens.get("seed", 0) if cfg.stage == "ar" and "tokens" in cfg else 0
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ConfigError(f"tokens.seed={ts!r} must be an integer: the seed of the tokenizer an AR run trains "
                          f"first (e.g. tokens.seed=0, the default, or tokens.seed='${{seed}}' for one per AR seed)")
    _positive_int(cfg.tracking.log_every, "tracking.log_every", "log every N steps, e.g. tracking.log_every=10")
    for stage in STAGES:
        t = cfg.trainer[stage]
        for key in ("steps", "batch_size", "grad_accum", "ckpt_every"):
            _positive_int(t[key], f"trainer.{stage}.{key}", f"set trainer.{stage}.{key} to a positive integer")
        if not (isinstance(t.lr, (int, float)) and math.isfinite(t.lr) and t.lr > 0):
            raise ConfigError(f"trainer.{stage}.lr={t.lr!r} must be a finite number > 0 (the original: "
                              f"{'1e-4' if stage == 'tokenizer' else '3e-4'})")
        if t.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"trainer.{stage}.precision={t.precision!r}: use no, bf16 or fp16")


def _check_classes(cfg: DictConfig) -> None:
    """The class table must cover the data's classes (photos: one per photo; image folders: train/ subfolders)."""
    if cfg.data.name == "photos":
        n = len(cfg.data.photos)
    else:
        root = Path(cfg.data.path)
        folder = root / "train" if (root / "train").is_dir() else root
        n = sum(1 for d in folder.iterdir() if d.is_dir())
    if cfg.model.num_classes < n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is smaller than the data's {n} classes "
                          f"(data={cfg.data.name}): set model.num_classes={n} (or more)")


def subtoken_values(v, m: int, name: str) -> list[float]:
    """One sampling value per sub-token from a scalar (all the same), M values, or 2 values (the original's, made
    for M = 2) spread linearly from the first sub-token to the last (M = 1: their mean)."""
    vals = [float(a) for a in v] if isinstance(v, (list, tuple, ListConfig)) else [float(v)]
    if any(not math.isfinite(a) for a in vals):
        raise ConfigError(f"{name}={vals} must be finite numbers")
    if len(vals) == 1:
        return vals * m
    if len(vals) == m:
        return vals
    if len(vals) == 2:
        a, b = vals
        return [(a + b) / 2] if m == 1 else [a + (b - a) * j / (m - 1) for j in range(m)]
    raise ConfigError(f"{name} has {len(vals)} values but the factorization has M={m} sub-tokens: give one value, "
                      f"{m} values (one per sub-token) or 2 (spread over the sub-tokens)")


def _strip(d: dict) -> dict:
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in _CADENCE_KEYS}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_FINGERPRINTS: dict = {}  # (absolute folder, mode) -> fingerprint: scanned once per process (a sweep plans 100 members)
FINGERPRINTS = ("stat", "content", "none")
BAD_IMAGE = ("error", "skip")


def data_path(p) -> str:
    """An image folder's absolute path: relative to the launching cwd (hydra keeps it: job.chdir=false; submitit
    starts SLURM members in the submitting cwd), symlinks resolved, so `path=imgs` from two folders are two data
    sets and the same folder by any name is one."""
    return str(Path(str(p)).expanduser().resolve())


def absolute_data_path(cfg: DictConfig) -> None:
    """Pin a relative data.path to the folder it means now (data_path), so the run's saved config.yaml names it
    wherever it is read later (python -m magvit2.sample from another directory)."""
    p = cfg.data.get("path") if "data" in cfg else None
    if p is not None and not Path(str(p)).is_absolute():
        cfg.data.path = data_path(p)


def folder_fingerprint(path: str, mode: str = "stat") -> str:
    """A cheap identity of an image folder's files (every image under it, recursively, symlinks followed):
    stat: count + hash of (relative name, size, mtime_ns) of each; content: count + hash of the bytes of each
    (reads everything); none: "none" (the path alone identifies the data). Cached per process and folder: a run's
    signature cannot change under it while it trains."""
    import os
    from magvit2.data.images import IMG_EXT  # (images imports this module)
    if mode not in FINGERPRINTS:
        raise ConfigError(f"data.fingerprint={mode!r}: use stat (names, sizes, mtimes of the images; the default), "
                          f"content (hashes every image's bytes: slow on large folders) or none (the path only)")
    if mode == "none":
        return "none"
    key = (path, mode)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h, n, seen = hashlib.sha256(), 0, set()
    for top, dirs, files in os.walk(path, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        rel = os.path.relpath(top, path)
        for f in sorted(files):
            if not f.lower().endswith(IMG_EXT):
                continue
            full = os.path.join(top, f)
            try:
                s = os.stat(full)
            except OSError:  # a dangling link: the data set skips it too (no image behind it)
                continue
            n += 1
            h.update(f"{rel}/{f}\0{s.st_size}\0".encode())
            if mode == "stat":
                h.update(f"{s.st_mtime_ns}\n".encode())
            else:
                with open(full, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    fp = f"{mode}:{n}:{h.hexdigest()[:16]}"
    _FINGERPRINTS[key] = fp
    return fp


def data_identity(cfg: DictConfig) -> dict:
    """The data settings that change what a run sees (data.crops included); not loading speed. An image folder is
    its absolute path plus its `data.fingerprint` (names, sizes, mtimes of its images by default), so the same
    relative path from two directories, or a folder whose images changed, is another data set.
    `data.on_bad_image` is left out: a run can only finish in `error` mode when no image is bad, where `skip` sees
    the same data, so a run stopped by a bad image resumes with `skip`."""
    d = _strip(to_dict(cfg.data))
    if "on_bad_image" in d:
        if d["on_bad_image"] not in BAD_IMAGE:
            raise ConfigError(f"data.on_bad_image={d['on_bad_image']!r}: use error (stop at an unreadable image, "
                              f"naming it; the default) or skip (replace it by the next readable image, counted)")
        del d["on_bad_image"]
    if d.get("path") is not None and d.get("name") == "imagefolder":
        d["path"] = data_path(d["path"])
        mode = d.get("fingerprint", "stat")
        if Path(d["path"]).is_dir():
            d["fingerprint"] = folder_fingerprint(d["path"], mode)
        elif mode not in FINGERPRINTS:
            folder_fingerprint(d["path"], mode)  # raises
    return d


def tokenizer_signature(cfg: DictConfig) -> str:
    """What determines a trained tokenizer: architecture, quantizer, losses, data, schedule, seed."""
    return _hash({"tokenizer": to_dict(cfg.tokenizer), "quantizer": to_dict(cfg.quantizer), "data": data_identity(cfg),
                  "trainer": _strip(to_dict(cfg.trainer.tokenizer)), "seed": tokenizer_seed(cfg)})


def tokenizer_seed(cfg: DictConfig) -> int:
    """The tokenizer's seed: `seed` in a tokenizer run; in an AR run, tokens.seed (fixed, so AR seeds share it)."""
    return cfg.seed if cfg.stage == "tokenizer" or "tokens" not in cfg else cfg.tokens.get("seed", cfg.seed)


def tokenizer_config(cfg: DictConfig) -> DictConfig:
    """The config of the tokenizer run an AR run (tokens.tokenizer=auto) trains first."""
    return OmegaConf.merge(cfg, {"stage": "tokenizer", "seed": tokenizer_seed(cfg)})


def tokenizer_source(cfg: DictConfig) -> str:
    """Identity of the tokenizer an AR run uses: its signature (auto) or the explicit checkpoint reference."""
    ck, w = cfg.tokens.tokenizer, cfg.tokens.weights
    return (f"sig:{tokenizer_signature(cfg)}" if ck in (None, "auto") else f"ckpt:{ck}") + f":{w}"


def _model_identity(cfg: DictConfig) -> dict:
    """model.* for the signature; init_from only when set, so runs from before the setting keep their run dirs."""
    m = to_dict(cfg.model)
    if m.get("init_from") in (None, ""):
        m.pop("init_from", None)
    return m


def _tokens_identity(cfg: DictConfig) -> dict:
    """tokens.* for the signature, less the tokenizer's seed (tokenizer_source holds it via the tokenizer signature,
    and leaving it out keeps the run dirs of runs from before the setting)."""
    t = to_dict(cfg.tokens) if "tokens" in cfg else {"name": "online"}
    t.pop("seed", None)
    return t


def ar_signature(cfg: DictConfig) -> str:
    return _hash({"tokenizer": tokenizer_source(cfg), "factorization": list(cfg.factorization.bits),
                  "model": _model_identity(cfg), "data": data_identity(cfg),
                  "tokens": _tokens_identity(cfg),
                  "trainer": _strip(to_dict(cfg.trainer.ar)), "sampling": _strip(to_dict(cfg.sampling)),
                  "seed": cfg.seed})


def signature(cfg: DictConfig) -> str:
    return tokenizer_signature(cfg) if cfg.stage == "tokenizer" else ar_signature(cfg)


def run_dir(cfg: DictConfig, stage: str | None = None) -> Path:
    stage = stage or cfg.stage
    sig = tokenizer_signature(cfg) if stage == "tokenizer" else ar_signature(cfg)
    return Path(cfg.paths.runs) / stage / sig


def member_name(cfg: DictConfig) -> str:
    """A short human name for a run: the group choices that usually differ in ablations."""
    if cfg.stage == "tokenizer":
        return f"{cfg.tokenizer.name}-{_quantizer_name(cfg)}"
    return f"{cfg.factorization.name}-{cfg.model.name}"


def _quantizer_name(cfg: DictConfig) -> str:
    return str(cfg.quantizer._target_).rsplit(".", 1)[-1].lower()


def choices(cfg: DictConfig) -> dict:
    """The config-group choices ablations compare, as the analysis reads them (choice.* params)."""
    return {"tokenizer": cfg.tokenizer.name, "quantizer": _quantizer_name(cfg), "factorization": cfg.factorization.name,
            "model": cfg.model.name, "data": cfg.data.name}
