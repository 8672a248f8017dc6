"""The original's recipe is the default; each deviation is a named setting that changes what it should.

Every setting below gets a test on fixed inputs that tells its two options apart, and the composed configs are
checked against the numbers of the original's configs (TencentARC/SEED-Voken configs/Open-MAGVIT2/gpu, scripts/).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import magvit2.train  # noqa: F401  (resolvers, sweeper/launcher config nodes)
from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.models.ar import ARConfig, FactorizedAR
from magvit2.models.discriminator import generator_adv_loss
from magvit2.models.llama import apply_rope, rope_table
from magvit2.models.tokenizer import AdaptiveGroupNorm
from magvit2.quantizers import LFQ
from magvit2.stages.ar import lr_lambda, param_groups
from conftest import REPO

IMAGENET = 1281167
AR_EPOCH, TOK_EPOCH = math.ceil(IMAGENET / 768), math.ceil(IMAGENET / 256)  # 1669, 5005 steps per epoch


def cfg_of(*overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/magvit2-unused", *overrides])


# ------------------------------------------------------------------------------------------- composed configs


@pytest.mark.parametrize("size,lr,epochs,warmup,cfg_scale,temp", [
    ("B", 3e-4, 300, 6, [1.9, 2.0], [1.0, 1.0]),
    ("L", 3e-4, 300, 6, [1.9, 1.9], [1.1, 1.0]),
    ("XL", 2.4e-4, 350, 7, [1.75, 1.85], [1.1, 1.0]),
])
def test_imagenet_recipe_per_model_size(size, lr, epochs, warmup, cfg_scale, temp):
    cfg = cfg_of("trainer=imagenet", f"model={size}")
    ar = cfg.trainer.ar
    assert (ar.lr, ar.epochs, ar.warmup_epochs, ar.batch_size) == (lr, epochs, warmup, 768)
    assert (ar.steps, ar.warmup_steps) == (epochs * AR_EPOCH, warmup * AR_EPOCH)
    assert (ar.weight_decay, ar.weight_decay_on, list(ar.betas), ar.grad_clip) == (0.05, "all", [0.9, 0.95], 1.0)
    assert (ar.flat_fraction, ar.final_lr_ratio) == (0.05, 0.1)
    assert (list(cfg.sampling.cfg_scale), list(cfg.sampling.temperature)) == (cfg_scale, temp)
    assert cfg.sampling.top_k is None and cfg.sampling.top_p is None


@pytest.mark.parametrize("tok,epochs,drops,lecam", [("magvit2_256_L", 270, [200, 250], 0.05),
                                                     ("magvit2_128_L", 350, [250, 300], 0.01)])
def test_imagenet_recipe_per_tokenizer(tok, epochs, drops, lecam):
    cfg = cfg_of("trainer=imagenet", f"tokenizer={tok}")
    t = cfg.trainer.tokenizer
    assert (t.steps, list(t.lr_decay_steps)) == (epochs * TOK_EPOCH, [d * TOK_EPOCH for d in drops])
    assert (t.lr, list(t.betas), t.batch_size, t.ema_decay) == (1e-4, [0.5, 0.9], 256, 0.999)
    assert cfg.tokenizer.loss.lecam_weight == lecam and cfg.tokenizer.loss.adv_weight == 0.1


def test_cpu_trainer_ignores_imagenet_sizes_and_sampling_overrides_model():
    assert cfg_of("model=XL").trainer.ar.lr == cfg_of().trainer.ar.lr == 1e-3
    cfg = cfg_of("model=L", "sampling=B")
    assert list(cfg.sampling.cfg_scale) == [1.9, 2.0] and cfg.model.name == "L"
    assert cfg_of("trainer=imagenet", "model=XL", "trainer.ar.lr=1e-4").trainer.ar.lr == 1e-4


def test_defaults_are_the_original():
    cfg = cfg_of()
    assert cfg.quantizer.codebook_entropy == "local"
    assert (cfg.model.class_rope, cfg.model.intra_embed_dropout) == ("zero", False)
    assert (cfg.tokenizer.adagn_variance, cfg.tokenizer.adagn_scale_init) == ("unbiased", "default")
    assert (cfg.tokenizer.loss.g_adv_reduce, cfg.tokens.weights) == ("image", "raw")
    assert cfg.trainer.ar.weight_decay_on == "all"


@pytest.mark.parametrize("override,tokenizer_changes", [
    ("quantizer.codebook_entropy=global", True), ("tokenizer.adagn_variance=population", True),
    ("tokenizer.adagn_scale_init=one", True), ("tokenizer.loss.g_adv_reduce=patch", True),
    ("model.class_rope=identity", False), ("model.intra_embed_dropout=true", False),
    ("trainer.ar.weight_decay_on=matrices", False), ("tokens.weights=ema", False),
])
def test_every_setting_enters_its_signature(override, tokenizer_changes):
    base, alt = cfg_of(), cfg_of(override)
    assert (C.tokenizer_signature(base) != C.tokenizer_signature(alt)) == tokenizer_changes
    assert C.ar_signature(base) != C.ar_signature(alt)


def test_sampling_values_spread_over_subtokens_and_bad_lengths_fail_before_training():
    assert C.subtoken_values([1.9, 2.0], 2, "s") == [1.9, 2.0]
    assert C.subtoken_values(1.5, 3, "s") == [1.5] * 3
    assert C.subtoken_values([1.0, 2.0], 3, "s") == [1.0, 1.5, 2.0]
    assert C.subtoken_values([1.0, 2.0], 1, "s") == [1.5]
    with pytest.raises(ConfigError, match="sampling.cfg_scale has 3 values"):
        C.validate(cfg_of("sampling.cfg_scale=[1,2,3]"))
    with pytest.raises(ConfigError, match="sampling.temperature"):
        C.validate(cfg_of("sampling.temperature=[1.0,0.0]"))
    C.validate(cfg_of("factorization=k6_6_6"))  # the original's two values spread over M = 3


# ------------------------------------------------------------------------------------------- AR model


def _ar(**kw) -> FactorizedAR:
    torch.manual_seed(0)
    cfg = ARConfig(bits=(3, 5), dim=32, n_inter=2, n_intra=1, n_heads=2, grid=4, num_classes=10, class_dropout=0.0,
                   resid_dropout=0.0, ffn_dropout=0.0, **kw)
    m = FactorizedAR(cfg)
    for h in m.heads:  # non-zero heads so logits depend on everything upstream
        torch.nn.init.normal_(h.weight, 0, 0.02)
    return m


def test_rope_class_row_zero_zeroes_q_and_k_identity_keeps_them():
    x = torch.randn(1, 2, 17, 8)
    zero, ident = rope_table(4, 8, class_row="zero"), rope_table(4, 8, class_row="identity")
    assert zero[0].shape == (17, 4)  # class row + one row per grid position (the original's layout)
    assert torch.equal(apply_rope(x, *zero)[..., 0, :], torch.zeros(1, 2, 8))
    assert torch.equal(apply_rope(x, *ident)[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(apply_rope(x, *zero)[..., 1:, :], apply_rope(x, *ident)[..., 1:, :])
    # row 1 is grid position (0, 0): the identity, so the original's intra slot 1 (M = 2) is not rotated
    torch.testing.assert_close(apply_rope(x, *zero)[..., 1, :], x[..., 1, :])


def test_class_rope_setting_reaches_inter_and_intra_blocks():
    sub, y = torch.randint(0, 8, (2, 16, 2)), torch.tensor([1, 2])
    sub[..., 1] = torch.randint(0, 32, (2, 16))
    a, b = _ar(class_rope="zero", embed_dropout=0.0), _ar(class_rope="identity", embed_dropout=0.0)
    b.load_state_dict(a.state_dict())
    la, lb = a(sub, y), b(sub, y)
    assert not torch.allclose(la[0], lb[0]) and not torch.allclose(la[1], lb[1])
    # zero mode: the intra slot 0 (h_t) has zero q and k, so it attends to itself with score 0 and its output does
    # not depend on the RoPE angles; identity mode gives the same result there (one key, softmax = 1)
    h = torch.randn(5, 32)
    torch.testing.assert_close(a._intra(h, torch.zeros(5, 0, dtype=torch.long))[:, 0],
                               b._intra(h, torch.zeros(5, 0, dtype=torch.long))[:, 0])


def test_intra_embedding_dropout_only_when_asked():
    sub, y = torch.randint(0, 8, (2, 16, 2)), torch.tensor([1, 2])
    for flag, calls in ((False, 1), (True, 2)):  # inter input once; + one per intra sub-token input (M - 1 = 1)
        m = _ar(embed_dropout=0.5, intra_embed_dropout=flag).train()
        seen = []
        m.embed_drop.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
        m(sub, y)
        assert len(seen) == calls, (flag, seen)


def test_weight_decay_on_all_groups_or_matrices_only():
    m = _ar(embed_dropout=0.0)
    n_all = sum(1 for _ in m.parameters())
    (g,) = param_groups(m, 0.05, "all")
    assert len(g["params"]) == n_all and g["weight_decay"] == 0.05
    dec, rest = param_groups(m, 0.05, "matrices")
    assert rest["weight_decay"] == 0.0 and all(p.ndim < 2 for p in rest["params"]) and len(rest["params"]) > 0
    assert len(dec["params"]) + len(rest["params"]) == n_all
    # one AdamW step with zero gradients: only decay moves the weights, and "all" also shrinks the RMSNorm weights
    for mode, moves in (("all", True), ("matrices", False)):
        m = _ar(embed_dropout=0.0)
        opt = torch.optim.AdamW(param_groups(m, 0.05, mode), lr=0.1)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        before = m.norm.weight.detach().clone()
        opt.step()
        assert (not torch.equal(before, m.norm.weight)) == moves


def test_lr_schedule_is_the_originals_formula():
    class T:
        warmup_steps, steps, flat_fraction, final_lr_ratio = 6, 106, 0.05, 0.1
    f = lr_lambda(T)

    def original(it, wp=6, max_it=106, wp0=0.005, wpe=0.1):  # VAR's lr_wd_annealing as the original uses it
        if it < wp:
            return wp0 + (1 - wp0) * it / wp
        pasd = (it - wp) / (max_it - 1 - wp)
        return 1.0 if pasd < 0.05 else wpe + (1 - wpe) * (1 - pasd) / 0.95
    for it in range(106):
        assert f(it) == pytest.approx(original(it), abs=1e-12), it
    assert f(0) == 0.005 and f(105) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- tokenizer


def test_adaptive_group_norm_variance_and_init_options():
    torch.manual_seed(0)
    x, z = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 3, 3)
    for variance, unbiased in (("unbiased", True), ("population", False)):
        agn = AdaptiveGroupNorm(4, 8, variance=variance)
        std = torch.sqrt(z.var(dim=(2, 3), unbiased=unbiased) + 1e-6)
        expected = F.group_norm(x, 8, eps=1e-6) * agn.scale(std)[..., None, None] + agn.shift(
            z.mean(dim=(2, 3)))[..., None, None]
        torch.testing.assert_close(agn(x, z), expected)
    torch.manual_seed(0)
    default = AdaptiveGroupNorm(4, 8)
    assert not torch.equal(default.scale.bias, torch.ones(8))  # PyTorch's Linear init, as in the original
    assert torch.equal(AdaptiveGroupNorm(4, 8, scale_init="one").scale.bias, torch.ones(8))
    with pytest.raises(ValueError, match="1x1 latent"):
        AdaptiveGroupNorm(4, 8)(torch.randn(1, 8, 2, 2), torch.randn(1, 4, 1, 1))


def test_generator_loss_per_image_or_per_patch():
    logits = torch.tensor([[[[4.0, -4.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, -3.0]]]])  # (B=2, 1, 2, 2)
    per_image = F.softplus(-torch.tensor([0.0, 0.0])).mean()  # each image's patch logits average to 0
    torch.testing.assert_close(generator_adv_loss(logits, "image"), per_image)
    torch.testing.assert_close(generator_adv_loss(logits, "patch"), F.softplus(-logits).mean())
    assert generator_adv_loss(logits, "patch") > generator_adv_loss(logits, "image") + 0.1


def test_lfq_codebook_entropy_setting():
    assert LFQ(bits=4).codebook_entropy == "local"
    with pytest.raises(ValueError, match="codebook_entropy"):
        LFQ(bits=4, codebook_entropy="both")


def test_ar_stage_encodes_with_raw_tokenizer_weights_unless_ema_is_asked(tmp_path):
    from magvit2.models.ema import EMA
    from magvit2.stages.resolve import load_tokenizer
    from magvit2.build import build_tokenizer
    base = cfg_of()
    model = build_tokenizer(base)
    ema = EMA(model)
    for t in ema.shadow.values():  # EMA weights that differ from the training weights
        t.add_(0.5)
    path = tmp_path / "tok.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "step": 3}, path)
    raw, raw_id, _ = load_tokenizer(cfg_of(f"tokens.tokenizer={path}"))
    smooth, ema_id, _ = load_tokenizer(cfg_of(f"tokens.tokenizer={path}", "tokens.weights=ema"))
    w = "encoder.conv_in.weight"
    assert torch.equal(raw.state_dict()[w], model.state_dict()[w])
    assert torch.equal(smooth.state_dict()[w], ema.shadow[w])
    assert raw_id != ema_id  # token caches of the two are kept apart


def test_imagefolder_resize_is_torchvision_resize_unless_bicubic_is_asked():
    import numpy as np
    from PIL import Image
    from torchvision import transforms as TV
    from magvit2.data.images import resize_short
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    ref = TV.Resize(16)(img)  # the original's ImagePaths: T.Resize(size) then a crop
    got = resize_short(img, 16, "bilinear")
    assert got.size == ref.size == (22, 16) and np.array_equal(np.asarray(got), np.asarray(ref))
    alt = resize_short(img, 16, "bicubic")
    assert alt.size == (23, 16)  # rounds the longer side where torchvision truncates
    with pytest.raises(ConfigError, match="data.resize"):
        resize_short(img, 16, "nearest")
