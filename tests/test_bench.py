"""The benchmark entry runs with torch + einops alone and reports every hot path (numbers are not asserted)."""
import subprocess
import sys

from conftest import REPO


def test_bench_runs_and_reports_each_path():
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('hydra', 'mlflow', 'submitit', 'accelerate', 'omegaconf'):\n"
            "        raise ImportError('bench must not import ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from magvit2 import bench; sys.exit(bench.main([]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for needle in ("LFQ entropy fwd+bwd N=4096 K=18", "tokenizer tiny fwd+bwd", "AR tiny train step",
                   "KV cache", "no cache"):
        assert needle in p.stdout, p.stdout
