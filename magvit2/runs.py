"""A run dir, `<paths.runs>/<stage>/<signature>`, and everything that knows its layout (after dora's `XP`).

checkpoint.pt            the latest checkpoint (atomic: a crash leaves the previous one whole)
checkpoint.prev.pt       the one before it, kept while the run trains: a resume falls back to it when checkpoint.pt
                         does not load (truncated by a crash or a disk error); removed when the run finishes
rng-<rank>-<step>.pt     every rank's RNG state at those two checkpoints (rank 0's is also inside the checkpoint)
metrics.jsonl            MLflow writes spooled while the tracking server was unreachable (magvit2.tracking)
.<name>.tmp-<pid>-*      a write in progress; one left by a killed writer is removed when the run dir is next opened
status.json              {state: new|partial|running|finished|failed|diverged|preempted, step, metrics, ...}
config.yaml, results.json  the resolved config; the final metrics
<run dir>.lock           one process trains a run dir at a time
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from magvit2.errors import ConfigError, StorageError
from magvit2.tempfiles import mkstemp

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """The job as squeue and sacct name it: `<array job>_<task>` in a job array, else the job id ('' outside)."""
    e = os.environ
    if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
    return e.get("SLURM_JOB_ID", "")


_ROOT_SETTING = "paths.root (or MAGVIT2_ROOT)"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(e: OSError, path) -> OSError:
    """A full disk or a read-only folder as a StorageError (one line: the path and the setting to change); any other
    OSError as it is."""
    if e.errno in _FULL:
        return StorageError(f"no space left to write {path} ({os.strerror(e.errno)}): free space on that file "
                            f"system or point {_ROOT_SETTING} at a disk with room; the run can then be started again "
                            f"and resumes from its last checkpoint")
    if e.errno in _READ_ONLY:
        return StorageError(f"cannot write {path} ({os.strerror(e.errno)}): training writes its run dir under "
                            f"{_ROOT_SETTING}; point it at a writable folder (finished runs can still be read where "
                            f"they are)")
    return e


def tmp_prefix(path: Path) -> str:
    """Prefix of the temp files of a write to `path` in progress: `.<name>.tmp-<pid>-`."""
    return f".{Path(path).name}.tmp-{os.getpid()}-"


def atomic_write(path: Path, write, mode: str = "w", keep_old: Path | None = None) -> None:
    """write(f) into a temp file next to `path`, fsync, rename over it: readers see the old file or the new one
    (keep_old: the old file is first renamed to it). The temp file goes on any failure; a full disk or a read-only
    folder raises StorageError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp(path.parent, tmp_prefix(path))  # 0666 less the umask, as open() would
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if keep_old is not None and path.exists():
                os.replace(path, keep_old)
            os.replace(tmp, path)
            tmp = None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        err = storage_error(e, path)
        if err is e:
            raise
        raise err from e
    except RuntimeError as e:  # torch.save reports a full disk as RuntimeError("... error code: 28 ...")
        if re.search(r"No space left on device|error code: 28\b|errno 28\b", str(e), re.I):
            raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return default


class FileLock:
    """An flock on `<path>.lock`, shared by every process that sees the file system (a sweep's jobs)."""

    def __init__(self, path: Path):
        self.path = Path(str(path) + ".lock")
        self.fd = None

    def __enter__(self) -> "FileLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = open(self.path, "a")
        except OSError as e:  # a read-only root: one line naming paths.root, not a traceback
            err = storage_error(e, self.path)
            if err is e:
                raise
            raise err from e
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
        self.unreadable = False  # load_resume skipped an unreadable checkpoint.pt

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
        return [rd for p in sorted(d.iterdir() if d.is_dir() else []) if p.is_dir() and (rd := cls(p)).finished()]

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # every path ------------------------------------------------------------------------------------------------
    signature = property(lambda self: self.path.name)
    stage = property(lambda self: self.path.parent.name)
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    prev_checkpoint = property(lambda self: self.path / "checkpoint.prev.pt")
    spool = property(lambda self: self.path / "metrics.jsonl")
    status = property(lambda self: self.path / "status.json")
    config = property(lambda self: self.path / "config.yaml")
    results = property(lambda self: self.path / "results.json")

    def rng(self, rank: int, step: int) -> Path:
        # one file per rank and step: a crash between a rank's RNG file and rank 0's checkpoint rename must not
        # leave the checkpoint paired with another step's RNG state
        return self.path / f"rng-{rank}-{step}.pt"

    def lock(self) -> FileLock:
        return FileLock(self.path)

    def clean_tmp_of_this_process(self) -> None:
        """Remove what a failed write of this process left (atomic_write removes its own; this is the net)."""
        for p in self.path.glob(f".*.tmp-{os.getpid()}-*") if self.path.is_dir() else []:
            p.unlink(missing_ok=True)

    def has_checkpoint(self) -> bool:
        return self.checkpoint.exists() or self.prev_checkpoint.exists()

    def clean_tmp(self) -> list[Path]:
        """Remove the temp files of writes that never finished (a killed or failed writer). Call holding the lock:
        no other process then writes here."""
        gone = []
        for p in self.path.glob(".*.tmp-*") if self.path.is_dir() else []:
            try:
                p.unlink()
                gone.append(p)
            except OSError as e:
                log.warning(f"could not remove the stale temp file {p}: {e}")
        if gone:
            log.info(f"removed {len(gone)} temp file(s) of an unfinished write in {self.path}: "
                     f"{', '.join(p.name for p in gone)}")
        return gone

    # status ----------------------------------------------------------------------------------------------------
    def read_status(self) -> dict:
        st = read_json(self.status, None)
        if st is None:
            st = {"state": "partial" if self.has_checkpoint() else "new", "step": 0, "metrics": {}}
        return st

    def write_status(self, **fields) -> dict:
        st = self.read_status()
        now = time.time()  # updated: for people; updated_s: epoch seconds, for wall times below 1 s resolution
        st.update(fields, host=socket.gethostname(), updated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                  updated_s=now)
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
        atomic_write_text(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    def write_results(self, results: dict) -> None:
        atomic_write_text(self.results, json.dumps(results, indent=1, default=str))

    # checkpoint + RNG ------------------------------------------------------------------------------------------
    def save(self, step: int, payload: dict, rank: int = 0, barrier=lambda: None) -> None:
        """Atomic checkpoint: every rank's RNG file, then (after `barrier`, all ranks) rank 0's checkpoint written
        to a temp file, the old checkpoint renamed to checkpoint.prev.pt and the new one renamed into place, then the
        RNG files of steps older than those two go. Call on every rank. A full disk raises StorageError naming the
        file; the temp file is removed and the checkpoints on disk stay as they were."""
        import torch

        from magvit2.checkpoint import rng_state
        rng, rng_path = rng_state(), self.rng(rank, step)
        atomic_write(rng_path, lambda f: torch.save(rng, f), "wb")
        barrier()
        if rank == 0:
            payload = {**payload, "step": step, "rng": rng, "signature": self.signature}
            # the old checkpoint becomes checkpoint.prev.pt just before the new one is renamed into place: at every
            # moment checkpoint.pt or checkpoint.prev.pt is a whole checkpoint (load_resume tries both)
            atomic_write(self.checkpoint, lambda f: torch.save(payload, f), "wb", keep_old=self.prev_checkpoint)
            self.write_status(state="running", step=step)
        barrier()
        self.prune_rng(rank, keep=2)

    def set_aside_unreadable(self) -> None:
        """After a resume from checkpoint.prev.pt (all ranks have loaded it): the unreadable checkpoint.pt becomes
        checkpoint.corrupt.pt and the loaded one checkpoint.pt, so the next save does not rotate the unreadable
        file into checkpoint.prev.pt."""
        if self.unreadable and self.prev_checkpoint.exists():
            if self.checkpoint.exists():
                os.replace(self.checkpoint, self.path / "checkpoint.corrupt.pt")
            os.replace(self.prev_checkpoint, self.checkpoint)
        self.unreadable = False

    def prune_rng(self, rank: int, keep: int) -> None:
        """Keep this rank's RNG files of the `keep` newest steps (those of checkpoint.pt and checkpoint.prev.pt)."""
        files = sorted(self.path.glob(f"rng-{rank}-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]), reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)

    def prune(self, rank: int) -> None:
        """A finished run keeps only its final checkpoint and RNG files."""
        if rank == 0:
            self.prev_checkpoint.unlink(missing_ok=True)
        self.prune_rng(rank, keep=1)

    def load_resume(self) -> dict | None:
        """The newest checkpoint of this run that loads (checkpoint.pt, else checkpoint.prev.pt), else None when
        there is none. One that does not load (truncated by a crash, a disk error) is logged and skipped; when none
        loads, the error names the newest."""
        errors = []
        for path in (self.checkpoint, self.prev_checkpoint):
            if not path.exists():
                continue
            try:
                ckpt = self.load(path)
            except (ConfigError, OSError) as e:
                log.warning(f"{path} does not load, trying the previous checkpoint: {e}")
                errors.append(e)
                continue
            if errors:
                log.warning(f"resuming {self.stage} {self.signature} from {path.name} (step {ckpt.get('step')}): "
                            f"the newer checkpoint.pt does not load")
                self.unreadable = True
            elif path != self.checkpoint:
                log.info(f"resuming from {path.name}: a crash came between its rename and the new checkpoint's")
            return ckpt
        if errors:
            raise errors[0]
        return None

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
