"""What every mode shares: timing with device syncs, peak memory, FLOPs, a measured matmul peak, hardware facts.

Peak memory: on CUDA torch.cuda.max_memory_allocated above what was allocated before the call. On CPU the peak
resident set (VmHWM, the counter behind getrusage's ru_maxrss) above the RSS before the call, after resetting the
peak through /proc/self/clear_refs; glibc is told to mmap every block >= 128 KiB, so freed tensors leave the RSS and
one measurement does not hide inside memory another one freed.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds per call of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, device: torch.device, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed in rounds A B C, A B C, ... in one process, so a change of load on a
    shared machine hits every contender alike (timing one after the other credited the static cache with a gain
    it does not have). Warm the fns up before (compilation)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of base_time / other_time (> 1: `other` is faster)."""
    return statistics.median(b / o for b, o in zip(base, other))


_MMAP_SET = False


def _cpu_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def peak_memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the call"
    return "CPU peak RSS (VmHWM = getrusage ru_maxrss, reset via /proc/self/clear_refs) above the RSS before the call"


def mmap_large_blocks() -> None:
    """M_MMAP_THRESHOLD = -3: a fixed threshold, no dynamic growth that keeps freed blocks. Set before a mode's first
    step (bench main), else blocks its warm-up steps freed stay resident and a later step's peak hides in them."""
    global _MMAP_SET
    if not _MMAP_SET:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
        _MMAP_SET = True


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak memory that one call of fn() adds (None where it cannot be measured here)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        mmap_large_blocks()
        Path("/proc/self/clear_refs").write_text("5")
        base = _cpu_status("VmRSS")
    except OSError:
        return None
    fn()
    return _cpu_status("VmHWM") - base


def measure(fn, device: torch.device, warmup: int = 1, reps: int = 3) -> dict:
    """{time_s, peak_bytes} of fn(); the memory call also serves as warmup."""
    mem = peak_bytes(fn, device)
    return {"time_s": timeit(fn, device, max(warmup - 1, 0), reps), "peak_bytes": mem}


def count_flops(fn) -> int:
    """FLOPs of one call of fn() as torch.utils.flop_counter counts them (matmuls and convolutions, fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of a large square matmul in `dtype`: the practical peak that MFU is measured against."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = timeit(lambda: a @ b, device, warmup=2, reps=5)
    return 2 * n ** 3 / t


def mfu(flops: float | None, seconds: float, peak: float) -> float | None:
    return flops / seconds / peak if flops and seconds > 0 else None


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None when it can): inductor on CPU builds C++ kernels."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++/clang++); none on PATH"
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    hw = {"device": str(device), "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
          "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0], "gpu": None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        hw.update(gpu=p.name, gpu_memory_bytes=p.total_memory, gpu_count=torch.cuda.device_count())
    return hw


def row(case: str, variant: str, time_s: float | None = None, peak: int | None = None, **extra) -> dict:
    """One measured line: what, which form, seconds per call, peak bytes, plus mode-specific fields."""
    return {"case": case, "variant": variant, "time_s": time_s, "peak_bytes": peak, **extra}


def available_bytes(device: torch.device) -> int:
    """Free memory now: the GPU's free memory, or MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
