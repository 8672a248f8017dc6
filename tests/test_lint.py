"""ruff (pyproject's [tool.ruff]: pyflakes and syntax errors) finds nothing in the repository."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    exe = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert exe, "ruff is not installed: it is in .ci/requirements.txt and the test extra"
    p = subprocess.run([exe, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
