"""`data`: ImageFolder (magvit2.data.images: decode, resize, crop) images/s with 0, 1, 2, ... DataLoader workers, on
a temp folder of JPEGs made from scikit-image's photos; JPEG decode alone on the CPU (PIL) vs on the GPU
(torchvision.io.decode_jpeg) and a pinned vs pageable host-to-device copy when CUDA exists.

Needs the project's data package (magvit2.data.images imports magvit2.config: omegaconf); without it the mode is
skipped, named."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from .common import row, timeit

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "color")


def make_folder(root: Path, copies: int) -> list[Path]:
    """<root>/<photo>/<i>.jpg: every photo saved `copies` times as a quality-90 JPEG (ImageNet's ~500 px sizes)."""
    from magvit2.data.images import load_photo
    files = []
    for name in PHOTOS:
        img = load_photo(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(copies):
            f = root / name / f"{i}.jpg"
            img.save(f, quality=90)
            files.append(f)
    return files


def _loader_rate(ds, workers: int, batch: int, batches: int) -> float:
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers,
                                     persistent_workers=False)
    it = iter(dl)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - t)


def run(device, dtype, quick: bool, smoke=False, **_) -> dict:
    from magvit2.data.images import ImageFolder
    res, batch = 256, 32
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="magvit2-bench-") as tmp:
        files = make_folder(Path(tmp), copies=1 if smoke else 8 if quick else 32)
        ds = ImageFolder(tmp, res, "train", val_fraction=1e-9)  # every image in train
        batch = min(batch, len(ds) // 2)
        nb = max(1, min(len(ds) // batch - 1, 2 if quick else 6))
        for w in [0] if smoke else sorted({0, 1, min(2, cores), cores}):
            rate = _loader_rate(ds, w, batch, nb)
            rows.append(row(f"ImageFolder {res}px crop, batch {batch}", f"{w} workers", throughput=rate,
                            unit="img/s", per_worker=rate / max(w, 1)))
        from PIL import Image
        t = timeit(lambda: [Image.open(f).load() for f in files[:64]], torch.device("cpu"), reps=2)
        rows.append(row("JPEG decode (64 files)", "CPU PIL, 1 process", time_s=t, throughput=len(files[:64]) / t,
                        unit="img/s"))
        if device.type == "cuda":
            from torchvision.io import decode_jpeg
            data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files[:64]]
            t = timeit(lambda: decode_jpeg(data, device=device), device, reps=3)
            rows.append(row("JPEG decode (64 files)", "GPU torchvision.io.decode_jpeg", time_s=t,
                            throughput=64 / t, unit="img/s"))
            x = torch.rand(batch, 3, res, res)
            for name, src in (("pageable", x), ("pinned, non_blocking", x.pin_memory())):
                t = timeit(lambda: src.to(device, non_blocking=True), device, reps=5)
                rows.append(row(f"host->GPU copy batch {batch}", name, time_s=t, throughput=batch / t, unit="img/s"))
        else:
            rows.append(row("JPEG decode (64 files)", "GPU torchvision.io.decode_jpeg", note="skipped: no CUDA device"))
    return {"rows": rows, "summary": {"images": len(files), "cpu_cores": cores, "resolution": res}}
