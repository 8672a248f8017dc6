"""A run dir, `<paths.runs>/<stage>/<signature>`, and everything that knows its layout (after dora's `XP`).

checkpoint.pt            the latest checkpoint (atomic: a crash leaves the previous one whole)
checkpoint.prev.pt       the one before it, kept while the run trains: a resume falls back to it when checkpoint.pt
                         does not load (truncated by a crash or a disk error); removed when the run finishes
rng-<rank>-<step>.pt     every rank's RNG state at those two checkpoints (rank 0's is also inside the checkpoint)
metrics.jsonl            MLflow writes spooled while the tracking server was unreachable (magvit2.tracking)
.<name>.tmp-<pid>-*      a write in progress; one left by a killed writer is removed when the run dir is next opened
status.json              {state: new|partial|running|finished|failed|diverged|preempted, step, metrics, ...}
                         (its fields, time format, wall time and device-hours: magvit2.runs.status)
config.yaml, results.json  the resolved config; the final metrics
recon_grid.png           the tokenizer's reconstructions (originals above, reconstructions below)
samples.png, samples.npz   the AR's sample grid; its samples in the ADM evaluator's layout (sampling.export_npz)
<run dir>.lock           one process trains a run dir at a time

checkpoint.pt's keys are Ckpt's: the stage's state dicts (Ckpt.STATE), then what RunContext.save and RunDir.save add.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from magvit2.errors import ConfigError
import magvit2.runs.status as status_json
from magvit2.runs.files import atomic_write, atomic_write_text, write_json
from magvit2.runs.lock import FileLock

log = logging.getLogger(__name__)


class Ckpt:
    """The keys of a run's checkpoint.pt. A training loop writes its stage's STATE through state() and reads it back
    through restore(); whoever reads another run's checkpoint (an AR's tokenizer, model.init_from, evaluate,
    convert) reads MODEL, EMA and STEP."""
    STATE = {"tokenizer": ("model", "disc", "lecam", "ema", "opt_g", "opt_d", "sched_g", "sched_d"),
             "ar": ("model", "opt", "sched")}
    MODEL, EMA = "model", "ema"
    STEP, RNG, SIGNATURE = "step", "rng", "signature"  # RunDir.save
    MLFLOW_RUN_ID = "mlflow_run_id"  # RunContext.save: a resumed run reopens its MLflow run

    @classmethod
    def state(cls, stage: str, **parts) -> dict:
        """{key: part.state_dict()} of every key of the stage's STATE, in its order; a part missing or extra is
        a bug, not a checkpoint."""
        if set(parts) != set(cls.STATE[stage]):
            raise KeyError(f"{stage} checkpoint parts {sorted(parts)} != {sorted(cls.STATE[stage])}")
        return {k: parts[k].state_dict() for k in cls.STATE[stage]}

    @staticmethod
    def restore(ckpt: dict, **parts) -> None:
        """part.load_state_dict(ckpt[key]) for each part, in the order given (the loop decides when each loads)."""
        for k, part in parts.items():
            part.load_state_dict(ckpt[k])


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.unreadable = False  # load_resume skipped an unreadable checkpoint.pt

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
    recon_grid = property(lambda self: self.path / "recon_grid.png")
    samples_grid = property(lambda self: self.path / "samples.png")
    samples_npz = property(lambda self: self.path / "samples.npz")

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

    # status (magvit2.runs.status) ---------------------------------------------------------------------------------
    def read_status(self) -> dict:
        return status_json.read(self.status, self.has_checkpoint())

    def write_status(self, **fields) -> dict:
        return status_json.write(self.status, self.read_status(), **fields)

    def start_attempt(self, **fields) -> dict:
        """Start this attempt's wall clock (the run's wall time and device-hours), keeping earlier attempts'."""
        return self.write_status(**status_json.attempt_fields(self.read_status()), **fields)

    def wall_seconds(self) -> float:
        return status_json.run_seconds(self.read_status())

    def device_hours(self) -> float:
        return status_json.device_hours(self.read_status())

    def finished(self) -> dict | None:
        """The status of a finished run, else None."""
        st = self.read_status()
        return st if st["state"] == "finished" else None

    def write_config(self, cfg) -> None:
        from omegaconf import OmegaConf
        atomic_write_text(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    def write_results(self, results: dict) -> None:
        write_json(self.results, results)

    # checkpoint + RNG ------------------------------------------------------------------------------------------
    def save(self, step: int, payload: dict, rank: int = 0, barrier=lambda: None) -> None:
        """Atomic checkpoint: every rank's RNG file, then (after `barrier`, all ranks) rank 0's checkpoint written
        to a temp file, the old checkpoint renamed to checkpoint.prev.pt and the new one renamed into place, then the
        RNG files of steps older than those two go. Call on every rank. A full disk raises StorageError naming the
        file; the temp file is removed and the checkpoints on disk stay as they were."""
        import torch  # deferred: torch (heavy); runs/ is read by commands that never load a checkpoint

        from magvit2.checkpoint import rng_state  # deferred: torch
        rng, rng_path = rng_state(), self.rng(rank, step)
        atomic_write(rng_path, lambda f: torch.save(rng, f), "wb")
        barrier()
        if rank == 0:
            payload = {**payload, Ckpt.STEP: step, Ckpt.RNG: rng, Ckpt.SIGNATURE: self.signature}
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
                log.warning(f"resuming {self.stage} {self.signature} from {path.name} (step {ckpt.get(Ckpt.STEP)}): "
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
        from magvit2 import checkpoint  # deferred: torch
        return checkpoint.load(path or self.checkpoint, f"run dir {self.path}", fix)

    def load_rng(self, rank: int, ckpt: dict) -> dict:
        """This rank's RNG state at `ckpt` (rank 0's, inside the checkpoint, if its own file is missing)."""
        path = self.rng(rank, int(ckpt[Ckpt.STEP]))
        if path.exists():
            return self.load(path)
        if rank > 0:
            log.warning(f"{path.name} missing: rank {rank} resumes with rank 0's RNG state")
        return ckpt[Ckpt.RNG]
