"""MLflow tracking: sweep parent runs, member (child) runs, flattened params, metrics, artifacts.

By job: `schema` (tag names, MLflow's limits, params as flat strings; no mlflow import), `store` (the uri, the server
check, retries, experiments), `sweeps` (a sweep's parent run), `member` (a member's run) and `spool` (a member's
writes while the server is down). Takes plain dicts only: the Hydra side (magvit2.runtime.tracker) converts its
config before calling in.

The schema's names are here at once; the rest loads mlflow on first use (`tracking.MemberRun`, ...), so code that
only reads or writes tag names (a sweep's plan, a dry run) does not import mlflow.
"""
from __future__ import annotations

import importlib

from magvit2.errors import TrackingError
from magvit2.tracking.schema import (BEST_PREFIX, CHECKPOINT, EXPERIMENT_KIND, FID_PROTOCOL, GIT_SHA, HOST, KIND,
                                     MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE, MEMBERS, METRICS_PROTOCOL, MISSING_PREFIX,
                                     MODEL_TRAINING,
                                     N_MEMBERS, N_RESUMES, NOTE, OVERRIDES, PARAMS_OVERFLOW, PARENT_RUN_ID, REFERENCE,
                                     RUN_DIR, RUN_STATE, SAMPLES_NPZ, SEE_PARAMS, SEE_TAGS, SIGNATURE, SLURM_JOB_ID,
                                     STAGE, SWEEP_ID, TAGS_OVERFLOW, TOKENIZER, WORLD_SIZE, check_id, flatten, missing)

_LAZY = {"store": ("tracking_uri", "check_server", "get_experiment_id", "tag_value", "run_tags"),
         "sweeps": ("ensure_sweep_run", "finish_sweep_run", "end_if_running", "summarize_sweep_run"),
         "member": ("MemberRun",)}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = ["TrackingError", *(n for names in _LAZY.values() for n in names),
           "BEST_PREFIX", "CHECKPOINT", "EXPERIMENT_KIND", "FID_PROTOCOL", "GIT_SHA", "HOST", "KIND", "MAX_KEY",
           "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "MEMBERS", "METRICS_PROTOCOL", "MISSING_PREFIX", "MODEL_TRAINING", "N_MEMBERS", "N_RESUMES",
           "NOTE", "OVERRIDES", "PARAMS_OVERFLOW", "PARENT_RUN_ID", "REFERENCE", "RUN_DIR", "RUN_STATE", "SAMPLES_NPZ",
           "SEE_PARAMS", "SEE_TAGS", "SIGNATURE", "SLURM_JOB_ID", "STAGE", "SWEEP_ID", "TAGS_OVERFLOW", "TOKENIZER",
           "WORLD_SIZE", "check_id", "flatten", "missing"]
