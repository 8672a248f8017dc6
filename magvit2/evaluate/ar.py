"""`python -m magvit2.evaluate ar`: per_class x num_classes samples (the paper's gFID: 50 x 1000) with the model's
sampling settings, split over the processes of a launch (shards.py), merged into one ADM-evaluator npz, and FID / IS
against a reference: an ADM reference batch (its precomputed mu / sigma, else its images) or an image folder."""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from magvit2 import metrics as M
from magvit2.metrics import protocol as P
from magvit2.config import subtoken_values
from magvit2.errors import ConfigError
from magvit2.evaluate import common, shards
from magvit2.evaluate.sources import load_ar_source, sampling_settings
from magvit2.sampling_flags import add_sampling_args, check_args

log = logging.getLogger(__name__)


def add_args(ap) -> None:
    ap.add_argument("source", help="an AR run dir, its checkpoint.pt, or a released Open-MAGVIT2 AR .ckpt")
    ap.add_argument("--tokenizer", default=None, help="tokenizer SOURCE to decode with (default: the AR's own)")
    ap.add_argument("--tokenizer-weights", default=None, choices=("raw", "ema"),
                    help="default: the AR run's tokens.weights (raw for --tokenizer with a released AR file)")
    ap.add_argument("--per-class", type=int, default=50, help="samples per class (default 50, the paper's)")
    ap.add_argument("--num-classes", type=int, default=None, help="the first N classes (default: all of the model's)")
    add_sampling_args(ap)
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--ref-batch", type=Path, default=None, help="ADM reference batch npz (e.g. "
                     "VIRTUAL_imagenet256_labeled.npz): its mu/sigma if present, else its arr_0 images")
    ref.add_argument("--ref-dir", type=Path, default=None, help="reference image folder (resized + center-cropped to "
                     "the samples' size)")
    ap.add_argument("--precision-recall", action="store_true", help="also precision / recall (k = 3 nearest "
                    "neighbours on the Inception pool features, as the ADM evaluator): fidelity and diversity. Keeps "
                    "every image's features; reads the reference's images (an ADM batch's arr_0 too)")
    ap.add_argument("--shard-size", type=int, default=250, help="samples per shard file, the unit of work split over "
                    "ranks and of resuming (default 250)")
    common.add_common_args(ap)


def check(a) -> None:
    bad = check_args(a)
    for flag, v in (("--num-classes", a.num_classes), ("--shard-size", a.shard_size)):
        if bad is None and v is not None and v < 1:
            bad = f"{flag} {v} must be >= 1"
    for flag, p in (("--ref-batch", a.ref_batch), ("--ref-dir", a.ref_dir)):
        if bad is None and p is not None and not (p.is_file() if flag == "--ref-batch" else p.is_dir()):
            bad = f"{flag} {p}: no such {'file' if flag == '--ref-batch' else 'folder'}"
    if bad:
        raise ConfigError(bad)
    common.check_weight_files(a)
    if a.ref_batch is not None:  # a file that is no reference batch fails now, not after all the sampling
        check_ref_batch(a.ref_batch)


def check_ref_batch(path: Path) -> None:
    try:
        with np.load(path) as z:
            names = set(z.files)
    except Exception as e:  # noqa: BLE001 - not an npz at all
        raise ConfigError(f"--ref-batch {path}: not an npz file ({type(e).__name__}); give an ADM reference batch "
                          f"such as VIRTUAL_imagenet256_labeled.npz") from e
    if not ({"mu", "sigma"} <= names or "arr_0" in names):
        raise ConfigError(f"--ref-batch {path}: neither mu/sigma nor arr_0 images in it (it holds "
                          f"{', '.join(sorted(names)) or 'nothing'}); give an ADM reference batch")
    if "arr_0" in names:
        shape, fortran, dtype = _npz_header(path, "arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise ConfigError(f"--ref-batch {path}: arr_0 is {dtype} {shape}, not uint8 (N,H,W,3)")


def scoring_note(a) -> str | None:
    """Said before sampling: without the Inception's weights the run can only write samples."""
    from magvit2.metrics.pretrained import INCEPTION
    found = M.find_weights(INCEPTION, a.inception_weights, download=not a.no_download)
    if isinstance(found, M.Missing):
        return (f"note: no FID / IS this time, only samples.npz ({found.reason.split(';')[0]}): give "
                f"--inception-weights PATH (pt_inception-2015-12-05-6726825d.pth) to score them")
    return None


@torch.no_grad()
def run(a) -> dict:
    from magvit2.metrics.grids import as_numpy_uint8
    from magvit2.runs import FileLock
    from magvit2.stages.generate import class_labels, item_seed, sample_images, sampler
    check(a)  # before any loading: a typo fails at once
    note = scoring_note(a)
    if note:
        print(note)
    rank, world, how = shards.rank_world()
    model, tok, src = load_ar_source(a.source, a.tokenizer, a.tokenizer_weights)
    s = sampling_settings(src, a)
    sampler(s, shards.local_device())  # cache / compile: speed only, so not in the pinned settings (same draws)
    m = model.num_subtokens
    n_cls = a.num_classes or model.cfg.num_classes
    if n_cls > model.cfg.num_classes:
        raise ConfigError(f"--num-classes {n_cls}: the model has {model.cfg.num_classes} classes")
    size = model.cfg.grid * tok.downsample
    settings = {"kind": "ar", "source": str(src.path), "tokenizer": str(a.tokenizer or "own"),
                "tokenizer_weights": src.info["tokenizer_weights"], "per_class": a.per_class, "num_classes": n_cls,
                "seed": int(s.seed), "cfg_scale": subtoken_values(s.cfg_scale, m, "--cfg-scale"),
                "temperature": subtoken_values(s.temperature, m, "--temperature"), "top_k": s.top_k,
                "top_p": s.top_p, "shard_size": a.shard_size, "image_size": size, "protocol": a.protocol}
    if min(settings["temperature"]) <= 0:
        raise ConfigError(f"temperature {settings['temperature']} must be > 0 for every sub-token")
    out = common.out_dir(a, "ar", src.name, settings)
    shards.pin_settings(out, settings)
    labels = class_labels(n_cls, a.per_class)
    plan = shards.plan(len(labels), a.shard_size)
    mine = plan[rank::world]
    have = set(shards.done(out, mine))
    todo = [sh for sh in mine if sh not in have]
    print(f"rank {rank} of {world} ({how}): {len(mine)} of {len(plan)} shards, {len(mine) - len(todo)} drawn already; "
          f"{len(labels)} samples ({a.per_class} x {n_cls} classes) of {size}px in {out}")
    device = shards.local_device()
    model.to(device)
    tok.to(device)
    with tqdm(total=sum(sh.stop - sh.start for sh in todo), desc=f"sampling (rank {rank})", unit="img") as bar:
        for sh in todo:
            y = labels[sh.start:sh.stop]
            seeds = [item_seed(int(s.seed), int(c), i % a.per_class) for i, c in zip(range(sh.start, sh.stop), y)]
            imgs = sample_images(model, tok, y, s, s.seed, s.batch_size, device, show=False, item_seeds=seeds)
            shards.write(out, sh, as_numpy_uint8(imgs, P.get(a.protocol).to_uint8))
            bar.update(len(y))
    with FileLock(out / "merge"):  # the last rank to finish merges; the others see its results
        left = set(plan) - set(shards.done(out, plan))
        if left:
            print(f"rank {rank}: my shards are done; {len(left)} of other ranks are still missing: the last rank to "
                  f"finish merges them (or run this command again once they exist)")
            return {}
        return evaluate(a, src, out, plan, settings, device)


def _reference(a) -> str | None:
    p = a.ref_batch or a.ref_dir
    return str(p.expanduser().resolve()) if p is not None else None


def evaluate(a, src, out: Path, plan, settings: dict, device) -> dict:
    """Stream the shards into samples.npz (and the Inception), then FID / IS against the reference; results, MLflow."""
    from magvit2 import tracking
    from magvit2.runs import read_json
    # what the results are of (precision_recall only when asked: results from before it existed still match)
    key = {**settings, "reference": _reference(a), **({"precision_recall": True} if a.precision_recall else {})}
    prev = read_json(out / "results.json")
    if prev and {k: prev["settings"].get(k) for k in key} == key:  # another rank (or an earlier run) got here first
        print(f"already evaluated: {out / 'results.json'}")
        common.print_table({**prev["metrics"], **{k: M.Missing(r) for k, r in prev["missing"].items()}}, ROWS)
        return prev
    npz = out / "samples.npz"
    inception = M.inception_for_fid(a.inception_weights, download=not a.no_download)
    gm = M.GenerationMetrics(inception, device=device, precision_recall=a.precision_recall, protocol=a.protocol)
    bs = a.batch_size or 100
    n, size = plan[-1].stop, settings["image_size"]
    head, features = [], not isinstance(inception, M.Missing)  # head: the grid's images (the first 10 classes)
    with M.AdmNpzWriter(npz, (n, size, size, 3)) as w:  # one shard in memory at a time: 50k samples are 9.8 GB
        for imgs in tqdm(shards.images(out, plan, size), total=len(plan), unit="shard", mininterval=1.0,
                         desc="samples.npz" + (" + Inception" if features else "")):
            w.write(imgs)
            for i in range(0, len(imgs), bs) if features else ():
                gm.update_fake(torch.from_numpy(imgs[i:i + bs]).permute(0, 3, 1, 2))
            head.append(imgs[:settings["per_class"] * min(10, settings["num_classes"]) - sum(map(len, head))])
    n_real, adm_stats = add_reference(gm, a, size, bs) if features else (None, None)
    r = gm.compute()
    if key["reference"] is None and features:
        r["fid"] = M.Missing("no reference: give --ref-batch VIRTUAL_imagenet256_labeled.npz or --ref-dir DIR")
    metrics = {"eval/fid": r["fid"], "eval/is": r["is"], "eval/is_std": r["is_std"],
               "eval/n_samples": float(n), "eval/n_real": r["n_real"] if n_real is None else n_real}
    if adm_stats is not None:  # the same samples against ADM's TensorFlow statistics: the mixed pipeline, labelled
        metrics["eval/fid_adm_stats"] = fid_against_stats(gm, *adm_stats)
    if a.precision_recall:
        metrics.update({"eval/precision": r.get("precision", inception), "eval/recall": r.get("recall", inception)})
    grid = _grid(np.concatenate(head), settings, out / "samples.png")
    tags = {tracking.SAMPLES_NPZ: str(npz), tracking.TOKENIZER: settings["tokenizer"],
            tracking.FID_PROTOCOL: f"{settings['per_class']} samples per class x {settings['num_classes']} classes "
                                   f"vs {key['reference'] or 'no reference'} (magvit2.evaluate ar)"}
    print(f"AR {src.name} ({'released' if src.reference else 'run'}): {n} samples -> {npz}")
    params = {**key, "batch_size": a.batch_size, "model_size": src.info.get("model_size")}
    return common.finish(a, "ar", src, out, params, metrics, tags, [grid], ROWS)


# its printout, in this order, where present (labels, formats and N: magvit2.metrics.registry)
ROWS = ("eval/fid", "eval/fid_adm_stats", "eval/is", "eval/is_std", "eval/precision", "eval/recall")


def _grid(first: np.ndarray, settings: dict, path: Path) -> Path:
    """The first classes' samples (up to 10 rows), one row per class."""
    from magvit2.stages.generate import save_sample_grid
    per = settings["per_class"]
    x = torch.from_numpy(first).permute(0, 3, 1, 2).float() / 127.5 - 1
    return save_sample_grid(x, per, path, title=f"CFG {settings['cfg_scale']}, temperature {settings['temperature']}")


def add_reference(gm, a, size: int, bs: int):
    """The reference side of FID. An ADM batch with its arr_0 images: those images through the samples' own
    Inception (one implementation per number; streamed from the zip), its mu / sigma (ADM's TensorFlow evaluator's)
    kept for the second, labelled FID; a batch with mu / sigma only: those. An image folder: its images, resized +
    center-cropped to the samples' size. -> (the number of reference images when it is not what gm counted, else
    None; the batch's (mu, sigma) for the second FID, or None)."""
    if a.ref_batch is not None:
        with np.load(a.ref_batch) as z:
            stats, images = "mu" in z.files and "sigma" in z.files, "arr_0" in z.files
            adm = (z["mu"], z["sigma"]) if stats else None
        if not stats and not images:
            raise ConfigError(f"--ref-batch {a.ref_batch}: neither mu/sigma nor arr_0 images in it")
        if not images:  # statistics only: the mixed pipeline is all there is
            set_real_stats(gm, *adm)
            return M.Missing("the reference batch holds mu/sigma without its images: their count is not stored"), \
                None
        shape, fortran, dtype = _npz_header(a.ref_batch, "arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise ConfigError(f"--ref-batch {a.ref_batch}: arr_0 is {dtype} {shape}, not uint8 (N,H,W,3)")
        if shape[1:3] != (size, size):
            log.warning(f"--ref-batch images are {shape[1]}x{shape[2]}, the samples {size}x{size}")
        for x in tqdm(_npz_batches(a.ref_batch, "arr_0", shape, bs), total=-(-shape[0] // bs),
                      desc="Inception (reference)", unit="batch", mininterval=1.0):
            gm.update_real(torch.from_numpy(x).permute(0, 3, 1, 2))
        return None, adm
    from torch.utils.data import DataLoader

    from magvit2.evaluate.images import ImageFiles
    for x in tqdm(DataLoader(ImageFiles(a.ref_dir, size, flag="--ref-dir"), batch_size=bs, num_workers=a.workers),
                  desc="Inception (reference)", unit="batch", mininterval=1.0):
        gm.update_real(x)
    return None, None


def fid_against_stats(gm, mu: np.ndarray, sigma: np.ndarray):
    """FID of gm's samples (their mean and covariance, from torchmetrics' running sums) against precomputed
    reference statistics: |mu_f - mu|^2 + tr(S_f) + tr(S) - 2 tr((S_f S)^1/2), in float64; Missing below 2
    samples (no covariance)."""
    f = gm.fid
    if int(f.fake_features_num_samples) < 2:
        return M.Missing(f"FID needs >= 2 samples, got {int(f.fake_features_num_samples)}")
    n = f.fake_features_num_samples.double()
    mu_f = f.fake_features_sum.double() / n
    cov_f = (f.fake_features_cov_sum.double() - n * torch.outer(mu_f, mu_f)) / (n - 1)
    mu_r, cov_r = (torch.from_numpy(np.asarray(v)).double().to(mu_f.device) for v in (mu, sigma))
    root_trace = torch.linalg.eigvals(cov_f @ cov_r).sqrt().real.sum()  # tr of the square root: its eigenvalues'
    return float((mu_f - mu_r).square().sum() + cov_f.trace() + cov_r.trace() - 2 * root_trace)


def set_real_stats(target, mu: np.ndarray, sigma: np.ndarray, k: int = 2) -> None:
    """Precomputed reference statistics into the FID state of `target` (GenerationMetrics, or a torchmetrics FID):
    the sums from which its compute() gets mu and sigma back (sum = k mu, sum of outer products = (k - 1) sigma +
    k mu mu^T), for any k > 1."""
    fid = getattr(target, "fid", target)
    if fid is not target:
        target.n_real.update(k)  # GenerationMetrics computes FID from >= 2 real images
    d = fid.real_features_sum.shape[0]
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ConfigError(f"--ref-batch: mu {mu.shape} / sigma {sigma.shape} are not {d}-d Inception pool statistics")
    mu_t, sig_t = torch.from_numpy(mu).double().to(fid.device), torch.from_numpy(sigma).double().to(fid.device)
    fid.real_features_sum = k * mu_t
    fid.real_features_cov_sum = (k - 1) * sig_t + k * torch.outer(mu_t, mu_t)
    fid.real_features_num_samples = torch.tensor(k, dtype=torch.long, device=fid.device)


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy file `f`, which is left at the start of its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, dtype


def _npz_header(path: Path, name: str) -> tuple[tuple, bool, np.dtype]:
    """The header of array `name` in an npz, read without its data (an ADM batch's arr_0 is 10k images, ~2 GB)."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        return _npy_header(f)


def _npz_batches(path: Path, name: str, shape: tuple, bs: int):
    """(<= bs, H, W, 3) uint8 batches of array `name` of an npz, read from the zip one batch at a time."""
    row = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        _npy_header(f)
        for i in range(0, shape[0], bs):
            n = min(bs, shape[0] - i)
            yield np.frombuffer(bytearray(f.read(n * row)), np.uint8).reshape(n, *shape[1:])  # writable, for torch
