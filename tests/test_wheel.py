"""A plain (non-editable) `pip install` of a wheel works away from the checkout: conf/, experiments/ and the report
notebook ship inside the package (magvit2/_conf, _experiments, _analysis) and magvit2.resources finds them there.

The wheel is built offline (no build isolation) from a copy of the checkout's files (tracked + untracked, not ignored:
what `pip install .` in a clean checkout sees; no stale build/ dir), installed with --no-deps into a fresh venv whose
only other path is this interpreter's site-packages through a .pth line. A .pth line adds the folder without
processing the .pth files in it, so the editable install's finder there stays inactive and magvit2 comes only from
the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _sh(cmd: list, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def _checkout_copy(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():  # a tracked file being moved away right now is skipped
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(python of a fresh venv with the wheel installed, its env, a cwd outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from its tracked + untracked files)")
    src = _checkout_copy(tmp / "src")
    _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp / "dist", "."], cwd=src)
    (wheel,) = (tmp / "dist").glob("magvit2-*.whl")
    _sh([sys._base_executable, "-m", "venv", "--without-pip", tmp / "venv"], cwd=tmp)
    py = tmp / "venv" / "bin" / "python"
    site = Path(_sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    (site / "_magvit2_test_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, hydra, ... only
    _sh([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI",
                                                            "MAGVIT2_ROOT")}
    env.update(OMP_NUM_THREADS="2", HYDRA_FULL_ERROR="1", PYTHONNOUSERSITE="1")
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return py, env, cwd


def test_imports_from_the_wheel(venv):
    py, env, cwd = venv
    out = _sh([py, "-c", "import magvit2, hydra_plugins.magvit2 as h; from magvit2 import resources as r; "
               "print(magvit2.__file__, h.__file__, r.conf_dir(), r.experiments_dir(), r.report_notebook(), sep='\\n')"],
              cwd=cwd, env=env).stdout.split()
    venv_dir = py.parent.parent
    for p in map(Path, out):
        assert p.is_relative_to(venv_dir) and not p.is_relative_to(REPO), f"{p} is not from the wheel in {venv_dir}"
        assert p.exists(), p
    assert (Path(out[2]) / "config.yaml").is_file() and (Path(out[3]) / "experiment" / "factorization.yaml").is_file()


def test_cfg_job(venv):
    py, env, cwd = venv
    out = _sh([py, "-m", "magvit2.train", "--cfg", "job"], cwd=cwd, env=env).stdout
    assert "tokenizer:" in out and "factorization:" in out, out[-2000:]


def test_dry_run(venv):
    py, env, cwd = venv
    out = _sh([py, "-m", "magvit2.train", f"paths.root={cwd / 'out'}", "dry_run=true"], cwd=cwd, env=env).stdout
    assert "dry run" in out, out[-2000:]


def test_experiment_multirun_dry_run(venv):
    py, env, cwd = venv
    out = _sh([py, "-m", "magvit2.train", "-m", "+experiment=factorization", f"paths.root={cwd / 'out-m'}",
               "dry_run=true"], cwd=cwd, env=env).stdout
    assert "k2_4_6_6" in out and "k9_9" in out, out[-2000:]  # members from experiments/experiment/factorization.yaml


def test_wheel_carries_license_and_typing_marker(venv):
    py, env, cwd = venv
    out = _sh([py, "-c", "import importlib.metadata as m, magvit2, pathlib; d = m.distribution('magvit2'); "
               "print(d.metadata['License-Expression']); print(any(f.name == 'LICENSE' for f in d.files)); "
               "print((pathlib.Path(magvit2.__file__).parent / 'py.typed').is_file())"], cwd=cwd, env=env).stdout
    assert out.split() == ["Apache-2.0", "True", "True"], out
