"""Hostile inputs: relative data paths and changed folders (signatures), unreadable images (error | skip), bad
`magvit2.sample` arguments, and `magvit2.report` without a store."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import magvit2.train  # noqa: F401  (resolvers, sweeper/launcher config nodes)
from conftest import REPO, run_train
from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.data import identity as D
from magvit2.stages.ar import token_cache


def cfg_of(*overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/magvit2-unused", *overrides])


def _images(folder: Path, n: int, value: int = 0, size=(24, 20)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), value + 10 * i, np.uint8)).save(folder / f"{i}.png")


def _sigs(*overrides: str) -> tuple[str, str]:
    D._FINGERPRINTS.clear()  # as in a new process (the scan is cached per process)
    cfg = cfg_of("data=imagefolder", "stage=ar", *overrides)
    return C.signature(cfg), str(token_cache(cfg, "tok"))


# ------------------------------------------------------------------------------ item 1: data identity


def test_relative_path_means_the_folder_under_the_launching_cwd(tmp_path, monkeypatch):
    _images(tmp_path / "a" / "imgs" / "train" / "cls", 2, value=0)
    _images(tmp_path / "b" / "imgs" / "train" / "cls", 2, value=100)
    monkeypatch.chdir(tmp_path / "a")
    in_a = _sigs("path=imgs")
    assert in_a == _sigs(f"path={tmp_path / 'a' / 'imgs'}")  # relative and absolute: one data set
    monkeypatch.chdir(tmp_path / "b")
    in_b = _sigs("path=imgs")
    assert in_a[0] != in_b[0] and in_a[1] != in_b[1]  # run signature and token cache both
    # train pins the path in the config it saves, so a later reader (sample) from elsewhere means the same folder
    cfg = cfg_of("data=imagefolder", "path=imgs")
    C.absolute_data_path(cfg)
    assert cfg.data.path == str(tmp_path / "b" / "imgs")


def test_changed_images_change_the_signature_per_fingerprint_mode(tmp_path):
    imgs = tmp_path / "imgs"
    _images(imgs / "train" / "cls", 2)
    path = f"path={imgs}"
    stat = _sigs(path)
    assert stat == _sigs(path)
    os.utime(imgs / "train" / "cls" / "0.png", ns=(10**18, 10**18))  # touched
    touched = _sigs(path)
    assert touched != stat
    (imgs / "train" / "cls" / "notes.txt").write_text("not an image")  # only image files count
    assert _sigs(path) == touched
    _images(imgs / "train" / "new", 1)  # an image added
    added = _sigs(path)
    assert added not in (stat, touched)
    # one scan per process: a run's signature cannot change under it (and a sweep of 100 members scans once)
    _images(imgs / "train" / "newer", 1)
    assert C.signature(cfg_of("data=imagefolder", "stage=ar", path)) == added[0]

    none = _sigs(path, "data.fingerprint=none")
    content = _sigs(path, "data.fingerprint=content")
    assert len({none, content, _sigs(path)}) == 3
    os.utime(imgs / "train" / "cls" / "1.png", ns=(10**18, 10**18))  # same bytes, new mtime
    assert _sigs(path, "data.fingerprint=none") == none and _sigs(path, "data.fingerprint=content") == content
    _images(imgs / "train" / "cls", 1, value=200)  # 0.png rewritten with other pixels
    assert _sigs(path, "data.fingerprint=content") != content and _sigs(path, "data.fingerprint=none") == none
    with pytest.raises(ConfigError, match="data.fingerprint='mtime'"):
        _sigs(path, "data.fingerprint=mtime")
    # on_bad_image is no part of the identity: a run stopped by a bad image resumes with skip
    assert _sigs(path, "data.on_bad_image=skip") == _sigs(path)
    with pytest.raises(ConfigError, match="data.on_bad_image='ignore'"):
        _sigs(path, "data.on_bad_image=ignore")


# ------------------------------------------------------------------------------ item 2: unreadable images

TINY_FOLDER = [
    "stage=tokenizer", "tokenizer.resolution=16", "tokenizer.ch=16", "tokenizer.ch_mult=[1,2,2]",
    "tokenizer.loss.disc_ndf=8", "trainer.tokenizer.steps=2", "trainer.tokenizer.batch_size=4",
    "trainer.tokenizer.ckpt_every=1", "trainer.tokenizer.eval_every=0", "tracking.log_every=1", "data.val_size=2",
    "data.num_workers=1",  # the error comes out of a DataLoader worker
    "metrics.download=false",
]


@pytest.mark.slow  # two real runs (~30 s)
def test_garbage_image_error_names_it_once_and_skip_finishes(root):
    imgs = root / "imgs"
    _images(imgs / "train" / "cls", 4)
    _images(imgs / "val" / "cls", 2)
    bad = imgs / "train" / "cls" / "2b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    p = run_train(root, "data=imagefolder", f"path={imgs}", *TINY_FOLDER, check=False, timeout=300, tiny=False)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower() and "mlflow" not in line]
    assert len(errors) == 1 and errors[0].startswith("error: image ") and str(bad) in errors[0], p.stderr[-3000:]
    assert "data.on_bad_image=skip" in errors[0] and "Traceback" not in p.stderr and "worker" not in p.stderr

    p = run_train(root, "data=imagefolder", f"path={imgs}", *TINY_FOLDER, "data.on_bad_image=skip", timeout=300,
                  tiny=False)
    out = p.stdout + p.stderr
    assert f"skipping unreadable image {bad}" in out, out[-3000:]
    (status,) = (root / "runs" / "tokenizer").glob("*/status.json")
    st = json.loads(status.read_text())
    assert st["state"] == "finished" and st["metrics"]["data/skipped_images"] == 1.0, st


def test_skip_replaces_a_bad_image_by_the_next_readable_one(tmp_path):
    from magvit2.data.images import BadImage, ImageFolder, skipped_images
    _images(tmp_path / "train" / "cls", 3)
    _images(tmp_path / "val" / "cls", 1)
    (tmp_path / "train" / "cls" / "0a.png").write_bytes(b"truncated")  # between 0.png and 1.png in folder order
    kw = dict(path=str(tmp_path), resolution=16, split="train")
    strict, lenient = ImageFolder(**kw), ImageFolder(**kw, on_bad_image="skip")
    assert [Path(p).name for p, _ in strict.items] == ["0.png", "0a.png", "1.png", "2.png"]
    with pytest.raises(BadImage, match="0a.png"):
        strict[(0, 1)]
    x, c = lenient[(0, 1)]
    assert np.array_equal(x.numpy(), strict[(0, 2)][0].numpy()) and c == strict[(0, 2)][1]  # 1.png (uniform)
    assert np.array_equal(lenient[(0, 1)][0].numpy(), x.numpy())  # deterministic
    assert lenient.skipped() == [str(tmp_path / "train" / "cls" / "0a.png")]
    assert skipped_images(lenient) == {"data/skipped_images": 1.0} and skipped_images(strict) == {}
    with pytest.raises(ConfigError, match="on_bad_image"):
        ImageFolder(**kw, on_bad_image="ignore")


# ------------------------------------------------------------------------------ item 3: sample arguments


@pytest.mark.parametrize("args,needle", [
    (["--per-class", "0"], "--per-class 0 must be >= 1"),
    (["--per-class", "-3"], "--per-class -3 must be >= 1"),
    (["--cfg-scale", "nan"], "--cfg-scale nan"),
    (["--cfg-scale", "1.9", "inf"], "--cfg-scale 1.9 inf"),
    (["--temperature", "nan", "1.0"], "--temperature nan 1.0"),
    (["--cfg-scale=-inf"], "--cfg-scale -inf"),
    (["--temperature", "1.0", "inf"], "--temperature 1.0 inf"),
    (["--temperature", "0"], "must be > 0"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-k", "0"], "--top-k 0"),
])
def test_sample_rejects_bad_arguments_before_loading(tmp_path, capsys, args, needle):
    from magvit2 import sample
    assert sample.main([str(tmp_path / "no-such-run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


# ------------------------------------------------------------------------------ item 4: report's store


def test_report_without_a_store_names_it_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from magvit2 import report
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAGVIT2_ROOT", str(tmp_path / "elsewhere"))
    assert report.main(["--sweep", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "elsewhere" / "mlflow.db") in err[0] and "MAGVIT2_ROOT=" in err[0], err
    monkeypatch.delenv("MAGVIT2_ROOT")
    assert report.main(["--experiment", "magvit2-ar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "outputs" / "mlflow.db") in err[0] and "MAGVIT2_ROOT is not set" in err[0]
    assert report.main(["--sweep", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}"]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no outputs/, no mlflow.db, no elsewhere/


def test_report_reads_the_store_under_magvit2_root(tmp_path, monkeypatch, capsys):
    from mlflow_server import fresh_sqlite
    from magvit2 import report
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = fresh_sqlite(tmp_path / "root")
    monkeypatch.setenv("MAGVIT2_ROOT", str(tmp_path / "root"))
    assert report.main(["--sweep", "nope"]) == 2  # an empty store: no runs match, read from MAGVIT2_ROOT's store
    err = capsys.readouterr().err
    assert "no member runs match" in err and uri in err, err
    assert list((tmp_path / "cwd").iterdir()) == []
