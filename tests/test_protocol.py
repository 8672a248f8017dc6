"""metrics.protocol=reference computes every number as the original's evaluation code does (issue 22), checked
against independent implementations on fixed inputs: scikit-image on truncated uint8 images, a direct
F.interpolate, numpy's uint8 cast, scipy's Frechet distance, lpips' own AlexNet. Random weights: these test the
plumbing; no number here is a metric value."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from weights import make_alexnet_weights, make_inception_weights

from magvit2.metrics import GenerationMetrics, ReconstructionMetrics, inception_for_fid, load_lpips
from magvit2.metrics import protocol as P
from magvit2.metrics.grids import as_numpy_uint8
from magvit2.metrics.pretrained import PytorchFidInception


def _pair(n=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    rec = (x + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(-1.2, 1.2)  # out of range too
    return x, rec, torch.randint(0, 4, (n, 4, 4), generator=g)


def _original_psnr_ssim(x, rec):
    """evaluation_image.py: clamp the reconstruction, (v+1)/2, *255 -> uint8 (truncation), /255 float32, then
    scikit-image per image (PSNR's default data range, SSIM with data_range=1 over channels)."""
    def u8(v):
        return (((v.clamp(-1, 1) + 1) / 2) * 255.0).permute(0, 2, 3, 1).to(torch.uint8).numpy().astype(np.float32) / 255
    gt, rs = u8(x), u8(rec)
    psnr = [peak_signal_noise_ratio(g, r) for g, r in zip(gt, rs)]
    ssim = [structural_similarity(r, g, data_range=1.0, channel_axis=-1) for g, r in zip(gt, rs)]
    return float(np.mean(psnr)), float(np.mean(ssim))


def test_reference_psnr_ssim_equal_scikit_image_on_truncated_uint8():
    x, rec, idx = _pair()
    want_psnr, want_ssim = _original_psnr_ssim(x, rec)
    ref, precise = ReconstructionMetrics(4), ReconstructionMetrics(4, protocol="precise")  # reference: the default
    for m in (ref, precise):
        m.update(x, rec, idx)
    r, p = ref.compute(), precise.compute()
    assert r["psnr"] == pytest.approx(want_psnr, rel=1e-6)
    assert r["ssim_skimage"] == pytest.approx(want_ssim, rel=1e-5)
    # the floats give other numbers: the protocol is what makes them equal
    assert abs(p["psnr"] - want_psnr) > 1e-4 and abs(p["ssim_skimage"] - want_ssim) > 1e-5


def test_generated_images_truncate_as_chw_to_pillow():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2
    want = (255 * (x.numpy().transpose(0, 2, 3, 1) + 1) / 2).clip(0, 255).astype(np.uint8)  # sample.py
    assert np.array_equal(as_numpy_uint8(x), want)  # the npz
    assert not np.array_equal(as_numpy_uint8(x, P.get("precise").to_uint8), want)  # rounding: a named alternative

    seen = []

    class Spy(torch.nn.Module):  # what GenerationMetrics hands its Inception
        pool_dim, logits_dim = 2, 2

        def forward(self, u8):
            seen.append(u8.clone())
            return u8.float().mean((2, 3))[:, [0, 1, 2, 0]]

    GenerationMetrics(Spy(), is_splits=1).update_fake(x)
    assert torch.equal(seen[0], torch.from_numpy(want).permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return make_inception_weights(tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-6726825d.pth")


def test_reference_rfid_network_input_is_pytorch_fids(inception_file):
    net = inception_for_fid(inception_file, kind="pytorch_fid", download=False)
    assert isinstance(net, PytorchFidInception)
    x01 = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    got = []
    first_conv = net.net.blocks[0][0]
    first_conv.register_forward_pre_hook(lambda mod, args: got.append(args[0].clone()))
    net(x01)
    want = 2 * F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.equal(got[0], want)


def test_reference_rfid_feeds_pytorch_fid_features_of_the_floats(inception_file):
    net = inception_for_fid(inception_file, kind="pytorch_fid", download=False)
    x, rec, idx = _pair(n=3, size=32, seed=3)
    m = ReconstructionMetrics(4, inception=net)
    m.update(x, rec, idx)
    real, fake = ((v.clamp(-1, 1) + 1) / 2 for v in (x, rec))  # the original feeds the floats, no uint8 step
    fr, ff = net(real).double(), net(fake).double()
    torch.testing.assert_close(m.fid.real_features_sum, fr.sum(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(m.fid.fake_features_sum, ff.sum(0), rtol=1e-6, atol=1e-9)
    assert int(m.fid.real_features_num_samples) == 3


@pytest.mark.slow  # builds a 233 MB AlexNet file
def test_reference_reports_lpips_alex_as_lpips_computes_it(tmp_path):
    import lpips
    alex = load_lpips(make_alexnet_weights(tmp_path / "alexnet-owt-7be5be79.pth"), net="alex", download=False)
    x, rec, idx = _pair(n=3, size=64, seed=4)
    m = ReconstructionMetrics(4, lpips_alex=alex)
    m.update(x, rec, idx)
    direct = alex(x.clamp(-1, 1), rec.clamp(-1, 1)).mean()
    assert isinstance(alex, lpips.LPIPS) and alex.pnet_type == "alex"
    assert m.compute()["lpips_alex"] == pytest.approx(float(direct), rel=1e-6)


def test_unknown_protocol_names_the_setting():
    with pytest.raises(ValueError, match=r"metrics.protocol='orig'.*reference, precise"):
        ReconstructionMetrics(4, protocol="orig")


def test_the_config_offers_exactly_the_protocols():
    from magvit2.config import CHOICES
    assert set(CHOICES["metrics.protocol"].values) == set(P.PROTOCOLS) and P.DEFAULT == "reference"
