"""The original's tokenizer layout (Open-MAGVIT2 VQModel: improved_model.Encoder/Decoder, LFQ, the PatchGAN in
its loss, LitEma) <-> magvit2's Tokenizer, PatchDiscriminator and EMA.

Names differ only by renames, with two layout differences:
- the decoder's levels: the original indexes `up.{i}` / `adaptive.{i}` finest first (i = 0 at full resolution),
  magvit2's `levels.{l}` run coarsest first, so l = L - 1 - i;
- the decoder's 2x upsampling: conv C -> 4C, then depth-to-space. The original's depth_to_space is DCR: output
  channel (s, c) with s = 2a + b the sub-pixel (a: row, b: column) reads conv channel s * C + c; pixel_shuffle
  reads channel c * 4 + s. Importing permutes the conv's output rows (weight and bias) accordingly.
The LitEma copy of every trained parameter sits under `model_ema.<name without dots>` (decay, num_updates beside).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

ENC_RENAMES = [(r"^encoder\.levels\.(\d+)\.blocks\.", r"encoder.down.\1.block."),
               (r"^encoder\.levels\.(\d+)\.down\.", r"encoder.down.\1.downsample."),
               (r"^(en|de)coder\.mid\.", r"\1coder.mid_block."),
               (r"\.shortcut\.", ".nin_shortcut.")]
DEC_LEVEL = re.compile(r"^decoder\.levels\.(\d+)\.(norm\.scale|norm\.shift|blocks|up\.conv)\.(.*)$")
DEC_PARTS = {"norm.scale": "adaptive.{i}.gamma", "norm.shift": "adaptive.{i}.beta", "blocks": "up.{i}.block",
             "up.conv": "up.{i}.upsample.conv1"}
EMA_PREFIX = "model_ema."
DISC_PREFIX = "loss.discriminator."
LPIPS_KEY = re.compile(r"(net\.slice[1-5]\.\d+\.(weight|bias)|lins?\.?\d\.model\.1\.weight|scaling_layer\.(shift|scale))$")
LPIPS_PREFIX = "loss.perceptual_loss."  # the original's LPIPS copy: magvit2 reads LPIPS from metrics.vgg16_weights


def d2s_from_reference(t: Tensor) -> Tensor:
    """Rows of a C -> 4C conv (weight or bias), DCR order (s * C + c) -> pixel_shuffle order (c * 4 + s)."""
    c = t.shape[0] // 4
    return t[torch.arange(4 * c).view(4, c).t().reshape(-1)]


def d2s_to_reference(t: Tensor) -> Tensor:
    c = t.shape[0] // 4
    return t[torch.arange(4 * c).view(c, 4).t().reshape(-1)]


def reference_name(name: str, num_levels: int) -> tuple[str, bool]:
    """magvit2 Tokenizer state_dict key -> (the original's key, whether its rows are depth-to-space permuted)."""
    m = DEC_LEVEL.match(name)
    if m:
        level, part, rest = m.groups()
        i = num_levels - 1 - int(level)
        rest = re.sub(r"^(\d+)\.shortcut\.", r"\1.nin_shortcut.", rest)
        return f"decoder.{DEC_PARTS[part].format(i=i)}.{rest}", part == "up.conv"
    for pattern, repl in ENC_RENAMES:
        name = re.sub(pattern, repl, name)
    return name, False


def key_map(model) -> dict[str, tuple[str, bool]]:
    """Every key of the tokenizer's state_dict -> (the original's key, permuted?)."""
    levels = len(model.decoder.levels)
    keys = list(model.state_dict())
    bad = [k for k in keys if not k.startswith(("encoder.", "decoder."))]
    if bad:
        raise ValueError(f"the original's layout has LFQ only (no quantizer weights), but this tokenizer has {bad[:3]}: "
                         f"use quantizer=lfq")
    return {k: reference_name(k, levels) for k in keys}


def ema_name(reference_key: str) -> str:
    """LitEma stores parameter `a.b.c` as buffer `model_ema.abc`."""
    return EMA_PREFIX + reference_key.replace(".", "")


def infer_arch(sd: dict, prefix: str = "") -> dict:
    """ch, ch_mult, num_res_blocks and K (bits) of a tokenizer in the original's layout, from its shapes."""
    ch = sd[f"{prefix}encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"^{re.escape(prefix)}encoder\.down\.(\d+)\.", k)))
    mult = [sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    blocks = len({m.group(1) for k in sd if (m := re.match(rf"^{re.escape(prefix)}encoder\.down\.0\.block\.(\d+)\.", k))})
    return {"ch": ch, "ch_mult": mult, "num_res_blocks": blocks, "bits": sd[f"{prefix}encoder.conv_out.weight"].shape[0]}


def to_reference(model_sd: dict, num_levels: int, ema: dict | None = None, disc_sd: dict | None = None,
                 ema_decay: float = 0.999) -> dict:
    """magvit2 tokenizer state (+ EMA shadow, + discriminator) -> the original's VQModel state_dict.

    magvit2 keeps no EMA of the discriminator; the original's LitEma has one, so its slots get the raw
    discriminator weights (the original uses EMA weights only to evaluate the generator)."""
    out = {}
    for k, t in model_sd.items():
        ref, perm = reference_name(k, num_levels)
        out[ref] = d2s_to_reference(t) if perm else t
        if ema is not None:
            out[ema_name(ref)] = d2s_to_reference(ema[k]) if perm else ema[k]
    for k, t in (disc_sd or {}).items():
        out[DISC_PREFIX + k] = t
        if ema is not None and not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out[ema_name(DISC_PREFIX + k)] = t
    if ema is not None:
        out["model_ema.decay"] = torch.tensor(float(ema_decay), dtype=torch.float32)
        out["model_ema.num_updates"] = torch.tensor(-1, dtype=torch.int32)  # the original's default: no warmup
    return out


def arch_fix(sd: dict, prefix: str = "") -> str:
    a = infer_arch(sd, prefix)
    return (f"the file holds a tokenizer with ch={a['ch']}, ch_mult={a['ch_mult']}, num_res_blocks="
            f"{a['num_res_blocks']}, bits={a['bits']}: use a tokenizer config with those values (tokenizer="
            f"magvit2_256_L and magvit2_128_L have 128, [1, 1, 2, 2, 4], 4, 18) and quantizer=lfq")


def take_tokenizer(c, model, prefix: str = "", disc=None) -> dict:
    """Read the tokenizer (and its EMA and discriminator, when the file has them) from Consumer `c`.
    -> {"raw": magvit2 state_dict, "ema": EMA shadow or None, "ema_decay", "disc": loaded?}."""
    ours = model.state_dict()
    kmap = key_map(model)
    has_ema = any(k.startswith(prefix + EMA_PREFIX) for k in c.sd)
    raw, ema = {}, ({} if has_ema else None)
    for k, (ref, perm) in kmap.items():
        for dst, key in ((raw, prefix + ref), (ema, prefix + ema_name(ref))):
            if dst is None:
                continue
            t = c.take(key, ours[k])
            if t is not None:
                dst[k] = d2s_from_reference(t) if perm else t
    decay = None
    if has_ema:
        d = c.take(prefix + "model_ema.decay")
        c.take(prefix + "model_ema.num_updates")
        decay = None if d is None else float(d)
        disc_ema = [k for k in c.sd if k.startswith(prefix + EMA_PREFIX + DISC_PREFIX.replace(".", ""))]
        c.ignore(disc_ema, "the EMA of the discriminator (magvit2 keeps none)")
    disc_keys = [k for k in c.sd if k.startswith(prefix + DISC_PREFIX)]
    loaded_disc = False
    if disc is not None and disc_keys:
        dsd = disc.state_dict()
        got = {k: c.take(prefix + DISC_PREFIX + k, t) for k, t in dsd.items()}
        if all(v is not None for v in got.values()):  # else c.finish() reports what is missing
            disc.load_state_dict(got)
            loaded_disc = True
    else:
        c.ignore(disc_keys, "the discriminator (not needed to encode or decode)")
    # only what an lpips.LPIPS network holds is set aside as it; any other tensor there is reported by name
    c.ignore([k for k in c.sd if k.startswith(prefix + LPIPS_PREFIX)
              and LPIPS_KEY.match(k[len(prefix + LPIPS_PREFIX):])],
             "the loss's LPIPS network (magvit2 reads LPIPS from metrics.vgg16_weights)")
    return {"raw": raw, "ema": ema, "ema_decay": decay, "disc": loaded_disc}
