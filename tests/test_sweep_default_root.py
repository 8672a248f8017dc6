"""Issue 12.1: the README's sweep commands without `paths.root=` (every other test passes it). paths.root defaults to
${oc.env:MAGVIT2_ROOT,${hydra:runtime.cwd}/outputs} and the submitit launchers' folder is under it, so the launcher
must be set up where ${hydra:...} resolves; it used to crash with "HydraConfig was not set" in all of these."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import TINY

HEADLINE = ["factorization=k6_12,k9_9", "model=B,L,XL"]
MEMBERS = ["k6_12-B", "k6_12-L", "k6_12-XL", "k9_9-B", "k9_9-L", "k9_9-XL"]


def _train(cwd, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    for k in ("MLFLOW_TRACKING_URI", "MAGVIT2_ROOT"):
        if k not in (env or {}):
            e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "magvit2.train", "-m", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def _rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]


# hydra/launcher=slurm with dry_run=true submits nothing, so these need no SLURM cluster (not marked `slurm`).
@pytest.mark.parametrize("launcher,magvit2_root", [
    (["hydra/launcher=slurm", "hydra.launcher.partition=debug"], False),
    (["hydra/launcher=slurm", "hydra.launcher.partition=debug"], True),
    (["hydra/launcher=local"], False),
], ids=["slurm", "slurm-MAGVIT2_ROOT", "local"])
def test_readme_sweep_dry_run_without_paths_root(tmp_path, launcher, magvit2_root):
    root = tmp_path / "elsewhere" if magvit2_root else tmp_path / "outputs"
    p = _train(tmp_path, *HEADLINE, *launcher, "dry_run=true",
               env={"MAGVIT2_ROOT": str(root)} if magvit2_root else None)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "Traceback" not in p.stderr and "HydraConfig was not set" not in p.stderr
    rows = _rows(p.stdout)
    assert [r[1] for r in rows] == MEMBERS, p.stdout
    assert all(r[-1].startswith(str(root / "runs" / "ar")) for r in rows), p.stdout  # the default root was used
    assert not (root / "runs").exists()  # a dry run trains nothing


def test_local_launcher_sweep_without_paths_root_trains(tmp_path):  # ~13 s: one 2-step tiny tokenizer member
    p = _train(tmp_path, *TINY, "stage=tokenizer", "quantizer=lfq", "trainer.tokenizer.steps=2",
               "hydra/launcher=local", timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    out = tmp_path / "outputs"
    st = list((out / "runs" / "tokenizer").glob("*/status.json"))
    assert len(st) == 1 and '"finished"' in st[0].read_text()
    assert any((out / "submitit").iterdir())  # the launcher's folder resolved under the default root
    assert "finished" in p.stdout
