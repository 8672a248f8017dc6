"""Image grids people look at: originals vs reconstructions, samples per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B,3,H,W) -> uint8 (B,3,H,W)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(rows, path: Path, labels=None, scale: int = 2, title: str | None = None) -> Path:
    """rows: a sequence of (B,3,H,W) tensors in [-1,1], one grid row each, with a text label to its left; `title`
    goes in a band above the grid."""
    rows = [r.detach().cpu() for r in rows]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    pad = [torch.cat([r, -torch.ones(n - r.shape[0], 3, h, w)]) if r.shape[0] < n else r for r in rows]
    grid = make_grid(to_uint8(torch.cat(pad)), nrow=n, padding=2, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels:
        margin = 8 * max(len(s) for s in labels) + 8
        canvas = Image.new("RGB", (img.width + margin, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = img.height / len(rows)
        for i, s in enumerate(labels):
            draw.text((4, int(row_h * (i + 0.5)) - 5), s, fill="black")
        img = canvas
    if title:
        canvas = Image.new("RGB", (max(img.width, 6 * len(title) + 8), img.height + 16), "white")
        canvas.paste(img, (0, 16))
        ImageDraw.Draw(canvas).text((4, 2), title, fill="black")
        img = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def as_numpy_uint8(x: torch.Tensor, mode: str = "trunc") -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8, the layout of ADM-evaluator npz files; `mode` is the protocol's
    (metrics/protocol.py: "trunc" under reference, as the original's chw_to_pillow)."""
    from .inception import to_uint8 as unit_to_uint8, to_unit
    return unit_to_uint8(to_unit(x), mode).permute(0, 2, 3, 1).cpu().numpy()
