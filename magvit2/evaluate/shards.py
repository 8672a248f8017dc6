"""Sampling split over processes, without a process group: shards of fixed item ranges, one file each.

Items are (class, index) pairs in class-major order; shard k holds items [k * size, (k + 1) * size) and belongs to
rank k % world. A shard is drawn as the same batches by whichever rank draws it, and each item from its own seed,
so the union does not depend on the world size. Files are written atomically: one that exists is whole, and a
rerun skips it. No collective is needed: the last rank to finish merges (under a file lock), so ranks that take
hours longer than others never hit a barrier timeout.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magvit2.errors import ConfigError
from magvit2.runs import atomic_write, atomic_write_text, read_json


def rank_world() -> tuple[int, int, str]:
    """(rank, world size, where they came from): torchrun / accelerate launch, else a SLURM job step, else 1."""
    e = os.environ
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if w in e:
            rank, world = int(e.get(r, "0")), int(e[w])
            if not 0 <= rank < world:
                raise ConfigError(f"{r}={rank} is not in [0, {w}={world})")
            return rank, world, f"{r}/{w}"
    return 0, 1, "one process"


def local_device():
    import torch
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return torch.device("cuda", local % torch.cuda.device_count())


def join_process_group(world: int) -> bool:
    """The torch.distributed group of a launch with world > 1, for metrics summed over ranks (torchmetrics syncs
    its states in compute()): torchrun / accelerate launch set MASTER_ADDR / PORT, submitit derives them in a SLURM
    job step. -> whether this call created it (then destroy it at the end)."""
    import torch
    import torch.distributed as dist
    if world == 1 or dist.is_initialized():
        return False
    from magvit2.runtime.dist import export_slurm_env
    export_slurm_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())  # NCCL gathers on this rank's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


@dataclass(frozen=True)
class Shard:
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.start:07d}-{self.stop:07d}.npz"


def plan(n_items: int, size: int) -> list[Shard]:
    return [Shard(s, min(s + size, n_items)) for s in range(0, n_items, size)]


def pin_settings(out: Path, settings: dict) -> None:
    """settings.json of an output folder: written by the first process, compared by every later one, so shards drawn
    with other settings are never merged with these."""
    path = out / "settings.json"
    have = read_json(path)
    if have is None:
        atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))
        return
    diff = sorted(k for k in settings.keys() | have.keys() if settings.get(k) != have.get(k))
    if diff:
        raise ConfigError(f"--out {out} holds samples drawn with other settings ({', '.join(diff)}: "
                          f"{[have.get(k) for k in diff]} there, {[settings.get(k) for k in diff]} now): give "
                          f"another --out, or leave --out out (each setting gets its own folder)")


def write(out: Path, shard: Shard, images: np.ndarray) -> None:
    atomic_write(out / shard.name, lambda f: np.savez(f, images=images), "wb")


def done(out: Path, shards: list[Shard]) -> list[Shard]:
    return [s for s in shards if (out / s.name).exists()]


def images(out: Path, shards: list[Shard], size: int):
    """Each shard's (n, size, size, 3) images in item order, one shard in memory at a time; a shard of the wrong
    length or image size is named (a truncated or foreign file)."""
    for s in shards:
        with np.load(out / s.name) as z:
            a = z["images"]
        if a.shape != (s.stop - s.start, size, size, 3):
            raise ConfigError(f"{out / s.name} holds images {a.shape}, not {(s.stop - s.start, size, size, 3)}: "
                              f"delete it and run again to redraw it")
        yield a
