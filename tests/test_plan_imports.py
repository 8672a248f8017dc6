"""The plan step imports no torch: the headline dry run (6 AR members, composed, validated, described by the
magvit2 sweeper) runs on a login node without torch or torchvision loaded; it is timed (target: under 3 s)."""
from __future__ import annotations

import subprocess
import sys
import time

from conftest import REPO

HEADLINE = ["-m", "factorization=k6_12,k9_9", "model=B,L,XL", "dry_run=true"]
# runs magvit2.train as `python -m` does, and reports at exit which heavy modules the process imported
WRAPPER = """import atexit, runpy, sys
atexit.register(lambda: print("HEAVY=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in
                                                        ("torch", "torchvision", "mlflow"))), file=sys.stderr))
sys.argv = ["magvit2.train", *sys.argv[1:]]
runpy.run_module("magvit2.train", run_name="__main__", alter_sys=True)
"""


def test_headline_dry_run_imports_no_torch(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WRAPPER, *HEADLINE, f"paths.root={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6 members (dry run: nothing trained)" in p.stdout and p.stdout.count(" new ") == 7  # 6 + their tokenizer
    heavy = [ln for ln in p.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert heavy == ["HEAVY="], heavy  # neither torch nor torchvision (nor mlflow) was imported
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()
    print(f"headline dry run: {wall:.2f} s wall (target < 3 s)")
