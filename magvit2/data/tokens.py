"""AR input tokens: the data set's LFQ indices under the frozen tokenizer.

`tokens=online` (the original's): every training step takes train crops through GlobalBatchSampler ((epoch, j)
keys, so `data.crops` applies) and encodes them with the frozen tokenizer (eval mode, no grad) on the accelerator's
device. `tokens=cached` (LlamaGen's faster practice, ten-crop + flip): C = tokens.crops crops per train image (crop c
of image j is the crop the data set gives key (c, j), i.e. the one of epoch c) and, with tokens.flips, their
horizontal flips: V = C x (2 if flips else 1) variants extracted once; key (epoch, j) reads variant v of image j,
drawn from (seed, epoch, j). Validation tokens (center / fixed-grid crops) are extracted once in both modes.

Cache: <paths.cache>/tokens/<key>/{train,val}-r<rank>-<k>.npz, key = (tokenizer identity, data identity, tokens
config, seed); online caches only val. A shard holds the storage index (j * V + v), the (h, w) token grid (int32)
and the label; done.json marks a complete extraction. Each process extracts its slice; readers sort by index, so
the order does not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from magvit2.config import data_identity

from magvit2.errors import ConfigError
from magvit2.data.images import split_key
from magvit2.runs import FileLock, atomic_write_text

SHARD = 50_000


def tokens_cfg(cfg) -> dict:
    """The tokens group as a plain dict: {name: online} or {name: cached, crops: C, flips: bool}."""
    t = cfg.get("tokens") or {"name": "online"}
    if t["name"] == "online":
        return {"name": "online"}
    if t["name"] != "cached":
        raise ConfigError(f"tokens={t['name']!r}: use tokens=online (the original's) or tokens=cached")
    if not isinstance(t["crops"], int) or t["crops"] < 1:
        raise ConfigError(f"tokens.crops={t['crops']!r} must be a positive integer (crops per train image)")
    if t["crops"] > 1 and cfg.data.get("crops", "per_epoch") == "fixed":
        raise ConfigError(f"tokens.crops={t['crops']} with data.crops=fixed gives {t['crops']} identical crops: "
                          f"use data.crops=per_epoch or tokens.crops=1")
    return {"name": "cached", "crops": int(t["crops"]), "flips": bool(t["flips"])}


def variants(cfg) -> int:
    t = tokens_cfg(cfg)
    return t["crops"] * (2 if t["flips"] else 1) if t["name"] == "cached" else 0


def cache_dir(cfg, tokenizer_id: str) -> Path:
    key = json.dumps({"tok": tokenizer_id, "data": data_identity(cfg), "tokens": tokens_cfg(cfg), "seed": cfg.seed},
                     sort_keys=True, default=str)
    return Path(cfg.paths.cache) / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def encode(tokenizer, x: torch.Tensor) -> torch.Tensor:
    """Token grids (B, h, w) of images in [-1, 1]. Eval mode: the quantizer neither tracks VQ code usage (a buffer
    update) nor all-reduces LFQ statistics across processes."""
    tokenizer.eval()
    return tokenizer.encode(x).indices


@torch.no_grad()
def extract(cfg, tokenizer, tokenizer_id: str, acc, batch_size: int = 64) -> Path:
    """Run once per (tokenizer, data, tokens config); later calls return the cached folder at once."""
    out = cache_dir(cfg, tokenizer_id)
    if (out / "done.json").exists():
        return out
    lock = FileLock(out) if acc.is_main_process else None
    if lock:
        out.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    acc.wait_for_everyone()
    try:
        if not (out / "done.json").exists():
            splits = ("train", "val") if variants(cfg) else ("val",)
            counts = {s: _extract_split(cfg, tokenizer, acc, s, out, batch_size) for s in splits}
            acc.wait_for_everyone()
            if acc.is_main_process:
                atomic_write_text(out / "done.json", json.dumps({"tokenizer": tokenizer_id, "counts": counts,
                                                                 "tokens": tokens_cfg(cfg)}))
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


def _extract_split(cfg, tokenizer, acc, split: str, out: Path, batch_size: int) -> int:
    from tqdm.auto import tqdm
    from magvit2.build import build_dataset  # the one builder (it imports this module: import here)
    ds = build_dataset(cfg.data, split, cfg.seed)
    t = tokens_cfg(cfg)
    crops, flips = (t["crops"], t["flips"]) if split == "train" else (1, False)
    F = 2 if flips else 1
    V = crops * F
    mine = list(range(acc.process_index, len(ds), acc.num_processes))
    idx, toks, labels = [], [], []
    for c in range(crops):
        loader = DataLoader(_Keys(ds, [(c, j) for j in mine]), batch_size=batch_size,
                            num_workers=cfg.data.num_workers)
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
        path = out / f"{split}-r{acc.process_index}-{k:05d}.npz"
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, index=idx[s:s + SHARD], tokens=toks[s:s + SHARD], labels=labels[s:s + SHARD])
        os.replace(tmp, path)
    return int(len(ds) * V)


class TokenShards(Dataset):
    """All shards of a split in memory (int32: 1 KB per 16x16 grid, ~13 GB for ImageNet with 5 crops x flip).

    tokens: (n, V, h, w). Key j -> variant 0 of image j (val); key (epoch, j) -> a variant drawn from (seed, epoch,
    j), so every epoch sees another crop / flip of each image and a resumed run the same one."""

    def __init__(self, folder: Path, split: str, n_variants: int = 1, seed: int = 0):
        files = sorted(Path(folder).glob(f"{split}-r*-*.npz"))
        if not files:
            raise FileNotFoundError(f"no {split} token shards in {folder}: the extraction did not finish")
        parts = [np.load(f) for f in files]
        order = np.argsort(np.concatenate([p["index"] for p in parts]), kind="stable")
        tokens = torch.from_numpy(np.concatenate([p["tokens"] for p in parts])[order])
        self.tokens = tokens.view(-1, n_variants, *tokens.shape[1:])
        self.labels = torch.from_numpy(np.concatenate([p["labels"] for p in parts])[order][::n_variants])
        self.V, self.seed = n_variants, seed

    def __len__(self):
        return len(self.labels)

    def variant(self, epoch: int, j: int) -> int:
        return random.Random(f"variant:{self.seed}:{epoch}:{j}").randrange(self.V) if self.V > 1 else 0

    def __getitem__(self, key):
        epoch, j = split_key(key)
        v = self.variant(epoch, j) if isinstance(key, (tuple, list)) else 0
        return self.tokens[j, v].long(), self.labels[j]


def train_input(cfg, tokenizer, folder: Path, device):
    """-> (train data set for GlobalBatchSampler, fn: a loader batch's first item -> token grids on device)."""
    from magvit2.build import build_dataset, build_token_dataset
    if variants(cfg):
        return build_token_dataset(cfg, folder, "train"), lambda tok: tok.to(device)
    return build_dataset(cfg.data, "train", cfg.seed), lambda x: encode(tokenizer, x.to(device))
