"""Sample grids say what they show: class names per row, and the sampling settings and step in a title."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from PIL import Image

from magvit2.data.images import class_names
from magvit2.stages import generate


def test_rows_carry_class_names_and_the_title_the_settings(tmp_path, monkeypatch):
    seen = {}
    real = generate.save_grid

    def spy(rows, path, labels=None, title=None):
        seen.update(labels=labels, title=title, n=len(rows))
        return real(rows, path, labels=labels, title=title)
    monkeypatch.setattr(generate, "save_grid", spy)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    s = OmegaConf.create({"cfg_scale": [1.9, 2.0], "temperature": [1.0, 1.0], "top_k": None, "top_p": None})
    path = generate.save_sample_grid(images, 2, tmp_path / "g.png", classes=[3, 1],
                                     names=["astronaut", "chelsea", "coffee", "rocket"],
                                     title=generate.grid_title(s, 200))
    assert seen["labels"] == ["rocket", "chelsea"] and seen["n"] == 2  # --classes 3 1: rows are those classes
    assert seen["title"] == "CFG (1.9, 2), temperature (1, 1), step 200"
    with_title, plain = Image.open(path), Image.open(real([images[:2], images[2:]], tmp_path / "p.png"))
    assert with_title.height == plain.height + 16 and with_title.width > plain.width


def test_class_names_of_the_data_sets(tmp_path):
    assert class_names(OmegaConf.create({"name": "photos", "photos": ["astronaut", "coffee"]})) == ["astronaut",
                                                                                                     "coffee"]
    for c in ("bee", "ant"):
        (tmp_path / "train" / c).mkdir(parents=True)
    assert class_names(OmegaConf.create({"name": "imagefolder", "path": str(tmp_path)})) == ["ant", "bee"]
    assert class_names(OmegaConf.create({"name": "imagefolder", "path": str(tmp_path / "gone")})) is None


def test_a_curve_of_one_point_is_drawn():
    import pandas as pd
    from magvit2.results import plot_curves
    hist = pd.DataFrame({"run_id": ["r1"], "run_name": ["a"], "key": ["eval/psnr"], "step": [100], "value": [20.0]})
    (line,) = plot_curves(hist, "eval/psnr").axes[0].get_lines()
    assert line.get_marker() == "o"  # a line through one point draws nothing
