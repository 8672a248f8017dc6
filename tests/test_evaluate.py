"""`python -m magvit2.evaluate`: both subcommands end to end on tiny runs and the embedded photos, the sampling split
over 2 processes (bit for bit a 1-process run), resuming, FID against a reference batch, and the one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, run_train
from magvit2.evaluate.__main__ import main

try:
    from tests.weights import make_inception_weights
except ImportError:  # pytest run without the repo root on sys.path
    from weights import make_inception_weights

PER_CLASS, CLASSES = 5, 4  # 20 samples: IS needs >= 2 x 10 splits
AR_ARGS = ["--per-class", str(PER_CLASS), "--shard-size", "6", "--batch-size", "4", "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny tokenizer run and the tiny AR run on it (16px crops, 4x4 tokens, 4 classes)."""
    root = tmp_path_factory.mktemp("runs")
    run_train(root)
    return {stage: next((root / "runs" / stage).glob("*/checkpoint.pt")).parent for stage in ("tokenizer", "ar")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An image folder in ImageNet val's layout: 3 crops of each embedded photo in <photo>/."""
    from magvit2.data.images import load_photo
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img, d = load_photo(name), root / name
        d.mkdir()
        side = min(img.size) // 2
        for i in range(3):
            img.crop((40 * i, 20 * i, 40 * i + side, 20 * i + side + 7 * i)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    return make_inception_weights(tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth")


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MAGVIT2_ROOT", "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)


def _mlflow_run(root: Path, run_id: str):
    import mlflow
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)


def test_tokenizer_end_to_end(runs, photos, inception, tmp_path, capsys):
    # 32px inputs to a tokenizer trained at 16px: 8x8 tokens (fully convolutional, as the 32x32-token row)
    assert main(["tokenizer", str(runs["tokenizer"]), "--data", str(photos), "--resolution", "32", "--num-images",
                 "6", "--workers", "0", "--inception-weights", inception, "--no-download", "--root",
                 str(tmp_path)]) == 0
    out = first_out = capsys.readouterr().out
    assert "SSIM: scikit-image's 7x7 uniform window: the reference's" in out  # the report's labels, and what they are
    assert "384 tokens" in out and "6 images" in out and "utilization (%)" in out
    assert "LPIPS missing: " in out and "--vgg16-weights" in out  # no weights: reported, never a number
    (res_path,) = (tmp_path / "evaluate" / "tokenizer").glob("*/results.json")
    res = json.loads(res_path.read_text())
    m = res["metrics"]
    assert m["eval/n_images"] == 6 and m["eval/n_tokens"] == 6 * 8 * 8
    assert np.isfinite(m["eval/rfid"]) and m["eval/rfid"] >= 0 and 0 < m["eval/utilization"] <= 1
    assert 0 < m["eval/ssim_skimage"] <= 1 and m["eval/psnr"] > 0 and m["eval/perplexity"] >= 1
    assert set(res["missing"]) == {"eval/lpips", "eval/lpips_alex"} and res["reference"] is False
    assert res["settings"]["protocol"] == "reference"  # the default: the original's arithmetic
    assert (res_path.parent / "recon_grid.png").is_file()
    run = _mlflow_run(tmp_path, res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["magvit2.reference"] == "false"
    assert run.data.metrics["eval/rfid"] == pytest.approx(m["eval/rfid"])
    assert "magvit2.missing.eval/lpips" in run.data.tags

    # its checkpoint.pt names the same run; raw weights, at its own 16 px by default (said), another one noted
    assert main(["tokenizer", str(runs["tokenizer"] / "checkpoint.pt"), "--data", str(photos),
                 "--weights", "raw", "--workers", "0", "--no-download", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4x4 tokens" in out and "resolution 16 px: the tokenizer's own" in out
    assert "not the tokenizer's training resolution 16 px" in first_out  # the 32 px evaluation above said so


@pytest.mark.slow  # two processes start up
def test_tokenizer_split_over_two_processes_gives_the_one_process_metrics(runs, photos, tmp_path):
    from mlflow_server import free_port
    # no Inception here (rFID's states sum over ranks like the others: tests/test_metrics.py, with a small network)
    args = ["tokenizer", str(runs["tokenizer"]), "--data", str(photos), "--resolution", "32", "--num-images", "7",
            "--workers", "0", "--no-download"]
    assert main([*args, "--root", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "magvit2.evaluate", *args, "--root", str(tmp_path / "two")],
                              cwd=REPO, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "rank 1 of 2 (RANK/WORLD_SIZE): 3 of 7 images" in logs[1]
    (one,), (two,) = ((tmp_path / k / "evaluate" / "tokenizer").glob("*/results.json") for k in ("one", "two"))
    one, two = (json.loads(p.read_text())["metrics"] for p in (one, two))
    assert two["eval/n_images"] == 7 and two["eval/n_tokens"] == 7 * 8 * 8  # both ranks' images, counted once
    assert two.keys() == one.keys() and two == {k: pytest.approx(v, rel=1e-5) for k, v in one.items()}
    assert {"eval/psnr", "eval/ssim", "eval/ssim_skimage", "eval/utilization", "eval/perplexity"} <= two.keys()


def test_more_processes_than_images_is_one_error_line(runs, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")  # rank 0 of 8: refused before it waits for the 7 others
    assert main(["tokenizer", str(runs["tokenizer"]), "--data", str(photos), "--num-images", "7", "--workers", "0",
                 "--no-download", "--root", str(tmp_path)]) == 2
    assert "8 processes (RANK/WORLD_SIZE) for 7 images: launch at most 7" in capsys.readouterr().err


def _ar(runs, out: Path, *extra: str) -> list[str]:
    return ["ar", str(runs["ar"]), *AR_ARGS, "--no-download", "--out", str(out), "--root", str(out.parent), *extra]


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory) -> Path:
    """The 1-process reference run's output folder (no Inception: FID / IS missing, the samples are the point)."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(_ar(runs, out)) == 0
    return out


def _samples(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["arr_0"]


@pytest.mark.slow  # two processes start up
def test_two_process_split_equals_one_process(runs, one_process, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "magvit2.evaluate", *_ar(runs, out)], cwd=REPO,
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert sum("the last rank to finish merges" in log for log in logs) == 1  # the first to finish leaves the merge
    assert sum("rank 1 of 2 (RANK/WORLD_SIZE): 2 of 4 shards" in log for log in logs) == 1
    one = _samples(one_process)
    assert one.shape == (PER_CLASS * CLASSES, 16, 16, 3) and one.dtype == np.uint8
    assert np.array_equal(_samples(out), one)  # bit for bit
    assert len(list(out.glob("shard-*.npz"))) == 4
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"]["eval/n_samples"] == 20 and "eval/fid" in res["missing"]


def test_batch_size_changes_no_draw(runs, one_process, tmp_path):
    # per-item seeds: another batch size draws the same tokens; only the batched decoder's float rounding differs
    assert main(_ar(runs, tmp_path / "bs", "--batch-size", "3")) == 0
    diff = np.abs(_samples(tmp_path / "bs").astype(int) - _samples(one_process).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_resume_skips_finished_shards(runs, one_process, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(one_process, out)
    for name in ("samples.npz", "results.json", "shard-0000006-0000012.npz"):
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    assert main(_ar(runs, out)) == 0
    assert "3 drawn already" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz") if p.name in kept} == kept
    assert (out / "shard-0000006-0000012.npz").is_file()
    assert np.array_equal(_samples(out), _samples(one_process))
    # --precision-recall: evaluated again (without an Inception: missing, with the reason), nothing redrawn; then
    # the same command without it finds those results
    assert main(_ar(runs, out, "--precision-recall")) == 0
    assert "already evaluated" not in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert {"eval/precision", "eval/recall"} <= set(res["missing"])
    assert main(_ar(runs, out)) == 0
    assert "already evaluated" in capsys.readouterr().out
    # other settings in the same folder: refused, naming them
    assert main(_ar(runs, out, "--seed", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (seed" in err[0], err


def test_a_foreign_shard_is_named_and_no_samples_npz_is_left(runs, one_process, tmp_path, capsys):
    out = tmp_path / "foreign"
    shutil.copytree(one_process, out)
    for name in ("samples.npz", "results.json"):
        (out / name).unlink()
    bad = out / "shard-0000006-0000012.npz"
    with np.load(bad) as z:
        np.savez(bad, images=z["images"][:, :8])  # half the image height: a file from another run
    assert main(_ar(runs, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # less the bars
    assert len(err) == 1 and f"{bad} holds images (6, 8, 16, 3), not (6, 16, 16, 3): delete it" in err[0], err
    assert not (out / "samples.npz").exists() and not list(out.glob(".tmp-*"))  # the merge never half-writes


@pytest.mark.slow  # Inception on CPU
def test_fid_and_is_against_a_reference_batch(runs, one_process, inception, tmp_path, capsys):
    out = tmp_path / "fid"
    shutil.copytree(one_process, out)  # same settings, another reference: evaluated again, nothing redrawn
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=_samples(one_process))  # the samples themselves: FID ~ 0
    assert main([*_ar(runs, out, "--ref-batch", str(ref)), "--inception-weights", inception,
                 "--precision-recall"]) == 0
    out_text = capsys.readouterr().out
    assert "0 drawn already" not in out_text and "20 samples vs 20 reference" in out_text
    assert "recall: k = 3 nearest neighbours" in out_text
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert abs(m["eval/fid"]) < 1e-2 and np.isfinite(m["eval/is"]) and m["eval/n_real"] == 20
    assert m["eval/precision"] == m["eval/recall"] == 1.0  # every sample is a reference image: inside its own ball
    assert res["missing"] == {}
    run = _mlflow_run(out.parent, res["mlflow_run_id"])
    assert run.data.tags["magvit2.reference"] == "false"
    assert run.data.tags["magvit2.samples_npz"] == str(out / "samples.npz")
    assert run.data.params["per_class"] == str(PER_CLASS) and run.data.metrics["eval/n_samples"] == 20


class _TinyInception(nn.Module):
    """Stands in for InceptionFeatures: 8 pool features and 4 logits from the pixel statistics."""
    pool_dim, logits_dim = 8, 4

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)

    def forward(self, x):
        x = x.float() / 255
        return self.proj(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1))


def test_precomputed_reference_statistics_give_the_images_fid():
    from magvit2.evaluate.ar import set_real_stats
    from magvit2.metrics import GenerationMetrics
    torch.manual_seed(0)
    net = _TinyInception().requires_grad_(False)
    real = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    fake = torch.randint(0, 200, (25, 3, 8, 8), dtype=torch.uint8)
    by_images, by_stats = GenerationMetrics(net, is_splits=1), GenerationMetrics(net, is_splits=1)
    by_images.update_real(real)
    f = net(real)[:, :8].double()
    set_real_stats(by_stats, f.mean(0).numpy(), torch.cov(f.T).numpy())
    for g in (by_images, by_stats):
        g.update_fake(fake)
    assert by_stats.compute()["fid"] == pytest.approx(by_images.compute()["fid"], rel=1e-6)


def _frechet(a: np.ndarray, b_mu: np.ndarray, b_sigma: np.ndarray) -> float:
    """The Frechet distance by its definition (numpy + scipy), independent of torchmetrics."""
    import scipy.linalg
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma @ b_sigma).real
    return float(((mu - b_mu) ** 2).sum() + np.trace(sigma + b_sigma - 2 * covmean))


def test_adm_batch_fid_from_its_images_and_a_second_from_its_stats(tmp_path):
    """An ADM batch with images: FID from those images through the samples' own Inception (one implementation per
    number), and beside it the FID against the batch's precomputed mu / sigma; both equal scipy's Frechet
    distance of the same features."""
    from argparse import Namespace

    from magvit2.evaluate import ar
    from magvit2.metrics import GenerationMetrics
    torch.manual_seed(0)
    net = _TinyInception().requires_grad_(False)
    real = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    near = (real[:12].int() + torch.randint(-3, 4, (12, 3, 8, 8))).clamp(0, 255).to(torch.uint8)
    fake = torch.cat([near, torch.randint(0, 100, (13, 3, 8, 8), dtype=torch.uint8)])  # half near, half a dark mode
    direct = GenerationMetrics(net, is_splits=1, precision_recall=True)  # the images themselves
    direct.update_real(real)
    fr, ff = net(real)[:, :8].double().numpy(), net(fake)[:, :8].double().numpy()
    mu, sigma = fr.mean(0) + 0.5, np.cov(fr, rowvar=False) * 1.5  # stats another pipeline computed: they differ
    batch = tmp_path / "VIRTUAL_batch.npz"  # the ADM layout: images and their statistics
    np.savez(batch, arr_0=real.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma)
    g = GenerationMetrics(net, is_splits=1, precision_recall=True)
    n_real, adm = ar.add_reference(g, Namespace(ref_batch=batch, ref_dir=None), 8, bs=7)  # 5 batches, one short
    assert n_real is None and adm is not None
    for m in (direct, g):
        m.update_fake(fake)
    want, got = direct.compute(), g.compute()
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-6) and got["n_real"] == 30  # from the images
    assert got["fid"] == pytest.approx(_frechet(ff, fr.mean(0), np.cov(fr, rowvar=False)), rel=1e-5)
    assert ar.fid_against_stats(g, *adm) == pytest.approx(_frechet(ff, mu, sigma), rel=1e-5)
    assert (got["precision"], got["recall"]) == (want["precision"], want["recall"])
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)  # no images: the stats are all there is
    g2 = GenerationMetrics(net, is_splits=1)
    n_real, adm = ar.add_reference(g2, Namespace(ref_batch=tmp_path / "stats_only.npz", ref_dir=None), 8, bs=7)
    assert adm is None and "count is not stored" in n_real.reason
    g2.update_fake(fake)
    assert g2.compute()["fid"] == pytest.approx(_frechet(ff, mu, sigma), rel=1e-5)


@pytest.mark.parametrize("args,needle", [
    (["tokenizer", "{nowhere}", "--data", "{photos}"], "no such file or folder"),
    (["tokenizer", "{tokenizer}", "--data", "{nowhere}"], "--data"),
    (["tokenizer", "{tokenizer}", "--data", "{photos}", "--resolution", "18"], "not divisible by the tokenizer's "
     "downsampling 4"),
    (["tokenizer", "{ar}", "--data", "{photos}"], "a run of stage ar; give a tokenizer run"),
    (["tokenizer", "{photos}", "--data", "{photos}"], "not a run dir"),
    (["tokenizer", "{tokenizer}", "--data", "{photos}", "--inception-weights", "{nowhere}"], "--inception-weights"),
    (["ar", "{tokenizer}"], "a run of stage tokenizer; give an AR run"),
    (["ar", "{ar}", "--per-class", "0"], "--per-class 0 must be >= 1"),
    (["ar", "{ar}", "--num-classes", "5"], "--num-classes 5: the model has 4 classes"),
    (["ar", "{ar}", "--ref-batch", "{nowhere}"], "--ref-batch"),
    (["ar", "{ar}", "--ref-batch", "{notref}"], "notref.npz: neither mu/sigma nor arr_0 images in it (it holds foo)"),
    (["ar", "{ar}", "--ref-batch", "{garbage}"], "garbage.ckpt: not an npz file"),
    (["ar", "{garbage}"], "garbage.ckpt"),
])
def test_bad_input_is_one_error_line(runs, photos, tmp_path, capsys, args, needle):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    np.savez(tmp_path / "notref.npz", foo=np.zeros(3))  # checked before any sampling: nothing is drawn
    fill = {"nowhere": str(tmp_path / "nowhere"), "photos": str(photos), "garbage": str(garbage),
            "notref": str(tmp_path / "notref.npz"),
            "tokenizer": str(runs["tokenizer"]), "ar": str(runs["ar"])}
    assert main([a.format(**fill) for a in args] + ["--root", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not list(tmp_path.glob("evaluate/ar/*/shard-*"))  # refused before sampling


@pytest.fixture(scope="module")
def released_files(runs, tmp_path_factory) -> dict[str, Path]:
    """The tiny runs written in the original's layout (python -m magvit2.convert): random-free, but not real weights."""
    from magvit2.convert import convert
    d = tmp_path_factory.mktemp("released")
    for stage in ("tokenizer", "ar"):
        convert(runs[stage], d / f"{stage}.ckpt")
    return {stage: d / f"{stage}.ckpt" for stage in ("tokenizer", "ar")}


def test_a_released_tokenizer_file_gives_the_metrics_of_its_run(runs, released_files, photos, tmp_path, capsys):
    common = ["--data", str(photos), "--resolution", "16", "--workers", "0", "--no-download"]
    results = {}
    for name, src in (("run", runs["tokenizer"]), ("file", released_files["tokenizer"])):
        assert main(["tokenizer", str(src), *common, "--root", str(tmp_path / name)]) == 0
        (res,) = (tmp_path / name / "evaluate" / "tokenizer").glob("*/results.json")
        results[name] = json.loads(res.read_text())
    assert results["file"]["reference"] is True and results["run"]["reference"] is False
    for k in ("eval/psnr", "eval/ssim_skimage", "eval/utilization", "eval/perplexity", "eval/n_images"):
        assert results["file"]["metrics"][k] == results["run"]["metrics"][k], k  # the EMA weights, bit for bit
    run = _mlflow_run(tmp_path / "file", results["file"]["mlflow_run_id"])
    assert run.data.tags["magvit2.reference"] == "true"

    # the report shows it as a reference row (its own table, next to the members' table)
    from magvit2.results import load_runs, reference_table
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    refs = load_runs(tracking_uri=uri, reference=True)
    assert list(refs["run_name"]) == ["evaluate-tokenizer-tokenizer"]
    table = reference_table(refs, "tokenizer")
    assert list(table.index) == [("tokenizer", "4x4", str(photos))]
    assert table.iloc[0]["N img"] == results["file"]["metrics"]["eval/n_images"]
    assert load_runs(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}", reference=True).empty
    p = subprocess.run([sys.executable, "-m", "magvit2.report", "--experiment", "magvit2-evaluate", "--tracking-uri",
                        uri, "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### Reference rows: released tokenizers" in md and "| tokenizer | 4x4 |" in md


def test_a_released_ar_file_samples_with_the_tokenizer_it_carries(released_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["ar", str(released_files["ar"]), "--per-class", "1", "--num-classes", "2", "--workers", "0",
            "--no-download", "--out", str(out), "--root", str(tmp_path)]
    assert main(args) == 2 and "--cfg-scale and --temperature" in capsys.readouterr().err  # no size: no defaults
    assert main(args + ["--cfg-scale", "1.5", "--temperature", "1.0"]) == 0
    samples = _samples(out)
    assert samples.shape == (2, 64, 64, 3) and samples.dtype == np.uint8  # grid 16 (the released AR_256 files) x 4
    assert json.loads((out / "results.json").read_text())["reference"] is True
