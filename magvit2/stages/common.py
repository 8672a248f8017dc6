"""What both training loops share: run dir, lock, accelerator, MLflow member run, atomic checkpoints, resume,
preemption and the status file the sweep table reads."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from magvit2 import config as C
from magvit2.launch import dist, state
from magvit2.launch.preempt import Preemption

log = logging.getLogger(__name__)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


class RunLock:
    """An flock on <run_dir>.lock: one process trains a run dir at a time; others wait, then see it finished."""

    def __init__(self, run_dir: Path):
        self.path = Path(str(run_dir) + ".lock")
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = open(self.path, "w")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for {self.path.parent.name}/{self.path.stem}: another process is training it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()


class RunContext:
    def __init__(self, cfg: DictConfig, stage: str):
        from accelerate.state import AcceleratorState
        self.cfg, self.stage, self.t = cfg, stage, cfg.trainer[stage]
        self.run_dir = C.run_dir(cfg, stage)
        self.signature = self.run_dir.name
        AcceleratorState._reset_state(reset_partial_state=False)  # a new stage may use another precision
        self.acc = dist.make_accelerator(self.t.precision, self.t.grad_accum)
        self.is_main = self.acc.is_main_process
        self.preempt = Preemption()
        self.tracker = None
        self.ckpt_path = self.run_dir / state.CKPT
        self._lock = None

    # lifecycle ---------------------------------------------------------------------------------------------------
    def finished(self) -> dict | None:
        st = state.read_status(self.run_dir)
        return st if st["state"] == "finished" else None

    def acquire(self) -> dict | None:
        """Lock the run dir (waiting if another process trains it). Returns its status if it already finished."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.run_dir).__enter__()
        self.acc.wait_for_everyone()
        done = self.finished()
        if done:
            self.close("FINISHED")
        return done

    def open(self) -> dict | None:
        """Load the checkpoint if any, open (or reopen) the MLflow run. Returns the checkpoint."""
        if str(os.environ.get("MLFLOW_TRACKING_URI") or self.cfg.tracking.uri or "").startswith("http"):
            from magvit2 import tracking  # every rank: a refused server stops all ranks at once, not rank 0 alone
            tracking.check_server(tracking.tracking_uri(str(self.cfg.paths.root), self.cfg.tracking.uri))
        ckpt = self._load(self.ckpt_path) if self.ckpt_path.exists() else None
        dist.seed_everything(int(self.cfg.seed) + self.acc.process_index)  # model init, before any resume
        if self.is_main:
            self._open_tracking(ckpt)
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
            state.write_status(self.run_dir, state="running", steps=int(self.t.steps),
                               world_size=self.acc.num_processes, device=str(self.acc.device),
                               mlflow_run_id=self.tracker.run_id if self.tracker else None)
        self.preempt.install()
        return ckpt

    def restore_rng(self, ckpt: dict | None) -> None:
        """Call last before the loop: model construction and DataLoader iterators draw from the RNG too."""
        if ckpt is not None:
            rng = self._rng_path(int(ckpt["step"]))
            if not rng.exists() and self.acc.process_index > 0:
                log.warning(f"{rng.name} missing: rank {self.acc.process_index} resumes with rank 0's RNG state")
            dist.set_rng_state(self._load(rng) if rng.exists() else ckpt["rng"])

    def _load(self, path: Path) -> dict:
        from magvit2.launch import checkpoint
        return checkpoint.load(path, f"run dir {self.run_dir}", "delete the run dir to train this run again (run "
                               "dirs of an older magvit2 hold pickled RNG state, which is not loaded)")

    def _rng_path(self, step: int) -> Path:
        # one file per rank and step: a crash between a rank's RNG file and rank 0's checkpoint rename must not
        # leave the checkpoint paired with another step's RNG state
        return self.run_dir / f"rng-{self.acc.process_index}-{step}.pt"

    def _open_tracking(self, ckpt: dict | None) -> None:
        from magvit2 import tracking
        cfg, root = self.cfg, str(self.cfg.paths.root)
        run_id = (ckpt or {}).get("mlflow_run_id") or state.read_status(self.run_dir).get("mlflow_run_id")
        sweep = cfg.sweep.id if self.stage == cfg.stage else None  # a dependency run is not a sweep member
        tags = {"magvit2.overrides": " ".join(_task_overrides()), "magvit2.git_sha": git_sha(),
                "magvit2.slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "magvit2.host": socket.gethostname(),
                "magvit2.run_dir": str(self.run_dir), "magvit2.world_size": str(self.acc.num_processes)}
        if sweep and cfg.sweep.get("parent_run_id"):
            tags["mlflow.parentRunId"] = cfg.sweep.parent_run_id
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri(root, cfg.tracking.uri))
        self.tracker = tracking.MemberRun(f"{cfg.tracking.experiment_prefix}-{self.stage}", root, self.stage,
                                          self.signature, _run_name(cfg, self.stage), tags, sweep, run_id=run_id)
        # Also on resume: MemberRun adds only params not logged yet (write-once), so a run that died between run
        # creation and its params still gets them, and one that logged them is left as it was.
        params = tracking.flatten(C.to_dict(cfg))
        params.update({f"choice.{k}": v for k, v in C.choices(cfg).items()})
        self.tracker.log_params(params)
        self.tracker.log_dict(C.to_dict(cfg), "config.yaml")  # same signature -> same config: rewriting is harmless
        self.tracker.set_tags(tags)

    def log(self, metrics: dict, step: int) -> None:
        if self.is_main and self.tracker is not None and metrics:
            self.tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step)

    def log_params(self, params: dict) -> None:
        if self.is_main and self.tracker is not None:
            try:
                self.tracker.log_params({k: str(v) for k, v in params.items()})
            except Exception as e:  # already logged by the first attempt of a resumed run
                log.debug(f"params not re-logged: {e}")

    def save(self, step: int, payload: dict) -> None:
        """Atomic checkpoint: every rank's RNG, then rank 0's temp file renamed over the old checkpoint."""
        rng, rng_path = dist.rng_state(), self._rng_path(step)
        torch.save(rng, _tmp(rng_path))
        os.replace(_tmp(rng_path), rng_path)
        self.acc.wait_for_everyone()
        if self.is_main:
            payload = {**payload, "step": step, "rng": rng, "signature": self.signature,
                       "mlflow_run_id": self.tracker.run_id if self.tracker else None}
            tmp = _tmp(self.ckpt_path)
            torch.save(payload, tmp)
            os.replace(tmp, self.ckpt_path)
            state.write_status(self.run_dir, state="running", step=step)
        self.acc.wait_for_everyone()
        for old in self.run_dir.glob(f"rng-{self.acc.process_index}-*.pt"):  # the checkpoint now points past them
            if old != rng_path:
                old.unlink(missing_ok=True)

    def maybe_preempt(self, step: int, payload_fn) -> None:
        if self.preempt.requested(self.acc):
            self.save(step, payload_fn())
            if self.is_main:
                state.write_status(self.run_dir, state="preempted", step=step)
                self.close("KILLED")
            self.preempt.hand_over(self.is_main)

    def status(self, step: int, metrics: dict) -> None:
        if self.is_main:
            state.write_status(self.run_dir, step=step, metrics={k: float(v) for k, v in metrics.items()})

    def finish(self, step: int, results: dict) -> dict:
        if self.is_main:
            clean = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            state.write_status(self.run_dir, state="finished", step=step, metrics=clean)
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
            if self.tracker is not None:  # the final eval table; the checkpoint is referenced, not copied
                self.tracker.log_dict(results, "eval.json")
                self.tracker.set_tags({"magvit2.checkpoint": str(self.ckpt_path)})
            self.close("FINISHED")
        self.preempt.uninstall()
        self.acc.wait_for_everyone()
        return {"run_dir": str(self.run_dir), "signature": self.signature, **results}

    def fail(self, err: BaseException) -> None:
        if self.is_main:
            state.write_status(self.run_dir, state="failed", error=f"{type(err).__name__}: {err}")
            self.close("FAILED")
        self.preempt.uninstall()

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.end(status)
            self.tracker = None
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def progress(self, start: int, total: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=start, desc=desc, disable=not self.is_main, dynamic_ncols=True,
                    mininterval=1.0)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _run_name(cfg: DictConfig, stage: str) -> str:
    if stage == cfg.stage and cfg.sweep.get("member"):
        return str(cfg.sweep.member)
    return C.member_name(OmegaConf.merge(cfg, {"stage": stage}))

