"""The benchmark runs with torch + einops alone, reports every mode, and writes the JSON fields it promises (the
numbers themselves are not asserted: timings belong to the benchmark, not the tests)."""
import json
import subprocess
import sys

from conftest import REPO

from magvit2 import bench

GUARD = ("import sys, builtins; real = builtins.__import__\n"
         "def guard(name, *a, **k):\n"
         "    if name.split('.')[0] in ('hydra', 'mlflow', 'submitit', 'accelerate', 'omegaconf'):\n"
         "        raise ImportError('bench must not import ' + name, name=name)\n"
         "    return real(name, *a, **k)\n"
         "builtins.__import__ = guard\n"
         "from magvit2 import bench; sys.exit(bench.main(sys.argv[1:]))")


def _rows(res: dict, mode: str) -> dict:
    return {(r["case"], r["variant"]): r for r in res["modes"][mode]["rows"]}


def test_bench_runs_every_mode_without_the_training_stack(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-c", GUARD, "--smoke", "--no-compile", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["hardware"]["cpu"] and res["hardware"]["cpu_cores"] >= 1 and res["torch"] == bench.torch.__version__
    assert "VmHWM" in res["peak_memory_method"] and res["matmul_peak_flops"] > 0
    lfq = _rows(res, "lfq")
    dense = lfq[("N=256 K=10", "dense")]
    assert dense["rel_diff_values"] < 1e-4 and dense["speedup"] > 0 and "memory_ratio" in dense
    assert res["modes"]["lfq"]["summary"]["max_k"] == 12
    for mode in ("tokenizer", "ar-train"):
        eager = next(r for r in res["modes"][mode]["rows"] if r["variant"] == "eager")
        assert eager["flops"] > 0 and eager["mfu"] > 0 and eager["time_s"] > 0
        assert "skipped" in next(r for r in res["modes"][mode]["rows"] if r["variant"] == "compile")["note"]
    train = _rows(res, "ar-train")  # activation checkpointing beside eager: same loss, fewer kept activations
    eager, ckpt = (train[("tiny batch 16 T=64", v)] for v in ("eager", "checkpointed"))
    assert ckpt["time_s"] > 0 and ckpt["peak_bytes"] > 0 and ckpt["memory_ratio"] > 0 and ckpt["speedup"] > 0
    assert ckpt["rel_diff_loss"] == 0  # its gradients are eager's: the second step's loss is the same to the bit
    assert 0 < ckpt["saved_bytes"] < eager["saved_bytes"] / 2
    sample = res["modes"]["ar-sample"]["rows"]
    assert all(r["identical_to_plain"] for r in sample if r.get("time_s"))
    assert {r["variant"] for r in sample if r.get("time_s")} == {"plain loop", "KV cache", "static cache"}
    for mode in ("data", "loop"):  # the project's data package and checkpoint writer need omegaconf
        assert "omegaconf" in res["modes"][mode]["skipped"]
    assert "ar-sample" in p.stdout and "skipped" in p.stdout


def test_data_and_loop_modes_report_rates_overhead_and_checkpoint_stall(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["data", "loop", "--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    data = res["modes"]["data"]["rows"]
    assert any(r["variant"] == "0 workers" and r["per_worker"] > 0 for r in data)
    assert any("skipped: no CUDA" in (r.get("note") or "") for r in data)  # the GPU decode is named, not dropped
    loop = _rows(res, "loop")
    assert loop[("tokenizer tiny batch 16", "loop step (no checkpoint)")]["overhead"] is not None
    stalls = [r for r in loop.values() if r["variant"] == "RunDir.save stall"]
    assert len(stalls) == 2 and all(r["time_s"] > 0 and r["bytes"] > 0 for r in stalls)


def test_console_entry_and_module_entry_agree():
    p = subprocess.run([sys.executable, "-m", "magvit2.bench", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "ar-sample" in p.stdout and "--out" in p.stdout
