"""What magvit2 writes into MLflow: the tag schema, the store's size limits and params as flat strings.

No mlflow import here: readers of tags (reports, the sweep's plan) and the config side use it without loading
MLflow. The limits and MLflow's own tag names are copies; tests/test_tracking.py checks them against
mlflow.utils.validation and mlflow.utils.mlflow_tags, so an MLflow upgrade that changes one fails there.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence

# MLflow 3 limits (mlflow.utils.validation): values past them are rejected by the server.
MAX_PARAM_VALUE = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
_VALID_KEY = re.compile(r"^[\w\-. /:]+$")  # validate_param_and_metric_name (POSIX)

PARAMS_OVERFLOW = "params_overflow.json"
TAGS_OVERFLOW = "tags_overflow.json"
SEE_PARAMS = f"<see {PARAMS_OVERFLOW}>"
SEE_TAGS = f"<see {TAGS_OVERFLOW}>"

# The whole tag schema: no other module spells a tag name.
KIND, SWEEP_ID, STAGE, SIGNATURE, OVERRIDES = (  # sweep (parent) and member runs
    "magvit2.kind", "magvit2.sweep_id", "magvit2.stage", "magvit2.signature", "magvit2.overrides")
N_MEMBERS, MISSING_PREFIX, N_RESUMES = "magvit2.n_members", "magvit2.missing.", "magvit2.n_resumes"
# sweep run: the signatures of its members and the tokenizers they train first, space-separated; a member finished
# by an earlier sweep keeps that sweep's tag, and reports find it by its signature
MEMBERS = "magvit2.members"
HOST, SLURM_JOB_ID, GIT_SHA, RUN_DIR, WORLD_SIZE = (  # where a member runs
    "magvit2.host", "magvit2.slurm_job_id", "magvit2.git_sha", "magvit2.run_dir", "magvit2.world_size")
CHECKPOINT, TOKENIZER, SAMPLES_NPZ, FID_PROTOCOL = (  # what a member produced or used
    "magvit2.checkpoint", "magvit2.tokenizer", "magvit2.samples_npz", "magvit2.fid_protocol")
METRICS_PROTOCOL = "magvit2.metrics_protocol"  # how images became numbers (metrics/protocol.py: reference | precise)
RUN_STATE = "magvit2.state"  # set when a run ends other than MLflow's statuses say (diverged)
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own: nests member runs under the sweep run in the UI
NOTE = "mlflow.note.content"  # MLflow's own: the description of a run (a sweep run's: axes, winner) or experiment
BEST_PREFIX = "magvit2.best."  # sweep run: the best member for the key metric (.member, .metric, .value, ...)
REFERENCE = "magvit2.reference"  # "true" on an evaluation of released weights: reports show it as a reference row
# experiments: the MLflow UI's own tag for which view opens (its bundled UI, not mlflow's Python code, defines it);
# without it MLflow 3 may open an experiment in the GenAI (traces) view
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def missing(key: str) -> str:
    """Tag of a metric that could not be computed honestly: its value says why."""
    return MISSING_PREFIX + key


def experiment_note(stage: str | None) -> str:
    """The description an experiment is created with (the experiments list's Description column)."""
    what = {"tokenizer": "image tokenizer (LFQ and other quantizers) training and evaluation runs",
            "ar": "autoregressive generator training and evaluation runs"}.get(stage or "", "runs")
    return (f"magvit2 {what}. A sweep's members are nested under its sweep-<id> run, whose description names the "
            f"best member; `python -m magvit2.report` turns them into the ablation report.")


def check_id(name: str, value: str) -> None:
    """A sweep id goes into tag filters between quotes: it must be non-empty and hold none."""
    if not value or "'" in value or '"' in value:
        raise ValueError(f"{name}={value!r}: needs a non-empty id without quotes (e.g. the multirun's timestamp)")


def valid_key(k: str) -> bool:
    """A param key MLflow accepts (the others go into PARAMS_OVERFLOW)."""
    return bool(_VALID_KEY.match(k)) and len(k) <= MAX_KEY and posixpath.normpath(k) == k and not k.startswith("..")


def split_long(values: dict[str, str], limit: int, marker: str) -> tuple[dict[str, str], dict[str, str]]:
    """(values with over-long ones replaced by marker, {key: full value} of those) - never truncate silently."""
    kept, long = {}, {}
    for k, v in values.items():
        if len(v) > limit:
            kept[k], long[k] = marker, v
        else:
            kept[k] = v
    return kept, long


# ------------------------------------------------------------------------------------------------------------- params
def plain(x):
    """Mappings/sequences (incl. OmegaConf containers) -> dict/list, so json.dumps can render them."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [plain(v) for v in x]
    return x


def scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"  # as typed in a YAML file or a Hydra override
    return str(v)


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {dotted key: string}: lists as "[6, 12]", None as "null", bools as "true"/"false"."""
    if not isinstance(d, Mapping):
        raise ValueError(f"flatten(d=...) needs a dict, got {type(d).__name__}; convert configs to plain dicts first")
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and len(v):
            items = flatten(v, key)
        elif isinstance(v, Mapping):
            items = {key: "{}"}
        elif isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
            items = {key: json.dumps(plain(v), default=str)}
        else:
            items = {key: scalar(v)}
        clash = out.keys() & items.keys()
        if clash:
            raise ValueError(f"flatten(d=...): key {sorted(clash)[0]!r} appears twice (a dotted key and a nested one)")
        out.update(items)
    return out
