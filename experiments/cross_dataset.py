"""Ablation 6, second half: evaluate the tokenizers of a `+experiment=cross_dataset` sweep on other image folders,
at their training resolution and zero-shot at twice it (`python -m magvit2.evaluate tokenizer`, one run each).

    python experiments/cross_dataset.py --root outputs --folder coco=/data/coco/val2017 --folder ffhq=/data/ffhq
    python experiments/cross_dataset.py --root outputs --photo-folders      # tiny scale: folders cut from the photos
    python -m magvit2.report --sweep <id>                                   # its section reads these evaluations

Extra arguments after `--` go to every `magvit2.evaluate` call (e.g. -- --inception-weights PATH --num-images 5000).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml


def photo_folders(dest: Path) -> dict[str, Path]:
    """Two flat folders cut from the embedded photos: the training photos mirrored, and the photos it never saw."""
    from PIL import Image

    from magvit2.data.images import load_photo
    out = {}
    for name, photos, flip in (("photos_mirrored", ["astronaut", "coffee", "chelsea", "rocket"], True),
                               ("photos_unseen", ["motorcycle_left", "hubble_deep_field", "ihc", "retina"], False)):
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        for p in photos:
            img = load_photo(p)
            (img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img).save(d / f"{p}.png")
        out[name] = d
    return out


def tokenizer_runs(root: Path) -> list[Path]:
    """Finished tokenizer runs under root (the sweep's members: one per seed)."""
    runs = []
    for st in sorted((root / "runs" / "tokenizer").glob("*/status.json")):
        if yaml.safe_load(st.read_text()).get("state") == "finished":
            runs.append(st.parent)
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("outputs"), help="paths.root of the sweep (default ./outputs)")
    ap.add_argument("--folder", action="append", default=[], help="NAME=DIR, an image folder (repeatable)")
    ap.add_argument("--photo-folders", action="store_true", help="add folders cut from the embedded photos")
    ap.add_argument("--run", action="append", type=Path, help="tokenizer run dir(s) (default: every finished one)")
    a, extra = ap.parse_known_args(argv)
    folders = dict(f.split("=", 1) for f in a.folder)
    if a.photo_folders:
        folders.update(photo_folders(a.root / "cross_dataset"))
    if not folders:
        ap.error("give --folder NAME=DIR (repeatable) or --photo-folders")
    runs = a.run or tokenizer_runs(a.root)
    if not runs:
        ap.error(f"no finished tokenizer run under {a.root}/runs/tokenizer: run the sweep first")
    for run in runs:
        res = int(yaml.safe_load((run / "config.yaml").read_text())["tokenizer"]["resolution"])
        for name, d in folders.items():
            for r in (res, 2 * res):  # the training resolution, and zero-shot at twice it
                cmd = [sys.executable, "-m", "magvit2.evaluate", "tokenizer", str(run), "--data", str(d),
                       "--resolution", str(r), "--root", str(a.root), "--workers", "0",
                       *[x for x in extra if x != "--"]]
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
