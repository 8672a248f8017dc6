"""One process group per member: inside a SLURM task submitit exports the torch.distributed env, then accelerate
takes over. Outside SLURM, `accelerate launch` / torchrun set the same variables. Never a second launcher."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


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
