"""`python -m magvit2.bench [MODE ...] [--device cpu|cuda] [--dtype fp32|bf16] [--size S] [--out FILE.json] [--quick]`

Throughput of the hot paths on this hardware, each comparison side by side in one run; a table on stdout and, with
--out, JSON with the hardware, torch version, peak memory (and how it was measured), FLOPs and MFU against a matmul
peak measured here in the same dtype. Modes: lfq, tokenizer, ar-train, ar-sample, data, loop (one module each);
none given = all of them at --quick sizes. Nothing here is a pass/fail test.

torch + einops only (it runs on a bare GPU image); `data` and `loop` use the project's data package and checkpoint
writer, which need omegaconf: without it they are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import ar_sample, ar_train, data, lfq, loop, tokenizer
from .common import DTYPES, hardware, matmul_peak, mmap_large_blocks, peak_memory_method

MODES = {"lfq": lfq, "tokenizer": tokenizer, "ar-train": ar_train, "ar-sample": ar_sample, "data": data, "loop": loop}
EXTRA = ("speedup", "vs_kv_cache", "rounds", "memory_ratio", "rel_diff_values", "rel_diff_grad", "rel_diff_loss",
         "identical_to_plain",
         "overhead", "max_k", "per_worker", "prob_sum_error", "per_step_at_ckpt_every", "bytes", "saved_bytes", "note")


def _fmt(v, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if key in ("bytes",) or key.endswith("_bytes"):
        return f"{v / 2**20:.1f} MiB"
    if key in ("overhead", "mfu", "per_step_at_ckpt_every"):
        return f"{100 * v:.1f}%"
    if key == "time_s":
        return f"{v * 1e3:.1f} ms" if v < 10 else f"{v:.1f} s"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table(results: dict) -> str:
    lines = []
    for mode, res in results["modes"].items():
        if "skipped" in res:
            lines.append(f"{mode:<10} skipped: {res['skipped']}")
            continue
        for r in res["rows"]:
            thr = f"{_fmt(r['throughput'])} {r['unit']}" if r.get("throughput") else "-"
            extra = ", ".join(f"{k}={_fmt(r[k], k)}" for k in EXTRA if r.get(k) is not None)
            lines.append(f"{mode:<10} {r['case']:<34} {r['variant']:<26} {_fmt(r.get('time_s'), 'time_s'):>10} "
                         f"{thr:>18} {_fmt(r.get('peak_bytes'), 'peak_bytes'):>12} "
                         f"{'MFU ' + _fmt(r['mfu'], 'mfu') if r.get('mfu') else '':>10}  {extra}")
        summary = {k: v for k, v in res.get("summary", {}).items() if v is not None}
        lines.append(f"{'':<10} " + ", ".join(f"{k}: {_fmt(v)}" for k, v in summary.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("modes", nargs="*", choices=[[], *MODES], metavar="MODE", help=f"any of {', '.join(MODES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--size", default=None, help="tokenizer: tiny|128-L|256-L; ar-*: tiny|B|L|XL")
    ap.add_argument("--quick", action="store_true", help="small sizes (the default when no mode is named)")
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, one repetition: checks that every mode "
                    "runs (the tests); its numbers mean nothing")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile / CUDA-graph variants")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    quick = a.quick or a.smoke or not a.modes
    torch.manual_seed(0)
    if device.type == "cpu":
        try:
            mmap_large_blocks()
        except OSError:  # no glibc: peak_bytes reports None
            pass
    peak = matmul_peak(device, dtype, 256 if a.smoke else None)
    results = {"hardware": hardware(device), "torch": torch.__version__, "python": sys.version.split()[0],
               "dtype": str(dtype).removeprefix("torch."), "quick": quick, "smoke": a.smoke,
               "peak_memory_method": peak_memory_method(device), "matmul_peak_flops": peak, "modes": {}}
    print(f"magvit2.bench on {results['hardware']['gpu'] or results['hardware']['cpu']} "
          f"({results['hardware']['cpu_cores']} cores, {torch.get_num_threads()} threads, load "
          f"{results['hardware']['load_avg_1m']:.1f}), torch {torch.__version__}, {results['dtype']}, "
          f"matmul peak {peak / 1e9:,.0f} GFLOP/s", flush=True)
    for mode in a.modes or list(MODES):
        try:
            res = MODES[mode].run(device, dtype, quick, size=a.size, compile_on=not a.no_compile, matmul_peak=peak,
                                    smoke=a.smoke)
        except ImportError as e:  # data / loop without the project's full install
            res = {"skipped": f"needs {e.name or e} ({e})"}
        results["modes"][mode] = res
        print(table({"modes": {mode: res}}), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {a.out}")
    return 0
