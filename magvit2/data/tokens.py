"""AR input tokens: the data set's LFQ indices under the frozen tokenizer, extracted once into a cache.

`tokens=online` (the original's) encodes every step's train crops with the frozen tokenizer (the AR stage does:
magvit2/stages/ar.py decides online vs cached); only validation tokens (center / fixed-grid crops) are extracted.
`tokens=cached` (LlamaGen's faster practice, ten-crop + flip): C = tokens.crops crops per train image (crop c of
image j is the crop the data set gives key (c, j), i.e. the one of epoch c) and, with tokens.flips, their
horizontal flips: V = C x (2 if flips else 1) variants extracted once; key (epoch, j) reads variant v of image j,
drawn from (seed, epoch, j).

Cache: <paths.cache>/tokens/<key>/{train,val}-r<rank>-<k>.npz, key = (tokenizer identity, data identity, tokens
settings, seed) (config.token_cache_key). A shard holds the storage index (j * V + v), the (h, w) token grid (int32)
and the label; done.json marks a complete extraction. Each process extracts its slice; readers sort by index, so
the order does not depend on the number of processes. This module takes the image data sets; it never builds them.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from magvit2.data.images import split_key
from magvit2.errors import ConfigError
from magvit2.runs import FileLock, atomic_write, atomic_write_text

SHARD = 50_000


def variants(tokens: dict) -> int:
    """Stored variants per train image of the tokens settings (config.tokens_settings); 0: online."""
    return tokens["crops"] * (2 if tokens["flips"] else 1) if tokens["name"] == "cached" else 0


def cache_dir(cache_root, key: dict) -> Path:
    """The extraction folder of a cache key (config.token_cache_key) under paths.cache."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_root) / "tokens" / digest


def extracted(out: Path) -> bool:
    return (Path(out) / "done.json").exists()


@torch.no_grad()
def encode(tokenizer, x: torch.Tensor) -> torch.Tensor:
    """Token grids (B, h, w) of images in [-1, 1]. Eval mode: the quantizer neither tracks VQ code usage (a buffer
    update) nor all-reduces LFQ statistics across processes."""
    tokenizer.eval()
    tokenizer._check_images(x)  # what Tokenizer.encode checks, then its two halves with the latents checked between
    z = tokenizer.encoder(x)
    if not bool(torch.isfinite(z).all()):  # LFQ maps NaN to bit 0: every token would silently be 0
        raise ConfigError(f"the tokenizer's encoder gave non-finite latents ({int((~torch.isfinite(z)).sum())} of "
                          f"{z.numel()}) for a batch of finite images: its weights are broken; point "
                          f"tokens.tokenizer at another tokenizer")
    return tokenizer.quantizer(z).indices


@torch.no_grad()
def extract(out: Path, images: dict, tokens: dict, tokenizer, tokenizer_id: str, acc, num_workers: int = 0,
            batch_size: int = 64) -> Path:
    """Token shards of `images` ({split: image data set}; train: the V variants of each image) into `out`, once:
    a complete extraction (done.json) is kept, so later calls return at once."""
    if extracted(out):
        return out
    lock = FileLock(out) if acc.is_main_process else None
    if lock:
        out.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    acc.wait_for_everyone()
    try:
        if not extracted(out):
            counts = {s: _extract_split(ds, s, tokens, tokenizer, acc, out, num_workers, batch_size)
                      for s, ds in images.items()}
            acc.wait_for_everyone()
            if acc.is_main_process:
                for s in images:
                    consolidate(out, s)
                atomic_write_text(out / "done.json", json.dumps({"tokenizer": tokenizer_id, "counts": counts,
                                                                 "tokens": tokens}))
        acc.wait_for_everyone()
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return out


class _Keys(Dataset):
    def __init__(self, ds, keys):
        self.ds, self.keys = ds, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.ds[self.keys[i]]


def _extract_split(ds, split: str, tokens: dict, tokenizer, acc, out: Path, num_workers: int,
                   batch_size: int) -> int:
    from tqdm.auto import tqdm
    crops, flips = (tokens["crops"], tokens["flips"]) if split == "train" else (1, False)
    F = 2 if flips else 1
    V = crops * F
    mine = list(range(acc.process_index, len(ds), acc.num_processes))
    idx, toks, labels = [], [], []
    for c in range(crops):
        loader = DataLoader(_Keys(ds, [(c, j) for j in mine]), batch_size=batch_size, num_workers=num_workers)
        pos, desc = 0, f"tokens ({split}" + (f", crop {c + 1}/{crops})" if crops > 1 else ")")
        for x, y in tqdm(loader, desc=desc, disable=not acc.is_main_process, mininterval=1.0):
            x = x.to(acc.device)
            j = np.asarray(mine[pos:pos + x.shape[0]])
            for f in range(F):
                ids = encode(tokenizer, torch.flip(x, dims=[3]) if f else x)
                idx.append(j * V + c * F + f)
                toks.append(ids.cpu().numpy().astype(np.int32))
                labels.append(y.numpy().astype(np.int64))
            pos += x.shape[0]
    idx, toks, labels = np.concatenate(idx), np.concatenate(toks), np.concatenate(labels)
    for k, s in enumerate(range(0, len(idx), SHARD)):
        part = {"index": idx[s:s + SHARD], "tokens": toks[s:s + SHARD], "labels": labels[s:s + SHARD]}
        atomic_write(out / f"{split}-r{acc.process_index}-{k:05d}.npz", lambda f, p=part: np.savez(f, **p), "wb")
    return int(len(ds) * V)


class TokenShards(Dataset):
    """The token cache of a split, memory-mapped: one `<split>-tokens.npy` (int32, 1 KB per 16x16 grid, ~13 GB for
    ImageNet with 5 crops x flip) that the ranks of a node share through the page cache instead of each holding a
    copy; the labels are read whole.

    tokens: (n, V, h, w). Key j -> variant 0 of image j (val); key (epoch, j) -> a variant drawn from (seed, epoch,
    j), so every epoch sees another crop / flip of each image and a resumed run the same one."""

    def __init__(self, folder: Path, split: str, n_variants: int = 1, seed: int = 0):
        folder = Path(folder)
        if not (folder / f"{split}-tokens.npy").exists():  # a cache from before the .npy files: made once, locked
            with FileLock(folder):
                if not (folder / f"{split}-tokens.npy").exists():
                    consolidate(folder, split)
        tokens = np.load(folder / f"{split}-tokens.npy", mmap_mode="r")
        self.tokens = tokens.reshape(-1, n_variants, *tokens.shape[1:])
        self.labels = torch.from_numpy(np.load(folder / f"{split}-labels.npy")[::n_variants].copy())
        self.V, self.seed = n_variants, seed

    def __len__(self):
        return len(self.labels)

    def variant(self, epoch: int, j: int) -> int:
        return random.Random(f"variant:{self.seed}:{epoch}:{j}").randrange(self.V) if self.V > 1 else 0

    def __getitem__(self, key):
        epoch, j = split_key(key)
        v = self.variant(epoch, j) if isinstance(key, (tuple, list)) else 0
        return torch.from_numpy(np.array(self.tokens[j, v])).long(), self.labels[j]


def _shards(out: Path, split: str) -> list[Path]:
    files = sorted(Path(out).glob(f"{split}-r*-*.npz"))
    if not files:
        raise FileNotFoundError(f"no {split} token shards in {out}: the extraction did not finish")
    return files


def _read(f: Path, key: str) -> np.ndarray:
    try:
        with np.load(f) as p:
            return p[key]
    except Exception as e:  # noqa: BLE001 - a damaged shard: named, with the fix
        raise ConfigError(f"token cache shard {f} is damaged ({type(e).__name__}: {e}): delete its folder "
                          f"{f.parent} and the next run extracts the tokens again") from e


def _write_npy(path: Path, dtype, shape: tuple, fill) -> None:
    """An .npy file written through the atomic-write helper (fsync, rename), filled in place through a memmap of
    its data, so a split larger than memory never needs to be held whole."""
    def write(f):
        np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        mm = np.memmap(f, dtype=dtype, mode="r+", offset=offset, shape=tuple(shape))
        fill(mm)
        mm.flush()
        del mm
    atomic_write(path, write, "w+b")


def consolidate(out: Path, split: str) -> None:
    """The split's shards (every rank's, in any order) into `<split>-tokens.npy` / `<split>-labels.npy`, rows in
    index order (image j's variants at rows j*V .. j*V+V-1), one shard in memory at a time."""
    files = _shards(out, split)
    index = [_read(f, "index") for f in files]
    n, grid = sum(len(i) for i in index), _read(files[0], "tokens").shape[1:]

    def fill(key):
        def go(mm):
            for f, i in zip(files, index):
                mm[i] = _read(f, key)
        return go
    _write_npy(out / f"{split}-tokens.npy", np.int32, (n, *grid), fill("tokens"))
    _write_npy(out / f"{split}-labels.npy", np.int64, (n,), fill("labels"))
