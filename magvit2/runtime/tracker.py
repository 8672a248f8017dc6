"""Opening a stage's MLflow member run from its config and run dir: the runtime's caller of magvit2.tracking, which
takes plain dicts and imports neither the config nor the runtime (hence this module stays here, not in the package)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from magvit2 import config as C
from magvit2.runs import Ckpt, RunDir, slurm_job_id


def check_server(cfg: DictConfig) -> None:
    """An http(s) tracking server is asked first, on every rank: a refused server stops all ranks at once."""
    if str(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or "").startswith("http"):
        from magvit2 import tracking
        tracking.check_server(tracking.tracking_uri(str(cfg.paths.root), cfg.tracking.uri))


def open_member_run(cfg: DictConfig, stage: str, run: RunDir, world_size: int, ckpt: dict | None):
    """The run's MemberRun: the one its checkpoint or status names (resume), else a new one (a child of the sweep
    run when this stage is the sweep's); params, config and tags logged."""
    from magvit2 import tracking
    root = str(cfg.paths.root)
    run_id = (ckpt or {}).get(Ckpt.MLFLOW_RUN_ID) or run.read_status().get("mlflow_run_id")
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
