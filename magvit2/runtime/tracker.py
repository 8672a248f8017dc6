"""Opening a stage's MLflow member run from its config and run dir: the runtime's caller of magvit2.tracking, which
takes plain dicts and imports neither the config nor the runtime (hence this module stays here, not in the package)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
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
    # the sweep's members run its stage (sweep.stage, set by the sweeper); a tokenizer trained first for them is
    # shared: tagged with the sweep (its report shows it) but not nested under a parent run of its own experiment
    member = stage == (cfg.sweep.get("stage") or cfg.stage)
    sweep = cfg.sweep.id
    tags = {tracking.OVERRIDES: " ".join(_task_overrides()), tracking.GIT_SHA: git_sha(),
            tracking.SLURM_JOB_ID: slurm_job_id(), tracking.HOST: socket.gethostname(),
            tracking.RUN_DIR: str(run.path), tracking.WORLD_SIZE: str(world_size)}
    if sweep and member and cfg.sweep.get("parent_run_id"):
        tags[tracking.PARENT_RUN_ID] = cfg.sweep.parent_run_id
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri(root, cfg.tracking.uri))
    tracker = tracking.MemberRun(f"{cfg.tracking.experiment_prefix}-{stage}", root, stage, run.signature,
                                 _run_name(cfg, stage, run, member), tags, sweep, run_id=run_id, nested=member)
    try:
        # Also on resume: MemberRun adds only params not logged yet (write-once), so a run that died between run
        # creation and its params still gets them, and one that logged them is left as it was.
        params = tracking.flatten(C.to_dict(cfg))
        params.update({f"choice.{k}": v for k, v in C.choices(cfg).items()})
        tracker.log_params(params)
        tracker.log_dict(C.to_dict(cfg), "config.yaml")  # same signature -> same config: rewriting is harmless
        tracker.set_tags(tags)
    except BaseException:  # a failed opening leaves no RUNNING MLflow run behind
        tracker.abandon()
        raise
    # from here on a dead server never holds the loop up: writes wait in the run dir's spool (metrics.jsonl)
    tracker.go_live(run.spool)
    start_clock(run)
    return tracker


_CLOCK = "%Y-%m-%d %H:%M:%S"  # the format of status.json's `updated` (magvit2.runs.RunDir.write_status)


def clock_seconds(text: str | None) -> float | None:
    """A status.json time stamp (local time of the writing host) as epoch seconds; None if absent or unreadable."""
    try:
        return time.mktime(time.strptime(text, _CLOCK))
    except (TypeError, ValueError):
        return None


def run_seconds(status: dict) -> float:
    """A run's training wall time from its status.json: earlier attempts (wall_s_before) + the current or last one
    (from its opening to the last status write). Time queued or waiting for a lock is not in it."""
    if isinstance(status.get("opened_s"), (int, float)) and isinstance(status.get("updated_s"), (int, float)):
        start, end = status["opened_s"], status["updated_s"]
    else:  # written before the epoch fields: whole seconds
        start, end = clock_seconds(status.get("opened")), clock_seconds(status.get("updated"))
    last = end - start if start is not None and end is not None else 0.0
    return float(status.get("wall_s_before") or 0.0) + max(last, 0.0)


def start_clock(run: RunDir) -> None:
    """Start this attempt's wall clock in status.json (the sweep's device-hours), keeping earlier attempts' seconds."""
    now = time.time()
    run.write_status(wall_s_before=run_seconds(run.read_status()), opened=time.strftime(_CLOCK, time.localtime(now)),
                     opened_s=now)


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


def tokenizer_run_name(cfg: DictConfig, signature: str) -> str:
    """What a tokenizer run trained for others is: 'tokenizer tiny-lfq <signature>', never a member's name."""
    ch = C.choices(cfg)
    return f"tokenizer {ch['tokenizer']}-{ch['quantizer']} {signature}"


def _run_name(cfg: DictConfig, stage: str, run: RunDir, member: bool) -> str:
    if member and cfg.sweep.get("member"):
        return str(cfg.sweep.member)
    if stage == "tokenizer":
        return tokenizer_run_name(cfg, run.signature)
    return C.member_name(OmegaConf.merge(cfg, {"stage": stage}))
