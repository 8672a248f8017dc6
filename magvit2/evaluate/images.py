"""An evaluation image folder: every image under it (class subfolders like ImageNet val, or flat), in path order,
with the original's val transform: shorter side to `resolution` (torchvision's bilinear, antialiased Resize), then
torchvision's center crop. Pixels in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from magvit2.errors import ConfigError
from magvit2.data.images import IMG_EXT, open_rgb, resize_short, to_tensor


class ImageFiles(Dataset):
    def __init__(self, folder, resolution: int, num_images: int | None = None, flag: str = "--data"):
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{flag} {folder}: no such folder; give an image folder (e.g. ImageNet's val/)")
        if (root / "train").is_dir() and (root / "val").is_dir():
            raise ConfigError(f"{flag} {folder} holds train/ and val/: give the split to evaluate on, e.g. "
                              f"{root / 'val'}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXT and p.is_file())
        if not files:
            raise ConfigError(f"{flag} {folder}: no images ({', '.join(IMG_EXT)}) under it")
        if num_images is not None:
            if num_images > len(files):
                raise ConfigError(f"--num-images {num_images}: {folder} has only {len(files)} images")
            files = files[:: len(files) // num_images][:num_images]  # spread over the classes, not the first few
        self.files, self.res, self.root = files, resolution, root.resolve()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = resize_short(open_rgb(self.files[i]), self.res, "bilinear")
        return to_tensor(TF.center_crop(img, [self.res, self.res]))
