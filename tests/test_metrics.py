"""magvit2.metrics: each metric against an independent computation; weights from random-weight files only."""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from skimage.metrics import structural_similarity
from torch import nn

from magvit2.metrics import (
    AdmNpzWriter,
    GenerationMetrics,
    InceptionFeatures,
    Missing,
    ReconstructionMetrics,
    export_adm_npz,
    inception_for_fid,
    load_lpips,
    ssim_uniform,
)

try:
    from tests.weights import make_inception_weights, make_vgg16_weights
except ImportError:  # pytest run without the repo root on sys.path
    from weights import make_inception_weights, make_vgg16_weights


def images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def skimage_ssim(a, b, **kw):
    """skimage SSIM of two [0,1] (3,H,W) tensors, channel last, float64."""
    a, b = (t.permute(1, 2, 0).double().numpy() for t in (a, b))
    return structural_similarity(a, b, channel_axis=-1, data_range=1.0, **kw)


def frechet(f1, f2):
    """Textbook FID with scipy's sqrtm, independent of torchmetrics."""
    f1, f2 = f1.double().numpy(), f2.double().numpy()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class TinyFeatures(nn.Module):
    """Stand-in with InceptionFeatures' interface (uint8 -> pool | logits), small enough for fast tests."""

    pool_dim, logits_dim = 8, 5

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, self.pool_dim, 3)
        self.fc = nn.Linear(self.pool_dim, self.logits_dim)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)
        self.requires_grad_(False)

    def forward(self, x):
        assert x.dtype == torch.uint8
        pool = torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))
        return torch.cat([pool, self.fc(pool)], dim=1)


# ---------------------------------------------------------------- pixel metrics and codebook usage


def test_psnr_is_mean_of_per_image_psnr_on_unit_range():
    x, y = images(3), noisy(images(3), 0.1)
    y[0] = x[0] + 0.02  # very different errors per image: the mean of PSNRs != PSNR of the pooled MSE
    m = ReconstructionMetrics(codebook_size=4, protocol="precise")
    m.update(x, y, torch.zeros(3, 2, 2, dtype=torch.long))
    mse = (((x.clamp(-1, 1) + 1) / 2 - (y.clamp(-1, 1) + 1) / 2) ** 2).double().mean(dim=(1, 2, 3))
    expected = float((10 * torch.log10(1 / mse)).mean())
    assert m.compute()["psnr"] == pytest.approx(expected, abs=1e-4)
    assert expected - 10 * math.log10(1 / float(mse.mean())) > 1  # the two averages really differ here


def test_ssim_uniform_matches_skimage_default_exactly():
    x01, y01 = (images(3, 40) + 1) / 2, (noisy(images(3, 40), 0.2) + 1) / 2
    y01[1] = x01[1] * 0.7 + 0.1  # structured difference
    ours = ssim_uniform(y01, x01)
    for i in range(3):
        assert float(ours[i]) == pytest.approx(skimage_ssim(y01[i], x01[i]), abs=1e-6)
    with pytest.raises(ValueError, match="win_size"):
        ssim_uniform(torch.rand(1, 3, 5, 5), torch.rand(1, 3, 5, 5))


def gaussian_ssim_full_image(a, b):
    """torchmetrics' SSIM written with scipy: 11-tap Gaussian (sigma 1.5, truncate 3.5), population covariance,
    mirror padding (torch's 'reflect'), averaged over the whole image, border included (skimage crops it)."""
    a, b = a.double().numpy(), b.double().numpy()
    f = lambda t: scipy.ndimage.gaussian_filter(t, sigma=(0, 1.5, 1.5), truncate=3.5, mode="mirror")  # noqa: E731
    ua, ub = f(a), f(b)
    va, vb, vab = f(a * a) - ua**2, f(b * b) - ub**2, f(a * b) - ua * ub
    c1, c2 = 0.01**2, 0.03**2
    return float(((2 * ua * ub + c1) * (2 * vab + c2) / ((ua**2 + ub**2 + c1) * (va + vb + c2))).mean())


def test_both_ssims_in_compute_match_independent_computations():
    x, y = images(4, 48), noisy(images(4, 48), 0.15)
    m = ReconstructionMetrics(codebook_size=4, protocol="precise")
    m.update(x[:2], y[:2], torch.zeros(2, 1, 1, dtype=torch.long))
    m.update(x[2:], y[2:], torch.zeros(2, 1, 1, dtype=torch.long))
    out = m.compute()
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    uniform = np.mean([skimage_ssim(y01[i], x01[i]) for i in range(4)])
    gaussian = np.mean([gaussian_ssim_full_image(y01[i], x01[i]) for i in range(4)])
    assert out["ssim_skimage"] == pytest.approx(uniform, abs=1e-6)
    assert out["ssim"] == pytest.approx(gaussian, abs=1e-5)  # torchmetrics computes in float32
    assert abs(out["ssim"] - out["ssim_skimage"]) > 1e-4  # they are different metrics: say which one is reported


def test_utilization_and_perplexity_from_hand_histogram():
    m = ReconstructionMetrics(codebook_size=8)
    x = images(2, 8)
    m.update(x, x, torch.tensor([[[0, 0], [0, 1]], [[1, 2], [3, 3]]]))  # counts 0:3 1:2 2:1 3:2
    m.update(x[:1], x[:1], torch.tensor([[[3, 3], [3, 3]]]))  # code 3 +4 -> counts 3,2,1,6 (12 total)
    out = m.compute()
    p = np.array([3, 2, 1, 6]) / 12
    assert out["utilization"] == pytest.approx(4 / 8)
    assert out["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert out["n_images"] == 3 and out["n_tokens"] == 12
    assert out["psnr"] == math.inf or out["psnr"] > 100  # identical images


def test_codebook_usage_and_n_come_from_every_batch_of_the_pass():
    """Each batch uses its own codes: utilization, perplexity and N from any single batch would all differ."""
    m = ReconstructionMetrics(codebook_size=64)
    x = images(2, 8)
    batches = [torch.arange(16 * b, 16 * b + 8).view(2, 2, 2) for b in range(3)]  # 8 codes each, disjoint
    batches[2] = torch.full((2, 2, 2), 40)  # the last one a single code, 8 times
    for idx in batches:
        m.update(x, x, idx)
    out = m.compute()
    counts = torch.bincount(torch.cat([b.flatten() for b in batches]), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    assert out["utilization"] == pytest.approx(17 / 64) and out["n_tokens"] == 24 and out["n_images"] == 6
    assert out["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert out["perplexity"] > 8  # more than any single batch could give


def test_perplexity_of_uniform_usage_equals_codes_used():
    m = ReconstructionMetrics(codebook_size=16)
    m.update(images(1, 8), images(1, 8), torch.arange(16).view(1, 4, 4))
    out = m.compute()
    assert out["utilization"] == 1.0 and out["perplexity"] == pytest.approx(16.0)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    m = ReconstructionMetrics(codebook_size=4)
    x = images(2, 8)
    with pytest.raises(ValueError, match="indices must lie in"):
        m.update(x, x, torch.full((2, 1, 1), 4))
    with pytest.raises(ValueError, match="x_rec"):
        m.update(x, x[:1], torch.zeros(2, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="indices"):
        m.update(x, x, torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="codebook_size"):
        ReconstructionMetrics(codebook_size=0)
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()


# ---------------------------------------------------------------- Missing when there are no weights


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def missing_reasons(out: dict) -> dict:
    """What the stages log with tracker.log_missing: the reason of every Missing entry."""
    return {k: v.reason for k, v in out.items() if isinstance(v, Missing)}


def test_missing_weights_give_missing_with_the_setting_name(empty_hub):
    lp, inc = load_lpips(None, download=False), inception_for_fid(None, download=False)  # download: test_metric_weights
    assert isinstance(lp, Missing) and "metrics.vgg16_weights" in lp.reason
    assert isinstance(inc, Missing) and "metrics.inception_weights" in inc.reason

    m = ReconstructionMetrics(codebook_size=4, lpips_model=lp, inception=inc)
    x = images(2, 16)
    m.update(x, noisy(x, 0.1), torch.zeros(2, 1, 1, dtype=torch.long))
    out = m.compute()
    assert out["lpips"] == lp and out["rfid"] == inc
    assert isinstance(out["psnr"], float)
    assert missing_reasons(out) == {"lpips": lp.reason, "rfid": inc.reason}

    g = GenerationMetrics(inc)
    g.update_real(x)
    g.update_fake(x)
    gen = g.compute()
    assert all(isinstance(gen[k], Missing) for k in ("fid", "is", "is_std"))
    assert "metrics.inception_weights" in missing_reasons(gen)["fid"]


def test_none_models_are_missing_too():
    out = ReconstructionMetrics(codebook_size=2)
    x = images(2, 8)
    out.update(x, x, torch.zeros(2, 1, 1, dtype=torch.long))
    reasons = missing_reasons(out.compute())
    assert "metrics.vgg16_weights" in reasons["lpips"] and "metrics.inception_weights" in reasons["rfid"]


def test_configured_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="metrics.vgg16_weights"):
        load_lpips(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="metrics.inception_weights"):
        inception_for_fid(tmp_path / "nope.pth")


# ---------------------------------------------------------------- FID / IS plumbing (tiny feature net: fast)


def test_fid_plumbing_matches_textbook_fid_and_vanishes_for_identical_sets():
    x, y = images(40, 16, seed=0), images(40, 16, seed=1) * 0.5 + 0.3
    same, diff = (ReconstructionMetrics(2, inception=TinyFeatures(), protocol="precise") for _ in range(2))
    idx = torch.zeros(40, 1, 1, dtype=torch.long)
    same.update(x, x, idx)
    diff.update(x, y, idx)
    to_u8 = lambda t: ((t.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)  # noqa: E731
    net = TinyFeatures()
    expected = frechet(net(to_u8(x))[:, :8], net(to_u8(y))[:, :8])
    fid_diff, fid_same = diff.compute()["rfid"], same.compute()["rfid"]
    assert fid_diff == pytest.approx(expected, rel=1e-3)
    assert abs(fid_same) < 1e-2 * fid_diff

    g = GenerationMetrics(TinyFeatures(), protocol="precise")  # rounding, as to_u8
    g.update_real(to_u8(x))  # uint8 and [-1,1] float inputs are both accepted
    g.update_fake(y)
    assert g.compute()["fid"] == pytest.approx(expected, rel=1e-3)

    diff.reset()  # a new eval pass starts from nothing
    diff.update(x, x, idx)
    assert abs(diff.compute()["rfid"]) < 1e-2 * fid_diff and diff.compute()["n_images"] == 40
    g.reset()
    assert g.compute()["n_fake"] == 0 and isinstance(g.compute()["fid"], Missing)


def test_inception_score_matches_hand_formula_and_needs_enough_images():
    y = images(12, 16, seed=2)
    g = GenerationMetrics(TinyFeatures(), is_splits=1)
    g.update_fake(y)
    logits = TinyFeatures()(((y + 1) / 2 * 255).round().to(torch.uint8))[:, 8:].double()
    p = logits.softmax(1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()
    out = g.compute()
    assert out["is"] == pytest.approx(float(kl.exp()), rel=1e-5)
    assert isinstance(out["fid"], Missing)  # no real images
    assert isinstance(out["is_std"], Missing)  # one split has no spread

    small = GenerationMetrics(TinyFeatures(), is_splits=10)
    small.update_fake(y)
    assert "is_splits" in small.compute()["is"].reason
    r = ReconstructionMetrics(2, inception=TinyFeatures())
    r.update(y[:1], y[:1], torch.zeros(1, 1, 1, dtype=torch.long))
    assert ">= 2 images" in r.compute()["rfid"].reason


def _prc_by_hand(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaenniemi et al. 2019 in float64 numpy: a point's ball reaches its k-th nearest neighbour of its own set."""
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    radius_real, radius_fake = (np.sort(dist(a, a), 1)[:, k] for a in (real, fake))  # column 0: itself
    precision = (dist(fake, real) <= radius_real[None]).any(1).mean()
    recall = (dist(real, fake) <= radius_fake[None]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_match_the_definition_and_say_when_they_cannot():
    real = images(40, 16, seed=3)
    # half the samples near the reference images, half a brighter mode: precision and recall strictly inside (0, 1)
    fake = torch.cat([noisy(real[:20], 0.05, seed=4), (images(20, 16, seed=5) * 0.5 + 0.5)])
    net, seen = TinyFeatures(), {}
    feats = {n: net(((v + 1) / 2 * 255).round().to(torch.uint8))[:, :8].double().numpy()
             for n, v in (("real", real), ("fake", fake))}
    for k in (1, 3, 5):
        g = GenerationMetrics(net, is_splits=1, precision_recall=True, prc_k=k, protocol="precise")
        for i in range(0, 40, 16):  # batches: the features are concatenated, not averaged
            g.update_real(real[i:i + 16])
            g.update_fake(fake[i:i + 16])
        out = g.compute()
        p, r = _prc_by_hand(feats["fake"], feats["real"], k)
        assert (out["precision"], out["recall"]) == (pytest.approx(p, abs=1e-6), pytest.approx(r, abs=1e-6)), k  # 1/40 apart
        seen[k] = r
        assert 0 < p < 1 and out["n_real_features"] == 40
    assert seen[1] < seen[3] <= seen[5]  # bigger balls reach more reference images
    assert "precision" not in GenerationMetrics(net).compute()  # off by default: no features kept

    few = GenerationMetrics(net, precision_recall=True)
    few.update_real(real[:3])
    few.update_fake(fake)
    assert "more than k = 3 reference images and samples, got 3 and 40" in few.compute()["recall"].reason
    stats_only = GenerationMetrics(net, precision_recall=True)
    from magvit2.evaluate.ar import set_real_stats  # an ADM batch's mu / sigma: FID's sums, no image features
    set_real_stats(stats_only, feats["real"].mean(0), np.cov(feats["real"], rowvar=False))
    stats_only.update_fake(fake)
    assert "precomputed mu / sigma: give its images" in stats_only.compute()["precision"].reason
    with pytest.raises(ValueError, match="prc_k"):
        GenerationMetrics(net, precision_recall=True, prc_k=0)


def test_inception_argument_is_checked():
    with pytest.raises(ValueError, match="inception"):
        GenerationMetrics(nn.Identity())


def _ddp_worker(rank, rendezvous, x, y, idx, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        m = ReconstructionMetrics(16, inception=TinyFeatures())
        g = GenerationMetrics(TinyFeatures(), is_splits=2, precision_recall=True)
        half = slice(rank * 6, (rank + 1) * 6)
        m.update(x[half], y[half], idx[half])
        g.update_real(x[half])
        g.update_fake(y[half])
        queue.put((rank, {**m.compute(), **{f"gen_{k}": v for k, v in g.compute().items()}}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes re-import torch (~40 s on 2 busy cores)
def test_states_are_summed_over_ranks_under_torch_distributed(tmp_path):
    import torch.multiprocessing as mp

    x, y = images(12, 16, seed=0), noisy(images(12, 16, seed=0), 0.3)
    idx = torch.randint(0, 16, (12, 2, 2), generator=torch.Generator().manual_seed(0))
    idx[6:] = idx[6:] % 4  # the ranks see different codes: utilization must come from the summed histogram
    full = ReconstructionMetrics(16, inception=TinyFeatures())
    full.update(x, y, idx)
    gen = GenerationMetrics(TinyFeatures(), is_splits=2, precision_recall=True)
    gen.update_real(x)
    gen.update_fake(y)
    expected = {**full.compute(), **{f"gen_{k}": v for k, v in gen.compute().items()}}

    ctx = mp.get_context("spawn")  # fork would inherit OpenMP state and deadlock
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, tmp_path / "rdv", x, y, idx, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        for key in ("psnr", "ssim", "ssim_skimage", "utilization", "perplexity", "n_images", "n_tokens", "rfid",
                    "gen_fid", "gen_precision", "gen_recall", "gen_n_real_features"):  # features: concatenated
            assert results[rank][key] == pytest.approx(expected[key], rel=1e-4), (rank, key)
        assert isinstance(results[rank]["lpips"], Missing)


# ---------------------------------------------------------------- real lpips / torch-fidelity code paths


@pytest.fixture(scope="module")
def weight_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def vgg_file(weight_dir):
    return make_vgg16_weights(weight_dir / "vgg16-397923af.pth")


@pytest.fixture(scope="module")
def inception_file(weight_dir):
    return make_inception_weights(weight_dir / "pt_inception-2015-12-05-6726825d.pth")


@pytest.mark.slow  # building and reading a 553 MB VGG16 file
def test_lpips_loads_the_vgg_file_and_behaves(vgg_file, empty_hub):
    model = load_lpips(vgg_file)
    state = torch.load(vgg_file, weights_only=True, mmap=True)
    trunk = model.net.state_dict()
    assert len(trunk) == 26  # 13 convs of VGG16 up to relu5_3
    for key, value in trunk.items():
        assert torch.equal(value, state["features." + key.split(".", 1)[1]]), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    x, y = images(2, 32), noisy(images(2, 32), 0.3)
    m = ReconstructionMetrics(2, lpips_model=model)
    m.update(x, x, torch.zeros(2, 1, 1, dtype=torch.long))
    assert m.compute()["lpips"] == pytest.approx(0.0, abs=1e-7)
    m2 = ReconstructionMetrics(2, lpips_model=model)
    m2.update(x, y, torch.zeros(2, 1, 1, dtype=torch.long))
    assert m2.compute()["lpips"] > 1e-4
    assert m2.compute()["lpips"] == pytest.approx(float(model(x, y).mean()), rel=1e-5)

    # Without a configured path the file is found where a torch.hub download would have put it.
    empty_hub.mkdir(parents=True)
    os.symlink(vgg_file, empty_hub / "vgg16-397923af.pth")
    assert torch.equal(getattr(load_lpips(None).net.slice5, "28").weight, state["features.28.weight"])


def test_lpips_rejects_a_file_of_another_layout(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision vgg state_dict"):
        load_lpips(bad)


@pytest.mark.slow  # CPU: ~1 s per image through Inception, tens of s per 2048x2048 eigvals
def test_rfid_and_is_through_torch_fidelity_inception(inception_file, empty_hub):
    net = inception_for_fid(inception_file)
    assert isinstance(net, InceptionFeatures)
    state = torch.load(inception_file, weights_only=False)
    loaded = net.net.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    net.train()
    assert not net.training  # BatchNorm stays in eval mode

    x, y = images(4, 32, seed=0), images(4, 32, seed=1)
    same, diff = ReconstructionMetrics(2, inception=net), ReconstructionMetrics(2, inception=net)
    idx = torch.zeros(4, 1, 1, dtype=torch.long)
    same.update(x, x, idx)
    diff.update(x, y, idx)
    fid_same, fid_diff = same.compute()["rfid"], diff.compute()["rfid"]
    assert fid_diff > 0 and abs(fid_same) < 1e-2 * fid_diff

    g = GenerationMetrics(net, is_splits=2)
    g.update_fake(y)  # no reference images: FID is Missing, IS still computed (each 2048-d FID costs ~20-70 s here)
    out = g.compute()
    assert isinstance(out["fid"], Missing)
    assert 1.0 <= out["is"] < 1008 and out["is_std"] >= 0

    empty_hub.mkdir(parents=True)
    os.symlink(inception_file, empty_hub / "pt_inception-2015-12-05-6726825d.pth")
    assert isinstance(inception_for_fid(None), InceptionFeatures)


def test_inception_rejects_a_file_of_another_layout(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a pt_inception"):
        inception_for_fid(bad)


# ---------------------------------------------------------------- ADM evaluator export


def test_export_adm_npz_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "samples"  # no .npz suffix: numpy must not add one
    export_adm_npz(imgs, path)
    with np.load(path) as f:
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_0"], imgs)
    assert os.listdir(tmp_path / "sub") == ["samples"]  # no temp file left behind
    with pytest.raises(ValueError, match="images_uint8"):
        export_adm_npz(imgs.astype(np.float32), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="images_uint8"):
        export_adm_npz(imgs.transpose(0, 3, 1, 2), tmp_path / "x.npz")


def test_streamed_adm_npz_is_the_savez_file_and_appears_only_whole(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (9, 6, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "savez.npz", arr_0=imgs)
    with AdmNpzWriter(tmp_path / "streamed.npz", imgs.shape) as w:
        for part in np.split(imgs, [2, 7]):  # chunks of 2, 5 and 2 images
            w.write(part)
    # byte for byte what np.savez writes (zip entry name, stored, npy header), apart from the zip entry's timestamp
    a, b = (zipfile.ZipFile(tmp_path / n) for n in ("savez.npz", "streamed.npz"))
    assert [(i.filename, i.compress_type) for i in a.infolist()] == [(i.filename, i.compress_type)
                                                                     for i in b.infolist()]
    assert a.read("arr_0.npy") == b.read("arr_0.npy")
    with np.load(tmp_path / "streamed.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], imgs)
    # too few images, a chunk of another size, an error in the block: no file, no temp file
    for chunks, exc, match in (([imgs[:8]], ValueError, "8 images written, 9 declared"),
                               ([imgs[:, :3]], ValueError, r"does not fit the declared \(9, 6, 4, 3\)"),
                               ([imgs, imgs[:1]], ValueError, "after 9 images"),
                               ([imgs[:4], KeyboardInterrupt], KeyboardInterrupt, "")):
        with pytest.raises(exc, match=match):
            with AdmNpzWriter(tmp_path / "bad.npz", imgs.shape) as w:
                for c in chunks:
                    if c is KeyboardInterrupt:
                        raise KeyboardInterrupt
                    w.write(c)
        assert sorted(os.listdir(tmp_path)) == ["savez.npz", "streamed.npz"], chunks
