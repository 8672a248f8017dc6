"""One process group per member: inside a SLURM task submitit exports the torch.distributed env, then accelerate
takes over. Outside SLURM, `accelerate launch` / torchrun set the same variables. Never a second launcher."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

RNG_FORMAT = 2  # 1 (unversioned): pickled Python/numpy objects, refused by weights_only loading


def export_slurm_env() -> None:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def make_accelerator(precision: str, grad_accum: int):
    from accelerate import Accelerator
    export_slurm_env()
    cpu = not (torch.cuda.is_available() or _npu_available())
    if cpu and precision == "fp16":
        raise ValueError("precision=fp16 needs a GPU/NPU: use trainer.<stage>.precision=bf16 or no on CPU")
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                       step_scheduler_with_optimizer=False)


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
        return torch.npu.is_available()
    except Exception:
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers only, so checkpoints load with torch.load(weights_only=True)
    (a pickled numpy array or Python object would need the unpickler to run code)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"format": RNG_FORMAT,
          "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                     "gauss": None if gauss is None else float(gauss)},
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    if not isinstance(st, dict) or st.get("format") != RNG_FORMAT:
        raise ValueError(f"RNG state of an unknown format ({type(st).__name__}): written by another magvit2 version")
    py, npy = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
