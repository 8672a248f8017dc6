"""On CUDA, in bf16, with random weights: every stage runs, its losses are finite, and a killed run resumes.

Skipped without CUDA. The first group needs only torch + einops (a bare GPU image runs it); the second runs the
real `python -m magvit2.train` pipeline (tokenizer with the GAN and LPIPS on, token extraction, the AR, sampling,
evaluation) and needs the whole stack. Numbers from random weights are never results: only finiteness, devices and
the resume path are checked.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda"


def test_models_train_step_in_bf16_on_cuda():
    from magvit2.models.ar import ARConfig, FactorizedAR
    from magvit2.models.discriminator import LeCAM, PatchDiscriminator, generator_adv_loss, hinge_d_loss
    from magvit2.models.ema import EMA
    from magvit2.models.tokenizer import Tokenizer
    from magvit2.quantizers import LFQ

    tok = Tokenizer(LFQ(bits=18), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64).to(DEV)
    disc, lecam = PatchDiscriminator(3, ndf=16, n_layers=2).to(DEV), LeCAM().to(DEV)
    ema = EMA(tok)  # built from the model on the GPU: its shadow lives there too
    assert all(t.device.type == "cuda" for t in ema.shadow.values())
    x = torch.rand(4, 3, 64, 64, device=DEV) * 2 - 1
    with torch.autocast(DEV, dtype=torch.bfloat16):
        x_rec, q = tok(x)
        loss = (x_rec.float() - x).abs().mean() + q.loss + 0.1 * generator_adv_loss(disc(x_rec))
        d_loss = hinge_d_loss(disc(x).float(), disc(x_rec.detach()).float())
        d_loss = d_loss + 0.01 * lecam(disc(x).float(), disc(x_rec.detach()).float())
    (loss + d_loss).backward()
    ema.update(tok)
    assert math.isfinite(loss.item()) and math.isfinite(d_loss.item())
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.grad is not None)

    ar = FactorizedAR(ARConfig(bits=(6, 12), dim=128, n_inter=2, n_intra=1, n_heads=4, grid=4, num_classes=10)).to(DEV)
    sub = torch.stack([torch.randint(0, 64, (4, 16)), torch.randint(0, 4096, (4, 16))], -1).to(DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        ar_loss, _ = ar.loss(sub, torch.arange(4, device=DEV))
    ar_loss.backward()
    assert math.isfinite(ar_loss.item())
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = ar.generate(torch.arange(3, device=DEV), cfg_scale=(1.9, 2.0),
                          generator=torch.Generator(DEV).manual_seed(0))
    assert out.shape == (3, 16, 2) and out.device.type == "cuda"


@pytest.mark.slow
def test_pipeline_on_cuda_bf16_with_gan_lpips_and_resume(tmp_path):
    pytest.importorskip("hydra")
    pytest.importorskip("mlflow")
    from conftest import kill_after_first_checkpoint, load_ckpt, run_train
    from weights import make_inception_weights, make_vgg16_weights

    w = tmp_path / "weights"
    w.mkdir()
    ov = ["trainer.tokenizer.precision=bf16", "trainer.ar.precision=bf16", "tokenizer.loss.perceptual_weight=1.0",
          f"metrics.vgg16_weights={make_vgg16_weights(w / 'vgg16.pth')}",
          f"metrics.inception_weights={make_inception_weights(w / 'inception.pth')}"]
    root = tmp_path / "run"
    root.mkdir()
    # the tokenizer is killed once its first checkpoint is on disk, then started again and finished by the AR run
    kill_after_first_checkpoint(root, "tokenizer", "stage=tokenizer", *ov)
    p = run_train(root, *ov)  # stage=ar: resumes the tokenizer, extracts tokens, trains the AR, samples, evaluates
    assert "resuming tokenizer" in p.stderr + p.stdout
    for stage in ("tokenizer", "ar"):
        (rd,) = [d for d in (root / "runs" / stage).iterdir() if d.is_dir()]
        st = json.loads((rd / "status.json").read_text())
        assert st["state"] == "finished" and st.get("device", "").startswith("cuda"), st
        assert all(math.isfinite(v) for k, v in st["metrics"].items() if k.startswith("train/")), st["metrics"]
        ck = load_ckpt(rd)
        assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())
    res = json.loads((rd / "results.json").read_text())
    assert math.isfinite(res["val/loss"]) and "eval/fid" in res  # computed, from random weights: not a result
