"""Shared helpers: run `python -m magvit2.train` for real (a subprocess, as a user would) on tiny settings."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# A tokenizer and generator small enough for 2 CPU cores: 16px crops -> 4x4 tokens of 18 bits.
TINY = [
    "tokenizer.resolution=16", "tokenizer.ch=16", "tokenizer.ch_mult=[1,2,2]", "tokenizer.loss.disc_ndf=8",
    "data.scale=64", "data.train_size=256", "data.val_size=20", "data.photos=[astronaut,coffee,chelsea,rocket]",
    "data.num_classes=4", "model.dim=32", "model.n_inter=2", "model.n_intra=1", "model.n_heads=2",
    "trainer.tokenizer.steps=6", "trainer.tokenizer.batch_size=4", "trainer.tokenizer.ckpt_every=2",
    "trainer.tokenizer.eval_every=0", "trainer.ar.steps=6", "trainer.ar.batch_size=8", "trainer.ar.ckpt_every=2",
    "trainer.ar.eval_every=0", "trainer.ar.warmup_steps=2", "tracking.log_every=1", "sampling.per_class=2",
    "metrics.download=false",  # tests never fetch pretrained weights (their metrics are tested as missing or from files)
]


def train_cmd(root: Path, *overrides: str, multirun: bool = False, tiny: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "magvit2.train"] + (["-m"] if multirun else [])
    return cmd + [f"paths.root={root}", *(TINY if tiny else []), *overrides]


def _train_env(env: dict | None) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "1", **(env or {})}
    if "MLFLOW_TRACKING_URI" not in (env or {}):
        e.pop("MLFLOW_TRACKING_URI", None)  # the run's own sqlite store under paths.root
    return e


def _checked(p: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_train(root: Path, *overrides: str, multirun: bool = False, env: dict | None = None, timeout: int = 600,
              check: bool = True, tiny: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cmd(root, *overrides, multirun=multirun, tiny=tiny), cwd=root, env=_train_env(env),
                       capture_output=True, text=True, timeout=timeout)
    return _checked(p, check)


class BackgroundTrain:
    """`run_train` started now and collected later with finish(): independent runs of a test (a reference run and
    the run under test) overlap, since most of a tiny run is interpreter/torch start-up. Same command and env."""

    def __init__(self, root: Path, *overrides: str, multirun: bool = False, env: dict | None = None,
                 tiny: bool = True):
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up
        self.proc = subprocess.Popen(train_cmd(root, *overrides, multirun=multirun, tiny=tiny), cwd=root,
                                     env=_train_env(env), stdout=self._out, stderr=self._err, text=True)

    def finish(self, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._out.seek(0), self._err.seek(0)
        return _checked(subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self._out.read(),
                                                    self._err.read()), check)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_train():
    """start_train(root, *overrides, ...) -> BackgroundTrain; whatever is still running at teardown is killed."""
    started: list[BackgroundTrain] = []

    def start(*args, **kwargs) -> BackgroundTrain:
        started.append(BackgroundTrain(*args, **kwargs))
        return started[-1]

    yield start
    for b in started:
        b.kill()


def kill_after_first_checkpoint(root: Path, stage: str, *overrides: str) -> None:
    """Start a run and SIGKILL it (no chance to clean up) once its first checkpoint of `stage` is on disk."""
    proc = subprocess.Popen(train_cmd(root, *overrides), cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((root / "runs" / stage).glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None, "run ended before its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def load_ckpt(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)  # as the code loads it


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path


# pytest-xdist (2 workers, pyproject's addopts): tests are sent to the workers one module at a time, as a module's
# tests share its fixtures (test_experiments' root: later tests read what earlier ones trained), and every module that
# uses the local SLURM cluster goes to one worker, first (they share the cluster, test_multinode restarts it with two
# nodes, and together they are the longest unit). xdist's own --dist loadgroup cannot do this with pytest 9.2: it
# renames Item._nodeid, which pytest no longer reads.
SLURM_MODULES = {f.stem for f in Path(__file__).parent.glob("test_*.py")
                 if re.search(r"^pytestmark = .*pytest\.mark\.slurm", f.read_text(), re.M)}


def pytest_collection_modifyitems(config, items):
    stray = [i.nodeid for i in items if i.get_closest_marker("slurm") and i.path.stem not in SLURM_MODULES]
    if stray:
        raise pytest.UsageError(f"{stray[0]}: mark a SLURM test module-wide (pytestmark = pytest.mark.slurm), so "
                                f"tests/conftest.py keeps it with the others on one xdist worker")
    items.sort(key=lambda i: i.path.stem not in SLURM_MODULES)  # stable: the SLURM modules first, order kept


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if Path(module).stem in SLURM_MODULES else module
    return ByModule(config, log)
