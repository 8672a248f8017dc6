"""Token shards: the data set's LFQ indices, extracted once with the frozen tokenizer (EMA weights).

Cached by (tokenizer identity, data identity, flip): <paths.cache>/tokens/<key>/{train,val}-r<rank>-<k>.npz holding
the sample index, the (h, w) token grid (int32) and the label. done.json marks a complete extraction. Each process
extracts its slice; readers sort by sample index, so the order does not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from magvit2.data.images import build_dataset
from magvit2.launch.state import atomic_write_text

SHARD = 50_000


def cache_dir(cfg, tokenizer_id: str) -> Path:
    from magvit2.config import data_identity
    key = json.dumps({"tok": tokenizer_id, "data": data_identity(cfg), "flip": bool(cfg.data.hflip_tokens),
                      "seed": cfg.seed}, sort_keys=True, default=str)
    return Path(cfg.paths.cache) / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def extract(cfg, tokenizer, tokenizer_id: str, acc, batch_size: int = 64) -> Path:
    """Run once per (tokenizer, data); later calls return the cached folder at once."""
    out = cache_dir(cfg, tokenizer_id)
    if (out / "done.json").exists():
        return out
    from magvit2.stages.common import RunLock
    lock = RunLock(out) if acc.is_main_process else None
    if lock:
        out.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    acc.wait_for_everyone()
    try:
        if not (out / "done.json").exists():
            counts = {s: _extract_split(cfg, tokenizer, acc, s, out, batch_size) for s in ("train", "val")}
            acc.wait_for_everyone()
            if acc.is_main_process:
                atomic_write_text(out / "done.json", json.dumps({"tokenizer": tokenizer_id, "counts": counts}))
        acc.wait_for_everyone()
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return out


def _extract_split(cfg, tokenizer, acc, split: str, out: Path, batch_size: int) -> int:
    from tqdm.auto import tqdm
    ds = build_dataset(cfg.data, split, cfg.seed)
    mine = list(range(acc.process_index, len(ds), acc.num_processes))
    loader = DataLoader(Subset(ds, mine), batch_size=batch_size, num_workers=cfg.data.num_workers)
    flip = split == "train" and bool(cfg.data.hflip_tokens)
    idx, toks, labels, pos = [], [], [], 0
    for x, y in tqdm(loader, desc=f"tokens ({split})", disable=not acc.is_main_process, mininterval=1.0):
        x = x.to(acc.device)
        ids = [tokenizer.encode(x).indices]
        if flip:
            ids.append(tokenizer.encode(torch.flip(x, dims=[3])).indices)
        for k, t in enumerate(ids):
            n = t.shape[0]
            idx.append(np.asarray(mine[pos:pos + n]) * (2 if flip else 1) + k)
            toks.append(t.cpu().numpy().astype(np.int32))
            labels.append(y.numpy().astype(np.int64))
        pos += x.shape[0]
    idx, toks, labels = np.concatenate(idx), np.concatenate(toks), np.concatenate(labels)
    for k, s in enumerate(range(0, len(idx), SHARD)):
        path = out / f"{split}-r{acc.process_index}-{k:05d}.npz"
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, index=idx[s:s + SHARD], tokens=toks[s:s + SHARD], labels=labels[s:s + SHARD])
        os.replace(tmp, path)
    return int(len(ds) * (2 if flip else 1))


class TokenShards(Dataset):
    """All shards of a split in memory (int32: 1 KB per 16x16 image, ~1.3 GB for ImageNet with flips)."""

    def __init__(self, folder: Path, split: str):
        files = sorted(Path(folder).glob(f"{split}-r*-*.npz"))
        if not files:
            raise FileNotFoundError(f"no {split} token shards in {folder}: the extraction did not finish")
        parts = [np.load(f) for f in files]
        index = np.concatenate([p["index"] for p in parts])
        order = np.argsort(index, kind="stable")
        self.tokens = torch.from_numpy(np.concatenate([p["tokens"] for p in parts])[order])
        self.labels = torch.from_numpy(np.concatenate([p["labels"] for p in parts])[order])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.tokens[i].long(), self.labels[i]
