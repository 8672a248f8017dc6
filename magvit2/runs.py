"""A run dir, `<paths.runs>/<stage>/<signature>`, and everything that knows its layout (after dora's `XP`).

checkpoint.pt            the latest checkpoint (atomic: a crash leaves the previous one whole)
rng-<rank>-<step>.pt     every rank's RNG state at that checkpoint (rank 0's is also inside checkpoint.pt)
status.json              {state: new|partial|running|finished|failed|preempted, step, metrics, slurm_job_id, ...}
config.yaml, results.json  the resolved config; the final metrics
<run dir>.lock           one process trains a run dir at a time
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """The job as squeue and sacct name it: `<array job>_<task>` in a job array, else the job id ('' outside)."""
    e = os.environ
    if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
    return e.get("SLURM_JOB_ID", "")


def atomic_write(path: Path, write, mode: str = "w") -> None:
    """write(f) into a temp file next to `path`, fsync, rename over it: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


class FileLock:
    """An flock on `<path>.lock`, shared by every process that sees the file system (a sweep's jobs)."""

    def __init__(self, path: Path):
        self.path = Path(str(path) + ".lock")
        self.fd = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = open(self.path, "w")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for {self.path.parent.name}/{self.path.stem}: another process is working on it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()
        self.fd = None


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def of(cls, cfg, stage: str | None = None) -> "RunDir":
        """The run dir of `cfg`'s run of `stage` (default cfg.stage), from its signature."""
        from magvit2 import config as C
        return cls(C.run_dir(cfg, stage))

    @classmethod
    def find(cls, runs: Path, stage: str, signature: str) -> "RunDir | None":
        """The finished run of `stage` with this signature under `runs` (paths.runs), else None."""
        rd = cls(Path(runs) / stage / signature)
        return rd if rd.finished() else None

    @classmethod
    def finished_runs(cls, runs: Path, stage: str) -> list["RunDir"]:
        """Every finished run of `stage` under `runs`, by signature."""
        d = Path(runs) / stage
        return [rd for p in sorted(d.iterdir() if d.is_dir() else []) if (rd := cls(p)).finished()]

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # every path ------------------------------------------------------------------------------------------------
    signature = property(lambda self: self.path.name)
    stage = property(lambda self: self.path.parent.name)
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    status = property(lambda self: self.path / "status.json")
    config = property(lambda self: self.path / "config.yaml")
    results = property(lambda self: self.path / "results.json")

    def rng(self, rank: int, step: int) -> Path:
        # one file per rank and step: a crash between a rank's RNG file and rank 0's checkpoint rename must not
        # leave the checkpoint paired with another step's RNG state
        return self.path / f"rng-{rank}-{step}.pt"

    def lock(self) -> FileLock:
        return FileLock(self.path)

    # status ----------------------------------------------------------------------------------------------------
    def read_status(self) -> dict:
        st = read_json(self.status, None)
        if st is None:
            st = {"state": "partial" if self.checkpoint.exists() else "new", "step": 0, "metrics": {}}
        return st

    def write_status(self, **fields) -> dict:
        st = self.read_status()
        st.update(fields, host=socket.gethostname(), updated=time.strftime("%Y-%m-%d %H:%M:%S"))
        if os.environ.get("SLURM_JOB_ID"):
            st["slurm_job_id"] = slurm_job_id()
        atomic_write_text(self.status, json.dumps(st, indent=1, default=str))
        return st

    def finished(self) -> dict | None:
        """The status of a finished run, else None."""
        st = self.read_status()
        return st if st["state"] == "finished" else None

    def write_config(self, cfg) -> None:
        from omegaconf import OmegaConf
        OmegaConf.save(cfg, self.config, resolve=True)

    def write_results(self, results: dict) -> None:
        self.results.write_text(json.dumps(results, indent=1, default=str))

    # checkpoint + RNG ------------------------------------------------------------------------------------------
    def save(self, step: int, payload: dict, rank: int = 0, barrier=lambda: None) -> None:
        """Atomic checkpoint: every rank's RNG file, then (after `barrier`, all ranks) rank 0's checkpoint renamed
        over the old one, then the RNG files of older steps go. Call on every rank."""
        import torch

        from magvit2.checkpoint import rng_state
        rng, rng_path = rng_state(), self.rng(rank, step)
        atomic_write(rng_path, lambda f: torch.save(rng, f), "wb")
        barrier()
        if rank == 0:
            payload = {**payload, "step": step, "rng": rng, "signature": self.signature}
            atomic_write(self.checkpoint, lambda f: torch.save(payload, f), "wb")
            self.write_status(state="running", step=step)
        barrier()
        for old in self.path.glob(f"rng-{rank}-*.pt"):  # the checkpoint now points past them
            if old != rng_path:
                old.unlink(missing_ok=True)

    def load(self, path: Path | None = None, fix: str = "delete the run dir to train this run again (run dirs of "
             "an older magvit2 hold pickled RNG state, which is not loaded)") -> dict:
        """A file of this run dir (default the checkpoint), loaded as tensors and plain values only."""
        from magvit2 import checkpoint
        return checkpoint.load(path or self.checkpoint, f"run dir {self.path}", fix)

    def load_rng(self, rank: int, ckpt: dict) -> dict:
        """This rank's RNG state at `ckpt` (rank 0's, inside the checkpoint, if its own file is missing)."""
        path = self.rng(rank, int(ckpt["step"]))
        if path.exists():
            return self.load(path)
        if rank > 0:
            log.warning(f"{path.name} missing: rank {rank} resumes with rank 0's RNG state")
        return ckpt["rng"]
