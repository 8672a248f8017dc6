"""The command-line flags that override a model's sampling settings (conf/sampling/), shared by
`python -m magvit2.sample` and `python -m magvit2.evaluate ar`. A leaf below both commands: it imports no command."""
from __future__ import annotations

import math

from magvit2.config import SAMPLER_CACHE, SAMPLER_COMPILE


def add_sampling_args(ap) -> None:
    """Add the flags; each defaults to None, which keeps the model's own setting."""
    ap.add_argument("--cfg-scale", type=float, nargs="*", default=None, help="sampling.cfg_scale: classifier-free "
                    "guidance scale, one value or one per sub-token (default: the model's)")
    ap.add_argument("--temperature", type=float, nargs="*", default=None, help="sampling.temperature: > 0, one "
                    "value or one per sub-token (default: the model's)")
    ap.add_argument("--top-k", type=int, default=None, help="sampling.top_k: keep the k most likely codes of each "
                    "sub-token (default: the model's; off in conf/sampling/)")
    ap.add_argument("--top-p", type=float, default=None, help="sampling.top_p: nucleus filter in (0, 1] "
                    "(default: the model's; off in conf/sampling/)")
    ap.add_argument("--seed", type=int, default=None, help="sampling.seed: the same seed draws the same samples "
                    "(default: the model's, 0 in conf/sampling/)")
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
    """The first bad argument's message, else None. `a` also has --per-class and --batch-size (each command's own)."""
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
