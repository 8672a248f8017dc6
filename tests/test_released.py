"""The original's released files (Open-MAGVIT2 Lightning .ckpt) in and out: built here with the original's key
names and shapes (no download), with random weights."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from magvit2 import released
from magvit2.errors import ConfigError
from magvit2.models.ar import ARConfig, FactorizedAR
from magvit2.models.discriminator import PatchDiscriminator
from magvit2.models.ema import EMA
from magvit2.models.tokenizer import Tokenizer
from magvit2.quantizers import LFQ
from magvit2.released import files
from conftest import run_train

ARCH = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)


def tokenizer(seed=0, **kw) -> Tokenizer:
    torch.manual_seed(seed)
    m = Tokenizer(LFQ(bits=18), resolution=32, **{**ARCH, **kw})
    for p in m.parameters():  # away from the init, so a wrong mapping shows in the outputs
        p.data.normal_(0, 0.05)
    return m


def reference_file(path, seed=0, ema=True, disc=True, **kw) -> tuple[dict, Tokenizer]:
    """A VQModel .ckpt as the original writes it (Lightning bookkeeping beside the state_dict)."""
    m = tokenizer(seed, **kw)
    shadow = {k: v + 0.01 for k, v in m.state_dict().items()} if ema else None
    d = PatchDiscriminator(3, 8, 2) if disc else None
    sd = released.export_tokenizer(m.state_dict(), len(m.decoder.levels), shadow, d and d.state_dict())
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)  # the loss's LPIPS copy
    files.write(path, sd, {"epoch": 3, "global_step": 1200, "hyper_parameters": {"lr": 1e-4}})
    return sd, m


def test_original_key_names_for_encoder_decoder_and_ema(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.1.downsample.bias", "encoder.mid_block.1.norm1.weight", "encoder.conv_out.weight",
                "decoder.conv_in.bias", "decoder.mid_block.0.conv1.weight", "decoder.adaptive.2.gamma.weight",
                "decoder.adaptive.0.beta.bias", "decoder.up.2.block.0.conv1.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.up.1.upsample.conv1.weight", "decoder.norm_out.weight", "loss.discriminator.main.0.weight",
                "model_ema.decoderup1upsampleconv1weight", "model_ema.lossdiscriminatormain0weight", "model_ema.decay"]:
        assert key in sd, key
    assert "decoder.up.0.upsample.conv1.weight" not in sd  # the finest level does not upsample
    assert not any(".levels." in k or "shortcut" in k and "nin_shortcut" not in k for k in sd)


def dcr_depth_to_space(x, b=2):
    """The original's depth-to-space (DCR), written from its definition: channel (i*b + j)*C + c -> (c, h*b+i, w*b+j)."""
    n, c4, h, w = x.shape
    return x.view(n, b, b, c4 // b // b, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c4 // b // b, h * b, w * b)


def test_upsampler_permutation_matches_the_originals_depth_to_space(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    ours = tokenizer(seed=1)
    released.into_tokenizer(tmp_path / "t.ckpt", ours, "test", "raw")
    x = torch.randn(2, 64, 4, 4)  # level 1 upsamples 64 channels
    w, b = sd["decoder.up.1.upsample.conv1.weight"], sd["decoder.up.1.upsample.conv1.bias"]
    theirs = dcr_depth_to_space(F.conv2d(x, w, b, padding=1))
    level = ours.decoder.levels[len(ours.decoder.levels) - 1 - 1]
    torch.testing.assert_close(level.up(x), theirs, rtol=0, atol=1e-6)
    assert not torch.equal(F.pixel_shuffle(F.conv2d(x, w, b, padding=1), 2), theirs)  # the permutation is needed


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_every_tensor_is_used_or_named_and_the_forward_runs(tmp_path, weights):
    sd, src = reference_file(tmp_path / "t.ckpt")
    model, info = released.load_tokenizer(tmp_path / "t.ckpt", weights, resolution=32)
    assert info["tensors"] == len(sd)
    assert set(info["ignored"]) == {"the EMA of the discriminator (magvit2 keeps none)",
                                    "the discriminator (not needed to encode or decode)",
                                    "the loss's LPIPS network (magvit2 reads LPIPS from metrics.vgg16_weights)"}
    want = {k: v + 0.01 for k, v in src.state_dict().items()} if weights == "ema" else src.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, q = model(x)
    assert rec.shape == x.shape and q.indices.shape == (2, 8, 8) and torch.isfinite(rec).all()


def test_round_trip_bit_for_bit_both_ways(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    ours, disc = tokenizer(seed=5), PatchDiscriminator(3, 8, 2)
    raw_info = released.into_tokenizer(tmp_path / "t.ckpt", ours, "test", "raw", disc=disc)
    assert raw_info["discriminator"]
    got = released.T.take_tokenizer(released.Consumer(sd, "t", ""), ours, "", None)
    back = released.export_tokenizer(got["raw"], len(ours.decoder.levels), got["ema"], disc.state_dict(),
                                     got["ema_decay"])
    skipped = {k for k in sd if k.startswith(("loss.perceptual_loss.", "model_ema.lossdiscriminator"))}
    assert set(back) == set(sd) - skipped | {k for k in back if k.startswith("model_ema.lossdiscriminator")}
    for k in set(sd) - skipped:
        assert torch.equal(back[k], sd[k]), k
    # and magvit2 -> original -> magvit2
    m, ema = tokenizer(seed=7), None
    ema = EMA(m)
    ref = released.export_tokenizer(m.state_dict(), len(m.decoder.levels), ema.shadow)
    files.write(tmp_path / "x.ckpt", ref)
    m2 = tokenizer(seed=8)
    released.into_tokenizer(tmp_path / "x.ckpt", m2, "test", "raw")
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_unknown_missing_and_misshapen_tensors_give_one_clear_error(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    files.write(tmp_path / "extra.ckpt", {**sd, "decoder.new_layer.weight": torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"tokens.tokenizer=x: .*1 tensors this model has no place for.*new_layer"):
        released.into_tokenizer(tmp_path / "extra.ckpt", tokenizer(), "tokens.tokenizer=x")
    files.write(tmp_path / "missing.ckpt", {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(ConfigError, match=r"1 tensors missing from the file.*decoder.conv_out.bias"):
        released.into_tokenizer(tmp_path / "missing.ckpt", tokenizer(), "tokens.tokenizer=x")
    with pytest.raises(ConfigError, match=r"other shapes.*ch=32, ch_mult=\[1, 2, 2\], num_res_blocks=2, bits=18.*"
                                          r"use a tokenizer config with those values"):
        released.into_tokenizer(tmp_path / "t.ckpt", tokenizer(ch=16), "tokens.tokenizer=x")
    reference_file(tmp_path / "noema.ckpt", ema=False)
    with pytest.raises(ConfigError, match="no EMA copy.*use the raw weights"):
        released.load_tokenizer(tmp_path / "noema.ckpt", "ema")


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_pickled_objects_in_a_released_file_are_read_as_data_never_run(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    evil = RunsCode()
    evil.flag = tmp_path / "ran"
    torch.save({"state_dict": sd, "callbacks": {"ModelCheckpoint": evil}}, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses it...
        torch.load(tmp_path / "evil.ckpt", weights_only=True)
    model, info = released.load_tokenizer(tmp_path / "evil.ckpt", "raw", resolution=32)  # ...we read the tensors
    assert info["tensors"] == len(sd) and not evil.flag.exists()


def ar_model(bits=(6, 12), seed=0, **kw) -> FactorizedAR:
    torch.manual_seed(seed)
    m = FactorizedAR(ARConfig(bits=bits, dim=64, n_inter=2, n_intra=1, n_heads=1, num_classes=4, grid=4, **kw)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m


def test_ar_file_keys_round_trip_and_its_tokenizer(tmp_path):
    m, tok = ar_model(), tokenizer(seed=3)
    sd = released.export_ar(m.state_dict(), m.cfg, tok.state_dict(), len(tok.decoder.levels))
    for key in ["transformer.class_emb.embedding_table.weight", "transformer.pre_emb.weight", "transformer.post_emb.weight",
                "transformer.spatial_blocks.1.attention.wqkv.weight", "transformer.factorized_blocks.0.feed_forward.w3.weight",
                "transformer.norm.weight", "transformer.head.1.weight", "first_stage_model.decoder.up.1.upsample.conv1.weight"]:
        assert key in sd, key
    assert sd["transformer.pre_emb.weight"].shape[0] == 64 and sd["transformer.head.1.weight"].shape[0] == 4096
    files.write(tmp_path / "AR.ckpt", sd)
    loaded, ltok, info = released.load_ar(tmp_path / "AR.ckpt", grid=4, n_heads=1)
    assert info["tensors"] == len(sd) and info["model_size"] is None
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for k, v in tok.state_dict().items():
        assert torch.equal(ltok.state_dict()[k], v), k
    sub, labels = torch.randint(0, 64, (2, 16, 2)), torch.tensor([0, 3])
    sub[..., 1] = torch.randint(0, 4096, (2, 16))
    for a, b in zip(m(sub, labels), loaded(sub, labels)):
        assert torch.equal(a, b)
    assert released.A.size_name(ARConfig(dim=1280, n_inter=36, n_intra=3, n_heads=20)) == "L"


def test_ar_mismatches_name_the_setting(tmp_path):
    m = ar_model()
    files.write(tmp_path / "AR.ckpt", released.export_ar(m.state_dict(), m.cfg))
    with pytest.raises(ConfigError, match=r"model.init_from=f: .*other shapes.*factorization=k6_12"):
        released.into_ar(tmp_path / "AR.ckpt", ar_model(bits=(9, 9)), "model.init_from=f")
    with pytest.raises(ConfigError, match=r"model.class_rope=identity: use model.class_rope=zero"):
        released.into_ar(tmp_path / "AR.ckpt", ar_model(class_rope="identity"), "model.init_from=f")
    with pytest.raises(ValueError, match="exactly 2 sub-tokens.*k6_12"):
        released.export_ar(ar_model(bits=(6, 6, 6)).state_dict(), ar_model(bits=(6, 6, 6)).cfg)
    reference_file(tmp_path / "t.ckpt")
    with pytest.raises(ConfigError, match="not an Open-MAGVIT2 AR checkpoint"):
        released.into_ar(tmp_path / "t.ckpt", m, "model.init_from=f")


@pytest.mark.slow
def test_convert_runs_to_reference_and_train_from_released_files(tmp_path):
    """A tiny tokenizer + AR trained here -> `python -m magvit2.convert` -> the original's layout, which loads back
    bit for bit; then a new AR run starts from those files (tokens.tokenizer=FILE.ckpt, model.init_from=FILE.ckpt)."""
    root, other = tmp_path / "a", tmp_path / "b"
    root.mkdir(), other.mkdir()
    run_train(root, "factorization=k6_12")
    tok_run = next(p for p in (root / "runs" / "tokenizer").iterdir() if p.is_dir())
    ar_run = next(p for p in (root / "runs" / "ar").iterdir() if p.is_dir())
    for run, out in ((tok_run, tmp_path / "tok.ckpt"), (ar_run, tmp_path / "ar.ckpt")):
        p = subprocess.run([sys.executable, "-m", "magvit2.convert", str(run), "--to", "reference", str(out)],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    tok_ckpt = torch.load(tok_run / "checkpoint.pt", weights_only=True)
    tok, _ = released.load_tokenizer(tmp_path / "tok.ckpt", "ema", resolution=16)
    for k, v in tok.state_dict().items():
        assert torch.equal(v, tok_ckpt["ema"]["shadow"][k]), k
    ar_ckpt = torch.load(ar_run / "checkpoint.pt", weights_only=True)
    ar, ar_tok, _ = released.load_ar(tmp_path / "ar.ckpt", grid=4, n_heads=2)
    for k, v in ar.state_dict().items():
        assert torch.equal(v, ar_ckpt["model"][k]), k
    for k, v in ar_tok.state_dict().items():  # the tokenizer the AR was trained on: raw weights (tokens.weights)
        assert torch.equal(v, tok_ckpt["model"][k]), k
    p = run_train(other, f"tokens.tokenizer={tmp_path / 'tok.ckpt'}", f"model.init_from={tmp_path / 'ar.ckpt'}")
    assert "starts from released AR file" in p.stderr + p.stdout
    new_ar = next(p for p in (other / "runs" / "ar").iterdir() if p.is_dir())
    assert not (other / "runs" / "tokenizer").exists()  # the released tokenizer is used, none trained
    bad = subprocess.run([sys.executable, "-m", "magvit2.convert", str(tmp_path / "tok.ckpt"), "--to", "reference",
                          str(tmp_path / "x.ckpt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "already a file of the original's layout" in bad.stderr
    assert (new_ar / "checkpoint.pt").is_file()


def test_init_from_is_checked_before_launch_and_enters_the_signature_only_when_set(tmp_path):
    from omegaconf import open_dict
    from test_recipe import cfg_of

    from magvit2 import config as C
    (tmp_path / "AR.ckpt").write_bytes(b"")
    base, given = cfg_of(), cfg_of(f"model.init_from={tmp_path / 'AR.ckpt'}")
    with pytest.raises(ConfigError, match=r"model.init_from=.*nope.ckpt does not exist"):
        C.validate(cfg_of(f"model.init_from={tmp_path / 'nope.ckpt'}"))
    without = base.copy()
    with open_dict(without):
        del without.model["init_from"]
    assert C.ar_signature(base) == C.ar_signature(without) != C.ar_signature(given)


def test_a_released_tokenizer_renamed_to_pt_still_loads_as_one(tmp_path):
    from test_recipe import cfg_of

    from magvit2.stages.resolve import load_tokenizer
    sd, src = reference_file(tmp_path / "imagenet_256_L.pt")
    cfg = cfg_of("tokenizer.ch=32", "tokenizer.ch_mult=[1,2,2]", "tokenizer.num_res_blocks=2",
                 "tokenizer.resolution=32", f"tokens.tokenizer={tmp_path / 'imagenet_256_L.pt'}")
    model, ident, info = load_tokenizer(cfg)
    assert info["reference"] and ident.endswith(":reference:raw")
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_non_finite_or_integer_weights_are_refused_by_name(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    key = "decoder.conv_out.bias"
    files.write(tmp_path / "nan.ckpt", {**sd, key: torch.full_like(sd[key], float("nan"))})
    with pytest.raises(ConfigError, match=rf"tokens.tokenizer=x: .*nan.ckpt: tensor '{key}' has 3 non-finite"):
        released.into_tokenizer(tmp_path / "nan.ckpt", tokenizer(), "tokens.tokenizer=x")
    files.write(tmp_path / "int.ckpt", {**sd, key: sd[key].round().to(torch.int64)})  # never cast to float
    with pytest.raises(ConfigError, match=rf"1 tensors of another dtype kind.*{key}: file torch.int64 vs model "
                                          r"torch.float32"):
        released.into_tokenizer(tmp_path / "int.ckpt", tokenizer(), "tokens.tokenizer=x")
    files.write(tmp_path / "missing.ckpt", {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ConfigError, match=r"missing from the file.*magvit2.convert RUN --to reference") as e:
        released.into_tokenizer(tmp_path / "missing.ckpt", tokenizer(), "tokens.tokenizer=x")
    assert "use a tokenizer config with those values" not in str(e.value)  # the shapes fit: not an architecture fix


def test_a_nan_tokenizer_never_yields_tokens(tmp_path):
    """NaN weights quantize to bit 0 (every token 0): the encoding refuses non-finite latents, and a run's
    checkpoint.pt with NaN weights is refused by key when an AR run would use it."""
    from magvit2.data.tokens import encode
    m = tokenizer()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert encode(m, x).shape == (2, 8, 8)
    with torch.no_grad():
        m.encoder.conv_in.weight.fill_(float("nan"))
    with pytest.raises(ConfigError, match="non-finite latents.*tokens.tokenizer"):
        encode(m, x)
    from magvit2 import checkpoint
    with pytest.raises(ConfigError, match=r"tokens.tokenizer=run: .*tensor 'encoder.conv_in.weight' has \d+ non-finite"):
        checkpoint.check_finite(m.state_dict(), "tokens.tokenizer=run: checkpoint.pt")


def test_ar_head_count_comes_from_the_paper_table_or_is_said_to_be_assumed(caplog):
    from magvit2.models.ar import PRESETS
    from magvit2.released import ar as A
    for size, p in PRESETS.items():  # shapes only: the paper's sizes on the meta device
        with torch.device("meta"):
            m = FactorizedAR(ARConfig(bits=(6, 12), num_classes=1000, **p))
        got = A.infer_config(A.to_reference(m.state_dict()))
        assert (got.n_heads, A.size_name(got)) == (p["n_heads"], size)
    with torch.device("meta"):
        m = FactorizedAR(ARConfig(bits=(6, 12), dim=128, n_inter=2, n_intra=1, n_heads=4, num_classes=4, grid=4))
    with caplog.at_level("WARNING"):
        assert A.infer_config(A.to_reference(m.state_dict()), n_heads=4).n_heads == 4 and not caplog.records
        assert A.infer_config(A.to_reference(m.state_dict())).n_heads == 2  # 64-wide heads: assumed, and said
    assert "head count is not stored in it; assuming 2" in caplog.text


def test_a_tensor_under_the_lpips_prefix_that_no_lpips_has_is_named(tmp_path):
    sd, _ = reference_file(tmp_path / "t.ckpt")
    files.write(tmp_path / "x.ckpt", {**sd, "loss.perceptual_loss.extra_head.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"no place for.*loss.perceptual_loss.extra_head.weight"):
        released.into_tokenizer(tmp_path / "x.ckpt", tokenizer(), "tokens.tokenizer=x")
    released.into_tokenizer(tmp_path / "t.ckpt", tokenizer(), "tokens.tokenizer=x")  # the LPIPS copy itself: set aside
