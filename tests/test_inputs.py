"""Hostile inputs: each gives one clear message naming the setting or the file, before anything starts."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.data.images import ImageFolder, open_rgb
from test_recipe import cfg_of


@pytest.mark.parametrize("override,needle", [
    ("trainer.ar.lr=-1", "trainer.ar.lr=-1"), ("trainer.tokenizer.lr=0", "trainer.tokenizer.lr=0"),
    ("tracking.log_every=0", "tracking.log_every=0"), ("trainer.ar.ckpt_every=0", "trainer.ar.ckpt_every=0"),
    ("trainer.tokenizer.ckpt_every=0", "trainer.tokenizer.ckpt_every=0"), ("seed=abc", "seed='abc'"),
    ("model.num_classes=3", "model.num_classes=3 is smaller than the data's 10 classes"),
    ("sampling.cfg_scale=[1,2,3]", "sampling.cfg_scale has 3 values"),
    ("metrics.precision_recall=maybe", "metrics.precision_recall='maybe': use true"),
])
def test_bad_settings_are_caught_by_validate(override, needle):
    with pytest.raises(ConfigError) as e:
        C.validate(cfg_of(override))
    assert needle in str(e.value)


def test_16_bit_png_keeps_its_values(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # a 16-bit grayscale PNG (mode I;16 when read back)
    assert Image.open(path).mode in ("I;16", "I")
    got = np.asarray(open_rgb(path))
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 1]).all()
    np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257).astype(np.uint8))  # not saturated to white
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ConfigError, match="f.tif: mode F"):
        open_rgb(tmp_path / "f.tif")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="bad.jpg cannot be read"):
        open_rgb(tmp_path / "bad.jpg")


def test_val_labels_come_from_train_classes(tmp_path):
    for split, classes in (("train", ["ant", "bee", "cat"]), ("val", ["bee", "cat"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (len(c), 0, 0)).save(tmp_path / split / c / "x.png")
    val = ImageFolder(str(tmp_path), 8, "val")
    assert val.classes == ["ant", "bee", "cat"]
    assert [c for _, c in val.items] == [1, 2]  # bee, cat keep train's labels although val lacks ant
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(ConfigError, match="classes that train/ lacks \\(dog\\)"):
        ImageFolder(str(tmp_path), 8, "val")
