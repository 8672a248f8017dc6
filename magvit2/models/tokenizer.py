"""MAGVIT-v2 style convolutional tokenizer (Open-MAGVIT2): encoder -> quantizer -> decoder, no attention.

Bias convention (chosen so the parameter counts match the reference configs, ~115M for 256-L):
convolutions inside a ResBlock (both 3x3 and the 1x1 shortcut) and the encoder's conv_in have no bias, because
a GroupNorm (or, for conv_in, the first ResBlock's GroupNorm) follows and would cancel it. Every other conv
(down/up-sampling, encoder/decoder heads, decoder conv_in) and the adaptive-norm Linears have a bias.
`count_params_analytic` writes this out in closed form.

Everything works in channels_last: no `.view` on activations, only reductions, einops and pixel_shuffle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

GN_GROUPS = 32
GN_EPS = 1e-6


def num_groups(channels: int) -> int:
    """32 groups as in the paper; gcd keeps tiny configs (ch < 32 or odd widths) valid."""
    return math.gcd(GN_GROUPS, channels)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=GN_EPS, affine=affine)


def _check_arch(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int) -> tuple[int, ...]:
    if not isinstance(ch, int) or ch < 1:
        raise ValueError(f"ch must be a positive int, got {ch!r}")
    ch_mult = tuple(ch_mult)
    if len(ch_mult) == 0 or any((not isinstance(m, int)) or m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, e.g. (1, 1, 2, 2, 4); "
                         f"got {ch_mult!r}")
    if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be an int >= 1, got {num_res_blocks!r}")
    if not isinstance(z_channels, int) or z_channels < 1:
        raise ValueError(f"z_channels must be a positive int (the quantizer's K), got {z_channels!r}")
    return ch_mult


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus identity (or 1x1 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, modulated by a per-image style taken from the quantized latent.

    scale = Linear(K->C)(spatial std of z), shift = Linear(K->C)(spatial mean of z), std = sqrt(var + eps).
    variance="unbiased" (the original's: torch.var's default, which needs h*w > 1) or "population" (correction 0).
    scale_init="default" (the original's: PyTorch's Linear init, so the layer starts as a random per-channel
    scale) or "one" (scale bias 1: the layer starts close to a plain GroupNorm).
    """

    def __init__(self, z_channels: int, channels: int, eps: float = GN_EPS, variance: str = "unbiased",
                 scale_init: str = "default"):
        super().__init__()
        if variance not in ("unbiased", "population"):
            raise ValueError(f"variance={variance!r}: use 'unbiased' (the original's) or 'population'")
        if scale_init not in ("default", "one"):
            raise ValueError(f"scale_init={scale_init!r}: use 'default' (the original's) or 'one'")
        self.norm = group_norm(channels, affine=False)
        self.scale = nn.Linear(z_channels, channels)
        self.shift = nn.Linear(z_channels, channels)
        self.eps, self.correction = eps, 1 if variance == "unbiased" else 0
        if scale_init == "one":
            nn.init.ones_(self.scale.bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if self.correction and z.shape[2] * z.shape[3] < 2:
            raise ValueError("the unbiased variance of a 1x1 latent is undefined: use a larger image or "
                             "variance='population'")
        var, mean = torch.var_mean(z.float(), dim=(2, 3), correction=self.correction)
        std = (var + self.eps).sqrt().to(z.dtype)  # eps keeps sqrt's gradient finite at var = 0
        scale = rearrange(self.scale(std), "b c -> b c 1 1")
        shift = rearrange(self.shift(mean.to(z.dtype)), "b c -> b c 1 1")
        return self.norm(x) * scale + shift


class Upsample(nn.Module):
    """conv3x3 C -> 4C then depth-to-space (pixel_shuffle 2): a learned 2x upsampling without transposed convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class Encoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=18, in_channels=3):
        super().__init__()
        ch_mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.levels = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            level = nn.Module()
            level.blocks = nn.Sequential(*[ResBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)])
            # Downsample after every level but the last: len(ch_mult) - 1 halvings.
            level.down = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1) if i < len(ch_mult) - 1 else nn.Identity()
            self.levels.append(level)
            c_in = c_out
        self.mid = nn.Sequential(*[ResBlock(c_in, c_in) for _ in range(num_res_blocks)])
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level.down(level.blocks(h))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=18, out_channels=3,
                 adagn_variance: str = "unbiased", adagn_scale_init: str = "default"):
        super().__init__()
        ch_mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock(c_in, c_in) for _ in range(num_res_blocks)])
        self.levels = nn.ModuleList()  # coarsest first
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            level = nn.Module()
            level.norm = AdaptiveGroupNorm(z_channels, c_in, variance=adagn_variance, scale_init=adagn_scale_init)
            level.blocks = nn.Sequential(*[ResBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)])
            level.up = Upsample(c_out) if i > 0 else nn.Identity()
            self.levels.append(level)
            c_in = c_out
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level.up(level.blocks(level.norm(h, z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Tokenizer(nn.Module):
    """Image <-> LFQ/VQ tokens. The quantizer supplies `dim` (K), forward(z) -> QuantizerOutput(codes, indices,
    loss, stats) and indices_to_codes(indices) -> (B, K, h, w). Fully convolutional: `resolution` is the training
    resolution (it fixes `token_grid`), but any H, W divisible by `downsample` is accepted (zero-shot 256px for 128-L).
    """

    def __init__(self, quantizer: nn.Module, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, resolution: int = 256,
                 adagn_variance: str = "unbiased", adagn_scale_init: str = "default"):
        super().__init__()
        z_channels = getattr(quantizer, "dim", None)
        if not isinstance(z_channels, int) or z_channels < 1:
            raise ValueError(f"quantizer must expose an int attribute `dim` (latent channels K); got {z_channels!r}")
        ch_mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels)
        self.downsample = 2 ** (len(ch_mult) - 1)
        if not isinstance(resolution, int) or resolution < 1 or resolution % self.downsample:
            raise ValueError(
                f"resolution must be a positive multiple of the downsampling factor {self.downsample} "
                f"(2 ** (len(ch_mult) - 1)); got {resolution!r}"
            )
        self.resolution = resolution
        self.token_grid = resolution // self.downsample
        self.z_channels = z_channels
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantizer = quantizer
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, adagn_variance=adagn_variance,
                               adagn_scale_init=adagn_scale_init)

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be images of shape (B, 3, H, W) in [-1, 1]; got shape {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(
                f"x's height and width must be multiples of {self.downsample}; got {tuple(x.shape[2:])} "
                "(resize or crop the images)"
            )

    def encode(self, x: Tensor):
        self._check_images(x)
        return self.quantizer(self.encoder(x))

    def decode(self, codes: Tensor) -> Tensor:
        if codes.ndim != 4 or codes.shape[1] != self.z_channels:
            raise ValueError(f"codes must have shape (B, {self.z_channels}, h, w); got {tuple(codes.shape)}")
        return self.decoder(codes)

    def decode_indices(self, indices: Tensor) -> Tensor:
        if indices.ndim != 3:
            raise ValueError(f"indices must have shape (B, h, w); got {tuple(indices.shape)}")
        return self.decode(self.quantizer.indices_to_codes(indices))

    def forward(self, x: Tensor):
        q = self.encode(x)
        return self.decode(q.codes), q


def count_params_analytic(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int) -> dict:
    """Parameter counts in closed form (3 RGB channels), independent of module construction; see the bias note."""
    ch_mult = _check_arch(ch, ch_mult, num_res_blocks, z_channels)
    n, k, widths = num_res_blocks, z_channels, [ch * m for m in ch_mult]

    def res(a: int, b: int) -> int:  # two GN affines, two bias-free 3x3 convs, bias-free 1x1 shortcut if a != b
        return 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)

    def stack(a: int, b: int) -> int:  # N ResBlocks, the first changes a -> b
        return res(a, b) + (n - 1) * res(b, b)

    top = widths[-1]
    enc = 3 * 9 * ch  # conv_in, no bias
    prev = ch
    for i, c in enumerate(widths):
        enc += stack(prev, c) + (9 * c * c + c if i < len(widths) - 1 else 0)  # + stride-2 conv with bias
        prev = c
    enc += n * res(top, top) + 2 * top + (top * k + k)  # mid, GN out, 1x1 conv_out

    dec = 9 * k * top + top + n * res(top, top)  # conv_in (bias) + mid
    prev = top
    for i in reversed(range(len(widths))):
        c = widths[i]
        dec += 2 * (k * prev + prev) + stack(prev, c)  # adaptive GN's two Linears + ResBlocks
        dec += 9 * c * 4 * c + 4 * c if i > 0 else 0  # upsample conv C -> 4C
        prev = c
    dec += 2 * ch + 9 * ch * 3 + 3  # GN out + conv_out to RGB
    return {"encoder": enc, "decoder": dec, "total": enc + dec}
