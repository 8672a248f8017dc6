"""Opening a stage's MLflow member run from its config and run dir (the config side of magvit2.tracking)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from magvit2 import config as C
from magvit2.runs import RunDir, slurm_job_id


def open_member_run(cfg: DictConfig, stage: str, run: RunDir, world_size: int, ckpt: dict | None):
    """The run's MemberRun: the one its checkpoint or status names (resume), else a new one (a child of the sweep
    run when this stage is the sweep's); params, config and tags logged."""
    from magvit2 import tracking
    root = str(cfg.paths.root)
    run_id = (ckpt or {}).get("mlflow_run_id") or run.read_status().get("mlflow_run_id")
    sweep = cfg.sweep.id if stage == cfg.stage else None  # a dependency run is not a sweep member
    tags = {tracking.OVERRIDES: " ".join(_task_overrides()), tracking.GIT_SHA: git_sha(),
            tracking.SLURM_JOB_ID: slurm_job_id(), tracking.HOST: socket.gethostname(),
            tracking.RUN_DIR: str(run.path), tracking.WORLD_SIZE: str(world_size)}
    if sweep and cfg.sweep.get("parent_run_id"):
        tags[tracking.PARENT_RUN_ID] = cfg.sweep.parent_run_id
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri(root, cfg.tracking.uri))
    tracker = tracking.MemberRun(f"{cfg.tracking.experiment_prefix}-{stage}", root, stage, run.signature,
                                 _run_name(cfg, stage), tags, sweep, run_id=run_id)
    try:
        # Also on resume: MemberRun adds only params not logged yet (write-once), so a run that died between run
        # creation and its params still gets them, and one that logged them is left as it was.
        params = tracking.flatten(C.to_dict(cfg))
        params.update({f"choice.{k}": v for k, v in C.choices(cfg).items()})
        tracker.log_params(params)
        tracker.log_dict(C.to_dict(cfg), "config.yaml")  # same signature -> same config: rewriting is harmless
        tracker.set_tags(tags)
    except BaseException:  # a failed opening leaves no RUNNING MLflow run behind
        tracker._abandon()
        raise
    # from here on a dead server never holds the loop up: writes wait in the run dir's spool (metrics.jsonl)
    tracker.go_live(run.spool)
    return tracker


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


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
