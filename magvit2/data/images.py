"""Image data: the embedded photos (scikit-image) and image folders (ImageNet layout). Pixels in [-1, 1].

A sample is addressed by a key: an index j, or an (epoch, j) pair as GlobalBatchSampler yields them. Every sample
is a pure function of (seed, epoch, j), so a resumed run sees exactly the data it would have seen. Train crops:
`data.crops: per_epoch` (the original's: a new random crop at every fetch, so every epoch sees other crops; here
drawn from (seed, epoch, j)) or `fixed` (one crop per image, from (seed, j), in every epoch). No flip. Val crops
are deterministic (center / fixed grid) and ignore the epoch.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from magvit2.data.identity import IMG_EXT
from magvit2.errors import ConfigError

log = logging.getLogger("magvit2")


class BadImage(ConfigError):
    """An image file that cannot be read, named in the message. Raised in a DataLoader worker, torch re-raises it
    in the main process as BadImage("Caught BadImage in DataLoader worker process 0.\nOriginal Traceback ...");
    the constructor takes the original message back out of that, so `error: ...` stays one line naming the file."""

    def __init__(self, msg: str = ""):
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if isinstance(msg, str) and msg.startswith("Caught ") and marker in msg:
            msg = msg.rsplit(marker, 1)[1].strip()
        super().__init__(msg)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return TF.to_tensor(img.convert("RGB")) * 2.0 - 1.0


def resize_short(img: Image.Image, size: int, resize: str = "bicubic") -> Image.Image:
    """Shorter side to `size`. resize="bilinear" is the original's torchvision T.Resize(size) (bilinear, antialiased,
    longer side truncated); "bicubic" is PIL bicubic with the longer side rounded (this project's earlier choice)."""
    if resize == "bilinear":
        return TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if resize != "bicubic":
        raise ConfigError(f"data.resize={resize!r}: use bilinear (the original's) or bicubic")
    w, h = img.size
    s = size / min(w, h)
    return img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)


def split_key(key) -> tuple[int, int]:
    """(epoch, j) from a key: a plain index j is epoch 0."""
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (0, int(key))


def crop_rng(crops: str, seed: int, epoch: int, j: int) -> random.Random:
    if crops == "fixed":
        return random.Random(seed * 1_000_003 + j)
    if crops == "per_epoch":  # a str seed is hashed with sha512: the same in every process and Python run
        return random.Random(f"crop:{seed}:{epoch}:{j}")
    raise ConfigError(f"data.crops={crops!r}: use per_epoch (the original's: a new crop every epoch) or fixed")


def load_photo(name: str) -> Image.Image:
    """A photo from scikit-image's package folder (shipped in its wheel: no download)."""
    import skimage.data
    folder = Path(skimage.data.__file__).parent
    files = [p for p in folder.glob(f"{name}.*") if p.suffix.lower() in IMG_EXT]
    if not files:
        raise ConfigError(f"data.photos: {name!r} is not an image shipped with scikit-image (look in {folder})")
    return Image.open(files[0]).convert("RGB")


class PhotoCrops(Dataset):
    """Crops of scikit-image's photos. Class = photo. Train crops: random, from the top 3/4 of each photo; val
    crops: a fixed grid along the bottom 1/4, so the two splits share no pixels."""

    def __init__(self, photos, resolution: int, scale: int, size: int, split: str, seed: int = 0,
                 crops: str = "per_epoch"):
        crop_rng(crops, seed, 0, 0)  # checks the setting
        if scale < resolution * 4:
            raise ConfigError(f"data.scale={scale} is too small for {resolution}px crops and a held-out bottom "
                             f"quarter: use data.scale >= {resolution * 4}")
        self.images = [resize_short(load_photo(p), scale) for p in photos]
        self.res, self.size, self.split, self.seed, self.crops = resolution, size, split, seed, crops
        self.num_classes = len(self.images)

    def __len__(self):
        return self.size

    def _box(self, img: Image.Image, i: int, epoch: int = 0):
        w, h = img.size
        top_h = (h * 3) // 4
        if self.split == "train":
            rng = crop_rng(self.crops, self.seed, epoch, i)
            return rng.randint(0, w - self.res), rng.randint(0, top_h - self.res)
        per = self.size // self.num_classes + 1
        j = i // self.num_classes
        x = round(j * (w - self.res) / max(per - 1, 1))
        return x, top_h + (j % 2) * (h - self.res - top_h)

    def __getitem__(self, key):
        epoch, i = split_key(key)
        c = i % self.num_classes
        img = self.images[c]
        x, y = self._box(img, i, epoch)
        return to_tensor(img.crop((x, y, x + self.res, y + self.res))), c


def open_rgb(path) -> Image.Image:
    """An image file as 8-bit RGB, naming the file when it cannot be read or converted.

    PIL's convert("RGB") saturates 16/32-bit integer modes (I;16, I) to white, so those are scaled down by their
    bit depth first; modes with no faithful RGB form (float "F", ...) are refused."""
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # truncated, garbage, unsupported format
        raise BadImage(f"image {path} cannot be read ({type(e).__name__}: {e}): remove or replace it, or set "
                       f"data.on_bad_image=skip") from e
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise BadImage(f"image {path}: mode {img.mode} with values outside 16 bits; convert it to 8-bit RGB")
        img = Image.fromarray((a / 257.0).round().astype(np.uint8), "L")
    elif img.mode not in _RGB_MODES:
        raise BadImage(f"image {path}: mode {img.mode} has no faithful 8-bit RGB form; convert it to RGB")
    return img.convert("RGB")


_RGB_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _scan(folder: Path, classes: list[str] | None = None):
    """Images under folder/<class>/; `classes` (the train split's) fixes the label of each class name."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(f"{folder} has classes that train/ lacks ({', '.join(unknown[:5])}"
                          f"{', ...' if len(unknown) > 5 else ''}): labels come from train/'s class list; add them "
                          f"to train/ or remove them")
    items = []
    for ci, c in enumerate(classes):
        if (folder / c).is_dir():
            items += [(str(p), ci) for p in sorted((folder / c).rglob("*")) if p.suffix.lower() in IMG_EXT]
    return classes, items


def class_names(data_cfg) -> list[str] | None:
    """The data set's class names in label order (photos: the photo names; image folders: train/'s subfolders)."""
    try:
        if data_cfg.name == "photos":
            return [str(p) for p in data_cfg.photos]
        root = Path(data_cfg.path)
        folder = root / "train" if (root / "train").is_dir() else root
        return sorted(d.name for d in folder.iterdir() if d.is_dir())
    except (OSError, TypeError, AttributeError):  # a moved data folder must not stop sampling
        return None


class ImageFolder(Dataset):
    """<path>/train|val/<class>/*; without val/, a deterministic split of <path>/<class>/* by file order."""

    def __init__(self, path: str, resolution: int, split: str, val_fraction: float = 0.02, val_size=None,
                 seed: int = 0, crops: str = "per_epoch", resize: str = "bilinear", on_bad_image: str = "error"):
        crop_rng(crops, seed, 0, 0)  # checks the setting
        if on_bad_image not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_image={on_bad_image!r}: use error (stop at an unreadable image, naming "
                              f"it; the default) or skip (replace it by the next readable image, counted)")
        resize_short(Image.new("RGB", (2, 2)), 1, resize)  # checks the setting
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"data.path={path} does not exist or is not a folder: point it at an image folder "
                             f"(ImageNet layout: <path>/train/<class>/*.JPEG)")
        has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
        folder = root / "val" if split == "val" and has_val else (root / "train" if has_train else root)
        train = root / "train" if has_train else root  # labels always come from the train split's classes
        classes = sorted(d.name for d in train.iterdir() if d.is_dir())
        classes, items = _scan(folder, classes)
        if not has_val:  # one folder for both splits: every k-th image is val, the rest train (no overlap)
            k = max(1, int(round(1 / max(val_fraction, 1e-9))))
            items = [it for j, it in enumerate(items) if (j % k == 0) == (split == "val")]
        if not items:
            raise ConfigError(f"data.path={path}: no images found for the {split} split under {folder} (expected "
                             f"<class>/ subfolders holding {', '.join(IMG_EXT)} files)")
        if split == "val" and val_size:
            items = items[:: max(1, len(items) // int(val_size))][: int(val_size)]
        self.items, self.classes, self.res, self.split, self.seed = items, classes, resolution, split, seed
        self.crops, self.resize, self.on_bad_image = crops, resize, on_bad_image
        self.num_classes = len(classes)
        # skip: one byte per image, 1 = found unreadable; shared memory, so DataLoader workers' finds add up here
        self.bad = torch.zeros(len(items) if on_bad_image == "skip" else 0, dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.items)

    def skipped(self) -> list[str]:
        """The files found unreadable so far (in this process and its DataLoader workers) and replaced (skip)."""
        return [self.items[i][0] for i in self.bad.nonzero().flatten().tolist()]

    def _readable(self, i: int):
        """(image, label) of item i; skip: of the first readable item from i on in folder order (cyclic), so a bad
        image is always replaced by the same one. Each bad file is warned about once per process."""
        n = len(self.items)
        for j in [i] + ([(i + d) % n for d in range(1, n)] if self.on_bad_image == "skip" else []):
            p, c = self.items[j]
            if self.on_bad_image == "skip" and self.bad[j]:
                if p not in _WARNED:  # found by another worker
                    _WARNED.add(p)
                    log.warning(f"data.on_bad_image=skip: skipping unreadable image {p}")
                continue
            try:
                return open_rgb(p), c
            except BadImage as e:
                if self.on_bad_image != "skip":
                    raise
                self.bad[j] = 1
                if p not in _WARNED:
                    _WARNED.add(p)
                    why = f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else str(e)
                    log.warning(f"data.on_bad_image=skip: skipping unreadable image {p} ({why}); the next readable "
                                f"image in folder order takes its place")
        raise BadImage(f"data.path: none of the {n} images of the {self.split} split can be read (e.g. "
                       f"{self.items[i][0]}); check the folder")

    def __getitem__(self, key):
        epoch, i = split_key(key)
        img, c = self._readable(i)
        img = resize_short(img, self.res, self.resize)
        w, h = img.size
        if self.split == "train":
            rng = crop_rng(self.crops, self.seed, epoch, i)
            x, y = rng.randint(0, w - self.res), rng.randint(0, h - self.res)
        else:  # torchvision's CenterCrop offsets (the original's val transform)
            x, y = int(round((w - self.res) / 2.0)), int(round((h - self.res) / 2.0))
        return to_tensor(img.crop((x, y, x + self.res, y + self.res))), c


_WARNED: set[str] = set()  # bad files this process has warned about


def skipped_images(ds) -> dict:
    """{"data/skipped_images": count} for an image folder in skip mode (a metric the stages log), else {}."""
    if isinstance(ds, ImageFolder) and ds.on_bad_image == "skip":
        return {"data/skipped_images": float(ds.bad.sum())}
    return {}
