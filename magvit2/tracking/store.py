"""The MLflow store: its uri, the one-request server check, retries of transient errors, experiments, and the
tag/artifact writes shared by sweep and member runs. Everything goes through `MlflowClient` with explicit run ids
(never the fluent active-run stack), so several runs can live in one process."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from magvit2.errors import TrackingError
from magvit2.tracking.schema import (EXPERIMENT_KIND, MAX_TAG_VALUE, MODEL_TRAINING, NOTE, PARAMS_PER_BATCH, SEE_TAGS,
                                     TAGS_OVERFLOW, experiment_note, split_long)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------- uri
def tracking_uri(root: str, uri: str | None = None) -> str:
    """`MLFLOW_TRACKING_URI` > `uri` (the config's tracking.uri) > sqlite:///<abs root>/mlflow.db."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not chosen:
        if not root:
            raise ValueError("root is empty: pass paths.root (the folder that holds mlflow.db) or a tracking uri")
        chosen = "sqlite:///" + str(Path(root).expanduser().resolve() / "mlflow.db")
    if chosen.startswith("sqlite:///"):
        # sqlite cannot create the folder of its database file.
        Path(chosen[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return chosen


_URI_SETTING = "MLFLOW_TRACKING_URI (or tracking.uri)"


def check_server(uri: str | None = None, timeout_s: float = 10.0) -> None:
    """One request to an http(s) tracking server before a run or sweep starts: a server that refuses us (403 Invalid
    Host header from MLflow 3's DNS-rebinding guard, 401, ...) or does not answer raises TrackingError at once,
    instead of every call retrying for a minute and ending in a traceback. Local stores are not checked."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://")):
        return
    from urllib.parse import urlparse

    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    parts = urlparse(uri)
    host = parts.netloc
    quiet = logging.getLogger("urllib3.connectionpool")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its per-retry warnings would precede our one line
    try:  # few, short retries: a server restarting right now gets ~2 s, a dead one is reported in seconds
        r = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                         max_retries=2, backoff_factor=0.5, timeout=timeout_s, raise_on_status=False,
                         params={"experiment_name": "Default"})
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout: all mean "no server there"
        raise TrackingError(
            f"no MLflow server answers at {uri} ({first_line(exc)}): start it (README, \"Running a sweep on "
            f"SLURM\": mlflow server ... --allowed-hosts ... --cors-allowed-origins ...) or set {_URI_SETTING} to a "
            f"running server's address, or unset both for the local sqlite store under paths.root") from None
    finally:
        quiet.setLevel(level)
    body = " ".join(r.text.split())[:160]
    if r.status_code == 200 or (r.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in body):
        return
    if r.status_code == 403 and "Invalid Host header" in body:
        # the UI opened at the same address also needs its origin allowed (MLflow 3 checks CORS separately)
        raise TrackingError(
            f"the MLflow server at {uri} refuses requests addressed to {host!r} (403 Invalid Host header, its "
            f"DNS-rebinding guard): restart it with --allowed-hosts '{host},localhost:*,127.0.0.1:*' "
            f"--cors-allowed-origins '{parts.scheme}://{host}' (README, \"Running a sweep on SLURM\"), or set "
            f"{_URI_SETTING} to an address it accepts")
    hint = (" (the server requires a login: set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
            if r.status_code == 401 else "")
    raise TrackingError(f"the MLflow server at {uri} answered HTTP {r.status_code} ({body or 'empty body'}){hint}: "
                        f"check the server (--allowed-hosts, auth) or set {_URI_SETTING} to a working server")


def first_line(exc: BaseException) -> str:
    """The part of a connection error worth one log line."""
    text = str(exc).strip()
    m = re.search(r"(Connection refused|Name or service not known|Temporary failure in name resolution|timed? ?out)",
                  text, re.I)
    return m.group(1) if m else (text.splitlines()[0][:160] if text else type(exc).__name__)


# ------------------------------------------------------------------------------------------------------------- retries
def transient(exc: BaseException) -> bool:
    """True for errors that go away by themselves: a locked sqlite file, an HTTP server restarting or overloaded."""
    text = str(exc)
    if "database is locked" in text or "database table is locked" in text:
        return True
    if isinstance(exc, MlflowException):
        code = exc.error_code
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"):
            return True
        # A refusal (403 Invalid Host header, 401, 404, ...) stays a refusal: retrying it only delays the error.
        m = re.search(r"error code (4\d\d) != 200", text)
        if m and m.group(1) != "429":
            return False
        # rest_utils wraps connection errors and exhausted 5xx retries into this message.
        if text.startswith("API request to") and "failed with" in text:
            return True
        if code == "INTERNAL_ERROR" and re.search(r"\b50[0234]\b", text):
            return True
        return False
    import requests  # mlflow depends on it

    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError))


def retry(fn, what: str, attempts: int = 8, base_s: float = 0.25, max_s: float = 15.0):
    """Run fn(); on a transient error sleep with exponential backoff + jitter and try again."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not transient(exc) or i == attempts - 1:
                raise
            delay = min(max_s, base_s * 2**i) * (0.5 + random.random())
            log.warning("mlflow %s failed (%s); retry %d/%d in %.1f s", what, str(exc)[:200], i + 1, attempts, delay)
            time.sleep(delay)


_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


@contextlib.contextmanager
def fast_http():
    """One short HTTP try per call: MLflow's HTTP client reads its retry count and timeout from the environment at
    every request."""
    old = {k: os.environ.get(k) for k in _FAST_HTTP}
    os.environ.update(_FAST_HTTP)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------------- experiments
def get_experiment_id(name: str, root: str, uri: str | None = None, stage: str | None = None) -> str:
    """Id of experiment `name`, created if missing (as a model-training experiment with a description for `stage`);
    race-safe when several processes create it at once."""
    if not name:
        raise ValueError("experiment name is empty: use e.g. 'magvit2-ar' (f'{prefix}-{stage}')")
    turi = tracking_uri(root, uri)
    client = MlflowClient(turi)
    location = None
    if turi.startswith("sqlite:"):  # a server chooses its own artifact root; a local store gets an absolute one
        location = (Path(root).expanduser().resolve() / "mlartifacts" / name).as_uri()
    tags = {EXPERIMENT_KIND: MODEL_TRAINING, NOTE: experiment_note(stage)}

    def find_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            for k, v in tags.items():  # made before these tags existed; a description edited in the UI stays
                if k not in exp.tags:
                    client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as exc:
            exp = client.get_experiment_by_name(name)  # another process won the race: use its experiment
            if exp is None:
                raise
            log.debug("experiment %s created concurrently (%s)", name, exc)
            return exp.experiment_id

    # The first touch of a fresh sqlite file runs migrations; two processes doing it at once may collide.
    for i in range(5):
        try:
            return retry(find_or_create, f"get_experiment({name})")
        except Exception as exc:  # noqa: BLE001
            if i == 4 or "already exists" not in str(exc):
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------- tags, artifacts
def set_tags(client: MlflowClient, run_id: str, tags: dict, attempts: int = 8) -> None:
    """Tags in batches; one longer than MLflow keeps is SEE_TAGS, its value whole in the TAGS_OVERFLOW artifact."""
    tags = {str(k): "" if v is None else str(v) for k, v in tags.items()}
    kept, long = split_long(tags, MAX_TAG_VALUE, SEE_TAGS)
    if long:
        merge_json_artifact(client, run_id, TAGS_OVERFLOW, long)
    items = [RunTag(k, v) for k, v in kept.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        chunk = items[i:i + PARAMS_PER_BATCH]
        retry(lambda: client.log_batch(run_id, tags=chunk, synchronous=True), "log tags", attempts=attempts)


def merge_json_artifact(client: MlflowClient, run_id: str, name: str, new: dict) -> None:
    """Add keys to a JSON artifact of the run (keeps keys written earlier, e.g. before a resume)."""
    old = {}
    if any(f.path == name for f in retry(lambda: client.list_artifacts(run_id), "list artifacts")):
        with tempfile.TemporaryDirectory() as tmp:
            path = retry(lambda: client.download_artifacts(run_id, name, tmp), f"download {name}")
            old = json.loads(Path(path).read_text())
    retry(lambda: client.log_dict(run_id, {**old, **new}, name), f"log {name}")


def tag_value(client: MlflowClient, run, key: str) -> str | None:
    """A tag of a run in full: one longer than MLflow keeps is read back from the run's TAGS_OVERFLOW artifact."""
    v = run.data.tags.get(key)
    if v != SEE_TAGS:
        return v
    with tempfile.TemporaryDirectory() as tmp:
        path = retry(lambda: client.download_artifacts(run.info.run_id, TAGS_OVERFLOW, tmp), f"download {key}")
        return json.loads(Path(path).read_text()).get(key)


def run_tags(run_id: str, root: str, uri: str | None = None) -> dict[str, str]:
    """The tags of a run (raises MlflowException if the store has no such run)."""
    return MlflowClient(tracking_uri(root, uri)).get_run(run_id).data.tags
