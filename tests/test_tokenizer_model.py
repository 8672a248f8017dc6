"""Tokenizer encoder/decoder, PatchGAN discriminator + GAN losses, weight EMA."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from magvit2.models.discriminator import LeCAM, PatchDiscriminator, generator_adv_loss, hinge_d_loss
from magvit2.models.ema import EMA
from magvit2.models.tokenizer import (
    AdaptiveGroupNorm,
    Decoder,
    Encoder,
    Tokenizer,
    count_params_analytic,
    num_groups,
)

TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


class QOut(NamedTuple):
    codes: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict


class SignQuantizer(nn.Module):
    """Stand-in LFQ: sign with straight-through, index bit i = [z_i > 0] (least significant first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, z):
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        bits = (z > 0).long()
        weights = (2 ** torch.arange(self.dim, device=z.device)).reshape(1, -1, 1, 1)
        return QOut(z + (q - z).detach(), (bits * weights).sum(1), F.mse_loss(z, q.detach()), {})

    def indices_to_codes(self, indices):
        bits = (indices.unsqueeze(-1) >> torch.arange(self.dim, device=indices.device)) & 1
        return rearrange(bits.float() * 2 - 1, "b h w k -> b k h w")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "name,ch_mult,ref_total,ref_enc,ref_dec",
    [("256-L", (1, 1, 2, 2, 4), 115e6, 50e6, 65e6), ("128-L", (1, 2, 2, 4), 112e6, None, None)],
)
def test_param_counts_match_reference(name, ch_mult, ref_total, ref_enc, ref_dec):
    with torch.device("meta"):
        tok = Tokenizer(SignQuantizer(18), ch=128, ch_mult=ch_mult, num_res_blocks=4)
    counts = {"encoder": n_params(tok.encoder), "decoder": n_params(tok.decoder)}
    counts["total"] = counts["encoder"] + counts["decoder"]
    print(f"{name}: {counts} (total / reference {counts['total'] / ref_total:.4f})")
    assert counts == count_params_analytic(128, ch_mult, 4, 18)
    assert abs(counts["total"] / ref_total - 1) < 0.05
    if ref_enc:
        assert abs(counts["encoder"] / ref_enc - 1) < 0.05 and abs(counts["decoder"] / ref_dec - 1) < 0.05
    assert tok.downsample * 16 == {"256-L": 256, "128-L": 128}[name]  # both give 16x16 tokens


def test_analytic_count_tiny_and_groups():
    # Odd widths exercise the gcd rule for GroupNorm (24 channels -> 8 groups) and the analytic formula.
    assert [num_groups(c) for c in (8, 24, 32, 48, 512)] == [8, 8, 32, 16, 32]
    for cfg in (dict(ch=8, ch_mult=(1, 3), num_res_blocks=2), dict(TINY)):
        enc, dec = Encoder(z_channels=5, **cfg), Decoder(z_channels=5, **cfg)
        assert count_params_analytic(z_channels=5, **cfg) == {
            "encoder": n_params(enc), "decoder": n_params(dec), "total": n_params(enc) + n_params(dec)}
        enc(torch.randn(1, 3, 8, 8))


def test_discriminator_param_count_and_shape():
    d = PatchDiscriminator()
    ndf, widths = 64, [3, 64, 128, 256, 512]
    # first conv (bias), three conv (no bias) + BN affine, last conv (bias) to one logit
    analytic = 16 * 3 * 64 + 64 + sum(16 * a * b + 2 * b for a, b in zip(widths[1:-1], widths[2:])) + 16 * 512 + 1
    assert widths[1] == ndf and n_params(d) == analytic
    print(f"discriminator: {analytic} params ({analytic / 2.77e6:.4f} of 2.77M)")
    assert abs(analytic / 2.77e6 - 1) < 0.03
    # 256 -> 128 -> 64 -> 32 (stride 2 x3) -> 31 -> 30 (stride 1, k4 p1): the 30x30 patch map of pix2pix
    with torch.device("meta"):
        assert PatchDiscriminator()(torch.empty(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(n_layers=0)


# ---------------------------------------------------------------- shapes and behaviour


def test_tiny_shapes_roundtrip():
    torch.manual_seed(0)
    tok = Tokenizer(SignQuantizer(18), resolution=32, **TINY)
    assert tok.downsample == 4 and tok.token_grid == 8
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    q = tok.encode(x)
    assert q.codes.shape == (2, 18, 8, 8) and q.indices.shape == (2, 8, 8)
    assert set(q.codes.detach().unique().tolist()) <= {-1.0, 1.0}
    rec, q2 = tok(x)
    assert rec.shape == x.shape and torch.equal(q2.indices, q.indices)
    # decode_indices goes through the quantizer's code table and must equal decoding the codes directly
    torch.testing.assert_close(tok.decode_indices(q.indices), tok.decode(q.codes))
    # fully convolutional: other sizes divisible by 4 work (zero-shot higher resolution)
    assert tok(torch.zeros(1, 3, 48, 64))[0].shape == (1, 3, 48, 64)


def test_bad_inputs_raise_value_error():
    tok = Tokenizer(SignQuantizer(4), resolution=32, **TINY)
    with pytest.raises(ValueError, match="multiples of 4"):
        tok.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="codes"):
        tok.decode(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="resolution"):
        Tokenizer(SignQuantizer(4), resolution=30, **TINY)
    with pytest.raises(ValueError, match="dim"):
        Tokenizer(nn.Identity(), **TINY)
    with pytest.raises(ValueError, match="ch_mult"):
        Encoder(ch_mult=())


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    tok = Tokenizer(SignQuantizer(6), resolution=32, **TINY)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref, _ = tok(x)
    tok_cl = tok.to(memory_format=torch.channels_last)
    out, _ = tok_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["LFQ", "VQ"])
def test_real_quantizers_if_available(kind):
    quantizers = pytest.importorskip("magvit2.quantizers", reason="magvit2.quantizers not written yet")
    torch.manual_seed(0)
    quantizer = quantizers.LFQ(bits=10) if kind == "LFQ" else quantizers.VQ(codebook_size=64, dim=8)
    tok = Tokenizer(quantizer, resolution=32, **TINY)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, q = tok(x)
    assert isinstance(q, quantizers.QuantizerOutput)
    assert rec.shape == x.shape and q.codes.shape == (2, quantizer.dim, 8, 8) and q.indices.shape == (2, 8, 8)
    torch.testing.assert_close(tok.decode_indices(q.indices), tok.decode(q.codes))
    (rec.square().mean() + q.loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder


# ---------------------------------------------------------------- adaptive GroupNorm


def test_adaptive_group_norm_closed_form_and_global_style():
    torch.manual_seed(0)
    agn = AdaptiveGroupNorm(z_channels=4, channels=8)
    x, z = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 3, 3)
    std, mean = z.std(dim=(2, 3), unbiased=True), z.mean(dim=(2, 3))  # the original's torch.var default
    expected = F.group_norm(x, 8, eps=1e-6) * (agn.scale(torch.sqrt(std**2 + 1e-6)))[..., None, None] + agn.shift(
        mean)[..., None, None]
    torch.testing.assert_close(agn(x, z), expected)
    # a per-image style: permuting the latent's pixels (same mean/std) leaves the output unchanged ...
    perm = torch.randperm(9)
    z_perm = rearrange(rearrange(z, "b c h w -> b c (h w)")[..., perm], "b c (h w) -> b c h w", h=3)
    torch.testing.assert_close(agn(x, z_perm), agn(x, z))
    # ... and the style path is live from the start (PyTorch's Linear init, as in the original)
    assert agn.scale.weight.abs().sum() > 0 and agn.scale.bias.abs().sum() > 0


def test_decoder_style_path_is_live():
    torch.manual_seed(0)
    dec = Decoder(z_channels=6, **TINY)
    z = torch.randn(1, 6, 8, 8)
    z_shift = z + torch.tensor([0.5, -0.5, 0.2, 0.0, 0.3, -0.1]).reshape(1, 6, 1, 1)  # new mean, same std

    def run(z_content, z_style):  # content through conv_in, style only through the adaptive norms
        h = dec.mid(dec.conv_in(z_content))
        for level in dec.levels:
            h = level.up(level.blocks(level.norm(h, z_style)))
        return dec.conv_out(F.silu(dec.norm_out(h)))

    torch.testing.assert_close(run(z, z), dec(z))
    diff = (run(z, z_shift) - run(z, z)).abs().max().item()
    assert diff > 1e-3, diff
    dec(z).square().mean().backward()
    for level in dec.levels:
        assert level.norm.scale.weight.grad.abs().sum() > 0 and level.norm.shift.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- GAN losses


def test_hinge_and_generator_loss_hand_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> 2.5/3 ; relu(1 + fake) = [0, 1, 2.5] -> 3.5/3 ; 0.5 * 6/3 = 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.0))
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(4/3) -> mean = ln(8/3)/2
    expected = torch.tensor(math.log(8 / 3) / 2)
    torch.testing.assert_close(generator_adv_loss(torch.tensor([0.0, math.log(3.0)]), "patch"), expected)


def test_lecam_value_and_ema_update():
    lecam = LeCAM(decay=0.9).eval()
    lecam.ema_real.fill_(0.5)
    lecam.ema_fake.fill_(-0.5)
    real, fake = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    # relu(real + .5)^2 = [2.25, 0] -> 1.125 ; relu(.5 - fake)^2 = [.25, 0] -> .125
    torch.testing.assert_close(lecam(real, fake), torch.tensor(1.25))
    assert lecam.ema_real.item() == 0.5  # eval mode: pure

    lecam = LeCAM(decay=0.9).train()
    r1, f1, r2, f2 = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0]), torch.tensor([4.0]), torch.tensor([-6.0])
    lecam(r1, f1)
    reg = lecam(r2, f2)
    er, ef = 0.9 * (0.1 * 2.0) + 0.1 * 4.0, 0.9 * (0.1 * -1.0) + 0.1 * -6.0  # 0.58, -0.69
    torch.testing.assert_close(lecam.ema_real, torch.tensor(er))
    torch.testing.assert_close(lecam.ema_fake, torch.tensor(ef))
    # the second call uses the anchors updated with its own batch
    torch.testing.assert_close(reg, torch.tensor((4.0 - ef) ** 2 + (er + 6.0) ** 2))
    assert set(dict(lecam.state_dict())) == {"ema_real", "ema_fake"}


def test_lecam_gradient_reaches_logits_only():
    lecam = LeCAM()
    real = torch.tensor([2.0, -3.0], requires_grad=True)
    fake = torch.tensor([-1.0, 0.5], requires_grad=True)
    lecam(real, fake).backward()
    # ema ~ 0 after one update: d/dreal mean(relu(real - ef)^2) = (real - ef) for real > ef, else 0
    ef = lecam.ema_fake.item()
    torch.testing.assert_close(real.grad, torch.tensor([2.0 - ef, 0.0]))
    assert not lecam.ema_real.requires_grad


# ---------------------------------------------------------------- EMA


def _model():
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_closed_form_and_buffers():
    torch.manual_seed(0)
    model, d = _model(), 0.9
    ema = EMA(model, decay=d)
    p0 = model[0].weight.detach().clone()
    history = []
    for t in range(1, 6):
        with torch.no_grad():
            model[0].weight.copy_(torch.full((2, 3), float(t)))
            model[1].running_mean.fill_(10.0 * t)
        history.append(float(t))
        ema.update(model)
    n = len(history)
    expected = d**n * p0 + (1 - d) * sum(d ** (n - t) * v for t, v in enumerate(history, start=1))
    torch.testing.assert_close(ema.shadow["0.weight"], expected)
    assert torch.equal(ema.buffers["1.running_mean"], torch.full((2,), 50.0))  # copied, not averaged
    assert ema.num_updates == 5


def test_ema_warmup_schedule():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(.999, 1/10) = 0.1 -> 0.9
    ema.update(model)  # decay 2/11 -> 1 - (2/11) * 0.1
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[1 - 0.1 * 2 / 11]]))


def test_ema_swap_restores_and_state_dict_roundtrip():
    torch.manual_seed(0)
    model = _model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swap(model):
        torch.testing.assert_close(model[0].weight, ema.shadow["0.weight"])
        assert not torch.equal(model[0].weight, original["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    with pytest.raises(RuntimeError), ema.swap(model):
        raise RuntimeError("eval failed")
    assert torch.equal(model[0].weight, original["0.weight"])  # restored on exceptions too

    other = EMA(_model(), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1
    torch.testing.assert_close(other.shadow["0.weight"], ema.shadow["0.weight"])
    target = _model()
    other.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(3, 2))
    # a DDP/compile-style wrapper prefix is tolerated
    wrapper = nn.Module()
    wrapper.module = model
    ema.update(wrapper)


# ---------------------------------------------------------------- speed (measured, not asserted)


def test_tiny_forward_backward_time_cpu():
    torch.manual_seed(0)
    tok = Tokenizer(SignQuantizer(18), resolution=32, **TINY)
    x = torch.rand(16, 3, 32, 32) * 2 - 1

    def step():
        rec, q = tok(x)
        loss = (rec - x).abs().mean() + q.loss
        loss.backward()
        return loss

    step()  # warm-up
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    print(f"tiny tokenizer fwd+bwd, batch 16, 32x32, CPU threads={torch.get_num_threads()}: "
          f"best of 2 {min(times) * 1e3:.1f} ms ({n_params(tok)} params)")
    assert torch.isfinite(loss)


def test_ema_update_is_bit_identical_to_a_per_tensor_lerp_loop():
    from magvit2.quantizers import LFQ

    torch.manual_seed(0)
    model = Tokenizer(LFQ(bits=8), ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    ema = EMA(model, decay=0.9, warmup=True)
    want = {n: t.clone() for n, t in ema.shadow.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = ema.current_decay()
        ema.update(model)
        for n, p in model.named_parameters():  # the definition, one tensor at a time
            want[n].lerp_(p.detach(), 1.0 - d)
        for n in want:
            assert torch.equal(ema.shadow[n], want[n]), (step, n)
