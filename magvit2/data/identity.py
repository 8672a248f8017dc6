"""Data identity: which data set a run sees, for run signatures and the token cache. No torch: the plan step uses it.

An image folder is its absolute path plus a fingerprint of its files, so the same relative path from two
directories, or a folder whose images changed, is another data set.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from magvit2.errors import ConfigError

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FINGERPRINTS = ("stat", "content", "none")
BAD_IMAGE = ("error", "skip")
_LOADING = ("num_workers",)  # loading speed: the same images either way
_FINGERPRINTS: dict = {}  # (absolute folder, mode) -> fingerprint: scanned once per process (a sweep plans 100 members)


def data_path(p) -> str:
    """An image folder's absolute path: relative to the launching cwd (hydra keeps it: job.chdir=false; submitit
    starts SLURM members in the submitting cwd), symlinks resolved, so `path=imgs` from two folders are two data
    sets and the same folder by any name is one."""
    return str(Path(str(p)).expanduser().resolve())


def absolute_data_path(cfg: DictConfig) -> None:
    """Pin a relative data.path to the folder it means now (data_path), so the run's saved config.yaml names it
    wherever it is read later (python -m magvit2.sample from another directory)."""
    p = cfg.data.get("path") if "data" in cfg else None
    if p is not None and not Path(str(p)).is_absolute():
        cfg.data.path = data_path(p)


def folder_fingerprint(path: str, mode: str = "stat") -> str:
    """A cheap identity of an image folder's files (every image under it, recursively, symlinks followed):
    stat: count + hash of (relative name, size, mtime_ns) of each; content: count + hash of the bytes of each
    (reads everything); none: "none" (the path alone identifies the data). Cached per process and folder: a run's
    signature cannot change under it while it trains."""
    if mode not in FINGERPRINTS:
        raise ConfigError(f"data.fingerprint={mode!r}: use stat (names, sizes, mtimes of the images; the default), "
                          f"content (hashes every image's bytes: slow on large folders) or none (the path only)")
    if mode == "none":
        return "none"
    key = (path, mode)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h, n, seen = hashlib.sha256(), 0, set()
    for top, dirs, files in os.walk(path, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        rel = os.path.relpath(top, path)
        for f in sorted(files):
            if not f.lower().endswith(IMG_EXT):
                continue
            full = os.path.join(top, f)
            try:
                s = os.stat(full)
            except OSError:  # a dangling link: the data set skips it too (no image behind it)
                continue
            n += 1
            h.update(f"{rel}/{f}\0{s.st_size}\0".encode())
            if mode == "stat":
                h.update(f"{s.st_mtime_ns}\n".encode())
            else:
                with open(full, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    fp = f"{mode}:{n}:{h.hexdigest()[:16]}"
    _FINGERPRINTS[key] = fp
    return fp


def data_identity(data) -> dict:
    """The data settings that change what a run sees (data.crops included); not loading speed. `data`: the data
    group (a config node or a plain dict). An image folder is its absolute path plus its `data.fingerprint`.
    `data.on_bad_image` is left out: a run can only finish in `error` mode when no image is bad, where `skip` sees
    the same data, so a run stopped by a bad image resumes with `skip`."""
    d = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    for k in _LOADING:
        d.pop(k, None)
    if "on_bad_image" in d:
        if d["on_bad_image"] not in BAD_IMAGE:
            raise ConfigError(f"data.on_bad_image={d['on_bad_image']!r}: use error (stop at an unreadable image, "
                              f"naming it; the default) or skip (replace it by the next readable image, counted)")
        del d["on_bad_image"]
    if d.get("path") is not None and d.get("name") == "imagefolder":
        d["path"] = data_path(d["path"])
        mode = d.get("fingerprint", "stat")
        if Path(d["path"]).is_dir():
            d["fingerprint"] = folder_fingerprint(d["path"], mode)
        elif mode not in FINGERPRINTS:
            folder_fingerprint(d["path"], mode)  # raises
    return d
