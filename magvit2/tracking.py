"""MLflow tracking: sweep parent runs, member (child) runs, flattened params, metrics, artifacts.

Everything goes through `MlflowClient` with explicit run ids
(never the fluent active-run stack), so several runs can live in one process and a resumed member reopens its own
run. Takes plain dicts only: the Hydra side converts its config before calling in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import random
import re
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from magvit2.errors import TrackingError

log = logging.getLogger(__name__)

# MLflow 3 limits (mlflow.utils.validation): values past them are rejected by the server.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_VALID_KEY = re.compile(r"^[\w\-. /:]+$")

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
RUN_STATE = "magvit2.state"  # set when a run ends other than MLflow's statuses say (diverged)
PARENT_RUN_ID = MLFLOW_PARENT_RUN_ID  # MLflow's own: nests member runs under the sweep run in the UI
NOTE = MLFLOW_RUN_NOTE  # MLflow's own: the run's description in the UI (a sweep run's: its axes and winner)
BEST_PREFIX = "magvit2.best."  # sweep run: the best member for the key metric (.member, .metric, .value, ...)
REFERENCE = "magvit2.reference"  # "true" on an evaluation of released weights: reports show it as a reference row


def missing(key: str) -> str:
    """Tag of a metric that could not be computed honestly: its value says why."""
    return MISSING_PREFIX + key

_RUN_URIS: dict[str, str] = {}  # run id -> tracking uri, so finish_sweep_run(run_id) needs nothing else


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

    host = urlparse(uri).netloc
    quiet = logging.getLogger("urllib3.connectionpool")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its per-retry warnings would precede our one line
    try:  # few, short retries: a server restarting right now gets ~2 s, a dead one is reported in seconds
        r = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                         max_retries=2, backoff_factor=0.5, timeout=timeout_s, raise_on_status=False,
                         params={"experiment_name": "Default"})
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout: all mean "no server there"
        raise TrackingError(
            f"no MLflow server answers at {uri} ({_first_line(exc)}): start it (README, \"Running a sweep on "
            f"SLURM\": mlflow server ... --allowed-hosts ...) or set {_URI_SETTING} to a running server's address, "
            f"or unset both for the local sqlite store under paths.root") from None
    finally:
        quiet.setLevel(level)
    body = " ".join(r.text.split())[:160]
    if r.status_code == 200 or (r.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in body):
        return
    if r.status_code == 403 and "Invalid Host header" in body:
        raise TrackingError(
            f"the MLflow server at {uri} refuses requests addressed to {host!r} (403 Invalid Host header, its "
            f"DNS-rebinding guard): restart it with --allowed-hosts '{host},localhost:*,127.0.0.1:*' (README, "
            f"\"Running a sweep on SLURM\"), or set {_URI_SETTING} to an address it accepts")
    hint = (" (the server requires a login: set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
            if r.status_code == 401 else "")
    raise TrackingError(f"the MLflow server at {uri} answered HTTP {r.status_code} ({body or 'empty body'}){hint}: "
                        f"check the server (--allowed-hosts, auth) or set {_URI_SETTING} to a working server")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    m = re.search(r"(Connection refused|Name or service not known|Temporary failure in name resolution|timed? ?out)",
                  text, re.I)
    return m.group(1) if m else (text.splitlines()[0][:160] if text else type(exc).__name__)


# ------------------------------------------------------------------------------------------------------------- retries
def _transient(exc: BaseException) -> bool:
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


def _retry(fn, what: str, attempts: int = 8, base_s: float = 0.25, max_s: float = 15.0):
    """Run fn(); on a transient error sleep with exponential backoff + jitter and try again."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _transient(exc) or i == attempts - 1:
                raise
            delay = min(max_s, base_s * 2**i) * (0.5 + random.random())
            log.warning("mlflow %s failed (%s); retry %d/%d in %.1f s", what, str(exc)[:200], i + 1, attempts, delay)
            time.sleep(delay)


# ------------------------------------------------------------------------------------------------------------- params
def _plain(x):
    """Mappings/sequences (incl. OmegaConf containers) -> dict/list, so json.dumps can render them."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


def _scalar(v) -> str:
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
            items = {key: json.dumps(_plain(v), default=str)}
        else:
            items = {key: _scalar(v)}
        clash = out.keys() & items.keys()
        if clash:
            raise ValueError(f"flatten(d=...): key {sorted(clash)[0]!r} appears twice (a dotted key and a nested one)")
        out.update(items)
    return out


def _valid_key(k: str) -> bool:
    return bool(_VALID_KEY.match(k)) and len(k) <= MAX_KEY and posixpath.normpath(k) == k and not k.startswith("..")


# ------------------------------------------------------------------------------------------------------- experiments
def get_experiment_id(name: str, root: str, uri: str | None = None) -> str:
    """Id of experiment `name`, created if missing; race-safe when several processes create it at once."""
    if not name:
        raise ValueError("experiment name is empty: use e.g. 'magvit2-ar' (f'{prefix}-{stage}')")
    turi = tracking_uri(root, uri)
    client = MlflowClient(turi)
    location = None
    if turi.startswith("sqlite:"):  # a server chooses its own artifact root; a local store gets an absolute one
        location = (Path(root).expanduser().resolve() / "mlartifacts" / name).as_uri()

    def find_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            exp = client.get_experiment_by_name(name)  # another process won the race: use its experiment
            if exp is None:
                raise
            log.debug("experiment %s created concurrently (%s)", name, exc)
            return exp.experiment_id

    # The first touch of a fresh sqlite file runs migrations; two processes doing it at once may collide.
    for i in range(5):
        try:
            return _retry(find_or_create, f"get_experiment({name})")
        except Exception as exc:  # noqa: BLE001
            if i == 4 or "already exists" not in str(exc):
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------------------- sweeps
def _check_id(name: str, value: str) -> None:
    if not value or "'" in value or '"' in value:
        raise ValueError(f"{name}={value!r}: needs a non-empty id without quotes (e.g. the multirun's timestamp)")


def _find_sweep_run(client: MlflowClient, exp_id: str, sweep_id: str):
    flt = f"tags.`{KIND}` = 'sweep' and tags.`{SWEEP_ID}` = '{sweep_id}'"
    runs = _retry(lambda: client.search_runs([exp_id], flt, ViewType.ACTIVE_ONLY, max_results=10,
                                             order_by=["attributes.start_time ASC"]), "search sweep run")
    return runs[0] if runs else None


def ensure_sweep_run(experiment: str, root: str, sweep_id: str, stage: str, overrides: str, n_members: int,
                     uri: str | None = None, members: list[str] | None = None) -> str:
    """The sweep's parent run (found by tag magvit2.sweep_id, else created); set RUNNING; returns its run id.
    members: the signatures of the runs the sweep reports (tag MEMBERS)."""
    _check_id("sweep_id", sweep_id)
    turi = tracking_uri(root, uri)
    client = MlflowClient(turi)
    exp_id = get_experiment_id(experiment, root, uri)
    tags = {KIND: "sweep", SWEEP_ID: sweep_id, STAGE: stage, OVERRIDES: overrides or "", N_MEMBERS: str(n_members)}
    if members:
        tags[MEMBERS] = " ".join(dict.fromkeys(members))
    from magvit2.runs import FileLock  # inter-process: root is shared by a sweep's members
    with FileLock(Path(root).expanduser().resolve() / ".locks" / f"sweep-{sweep_id}"):
        run = _find_sweep_run(client, exp_id, sweep_id)
        if run is None:
            tags, long = _split_long(tags, MAX_TAG_VALUE, SEE_TAGS)
            run = _retry(lambda: client.create_run(exp_id, tags=tags, run_name=f"sweep-{sweep_id}"), "create sweep run")
            if long:
                _retry(lambda: client.log_dict(run.info.run_id, long, TAGS_OVERFLOW), "log tags overflow")
        else:
            if run.info.status != "RUNNING":
                _retry(lambda: client.update_run(run.info.run_id, status="RUNNING"), "reopen sweep run")
            if overrides or n_members:  # a member creating a missing parent passes neither; keep what is there
                _set_tags(client, run.info.run_id, {k: tags[k] for k in (OVERRIDES, N_MEMBERS, MEMBERS) if k in tags})
    _RUN_URIS[run.info.run_id] = turi
    return run.info.run_id


def finish_sweep_run(run_id: str, status: str = "FINISHED", root: str | None = None, uri: str | None = None) -> None:
    """Terminate the sweep run (FINISHED, FAILED or KILLED)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status={status!r}: use FINISHED, FAILED or KILLED")
    turi = _RUN_URIS.get(run_id)
    if turi is None:
        if root is None and uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ValueError(f"finish_sweep_run({run_id!r}): unknown store; pass root= (paths.root) or uri=")
        turi = tracking_uri(root or "outputs", uri)
    client = MlflowClient(turi)
    _retry(lambda: client.set_terminated(run_id, status), "finish sweep run")


def end_if_running(run_id: str, status: str, uri: str) -> bool:
    """Terminate a run in the store at exactly `uri` (a sweep's recorded one) unless it ended already; True if this
    call ended it."""
    client = MlflowClient(uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status)
    return True


def summarize_sweep_run(run_id: str, uri: str, tags: dict, metrics: dict[str, float],
                        texts: dict[str, str]) -> None:
    """The end-of-sweep record on a sweep run in the store at `uri`: tags (best member, description), metrics (wall
    time, device-hours) and text artifacts (the results table); a resubmitted sweep overwrites them."""
    client = MlflowClient(uri)
    _set_tags(client, run_id, tags)
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
    _retry(lambda: client.log_batch(run_id, metrics=ms, synchronous=True), "log sweep summary")
    for name, text in texts.items():
        _retry(lambda: client.log_text(run_id, text, name), f"log {name}")


def tag_value(client: MlflowClient, run, key: str) -> str | None:
    """A tag of a run in full: one longer than MLflow keeps is read back from the run's TAGS_OVERFLOW artifact."""
    v = run.data.tags.get(key)
    if v != SEE_TAGS:
        return v
    with tempfile.TemporaryDirectory() as tmp:
        path = _retry(lambda: client.download_artifacts(run.info.run_id, TAGS_OVERFLOW, tmp), f"download {key}")
        return json.loads(Path(path).read_text()).get(key)


def run_tags(run_id: str, root: str, uri: str | None = None) -> dict[str, str]:
    """The tags of a run (raises MlflowException if the store has no such run)."""
    return MlflowClient(tracking_uri(root, uri)).get_run(run_id).data.tags


# ------------------------------------------------------------------------------------------------------------ helpers
def _split_long(values: dict[str, str], limit: int, marker: str) -> tuple[dict[str, str], dict[str, str]]:
    """(values with over-long ones replaced by marker, {key: full value} of those) - never truncate silently."""
    kept, long = {}, {}
    for k, v in values.items():
        if len(v) > limit:
            kept[k], long[k] = marker, v
        else:
            kept[k] = v
    return kept, long


def _set_tags(client: MlflowClient, run_id: str, tags: dict, attempts: int = 8) -> None:
    tags = {str(k): "" if v is None else str(v) for k, v in tags.items()}
    kept, long = _split_long(tags, MAX_TAG_VALUE, SEE_TAGS)
    if long:
        _merge_json_artifact(client, run_id, TAGS_OVERFLOW, long)
    items = [RunTag(k, v) for k, v in kept.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        chunk = items[i:i + _PARAMS_PER_BATCH]
        _retry(lambda: client.log_batch(run_id, tags=chunk, synchronous=True), "log tags", attempts=attempts)


def _merge_json_artifact(client: MlflowClient, run_id: str, name: str, new: dict) -> None:
    """Add keys to a JSON artifact of the run (keeps keys written earlier, e.g. before a resume)."""
    old = {}
    if any(f.path == name for f in _retry(lambda: client.list_artifacts(run_id), "list artifacts")):
        with tempfile.TemporaryDirectory() as tmp:
            path = _retry(lambda: client.download_artifacts(run_id, name, tmp), f"download {name}")
            old = json.loads(Path(path).read_text())
    _retry(lambda: client.log_dict(run_id, {**old, **new}, name), f"log {name}")


# ------------------------------------------------------------------------------------------------- in-loop logging
# Once a member's run is open, the training loop must not wait minutes on a dead server (MLflow's own HTTP retries
# plus _retry): every call gets one short try; when the server does not answer, what it would have written goes to
# the run dir's spool (metrics.jsonl) and the server is tried again after PROBE_S; the spool is sent once it answers,
# at the latest when the run ends (end() waits up to END_WAIT_S for it).
PROBE_S = float(os.environ.get("MAGVIT2_MLFLOW_PROBE_S", "10"))
END_WAIT_S = float(os.environ.get("MAGVIT2_MLFLOW_END_WAIT_S", "180"))
_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


@contextlib.contextmanager
def _fast_http():
    """MLflow's HTTP client reads its retry count and timeout from the environment at every request."""
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


# ------------------------------------------------------------------------------------------------------------ members
class MemberRun:
    """One member's MLflow run: a child of the sweep run when `sweep_id` is given (nested=False: only tagged with it,
    for a shared run trained for the sweep in another experiment, e.g. its tokenizer); `run_id` given -> resume it."""

    def __init__(self, experiment: str, root: str, stage: str, signature: str, run_name: str, tags: dict,
                 sweep_id: str | None, run_id: str | None = None, uri: str | None = None, nested: bool = True):
        if stage not in ("tokenizer", "ar"):
            raise ValueError(f"stage={stage!r}: use 'tokenizer' or 'ar'")
        self.root, self.uri = root, uri
        self.client = MlflowClient(tracking_uri(root, uri))
        self.experiment_id = get_experiment_id(experiment, root, uri)
        self._pending: list[Metric] = []
        self.spool: Path | None = None  # set by go_live: the loop's writes wait there while the server is down
        self._live = False
        self._retry_at = 0.0  # time.monotonic() before which a down server is not tried again
        self.resumed = run_id is not None
        if run_id is not None:
            try:
                run = _retry(lambda: self.client.get_run(run_id), "get run")
            except MlflowException as exc:
                raise ValueError(f"run_id={run_id!r} is not in {self.client.tracking_uri}: "
                                 "point MLFLOW_TRACKING_URI at the store the run was logged to, or start a new run "
                                 "(run_id=None)") from exc
            self.run_id = run.info.run_id
            n = int(run.data.tags.get(N_RESUMES, "0")) + 1
            _retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen run")
            try:
                self.set_tags({**(tags or {}), N_RESUMES: n})
            except BaseException:  # a failed attempt leaves no RUNNING run behind
                self._abandon()
                raise
            return
        base = {KIND: "member", SWEEP_ID: sweep_id or "", STAGE: stage, SIGNATURE: signature,
                HOST: socket.gethostname()}  # the caller adds SLURM_JOB_ID (magvit2.runs.slurm_job_id)
        base.update({str(k): "" if v is None else str(v) for k, v in (tags or {}).items()})
        if sweep_id:
            _check_id("sweep_id", sweep_id)
        if sweep_id and nested:  # normally created by the launcher before members start; created here if it is not
            parent = _find_sweep_run(self.client, self.experiment_id, sweep_id)
            base[PARENT_RUN_ID] = (parent.info.run_id if parent is not None else
                                          ensure_sweep_run(experiment, root, sweep_id, stage, "", 0, uri))
        kept, long = _split_long(base, MAX_TAG_VALUE, SEE_TAGS)
        run = _retry(lambda: self.client.create_run(self.experiment_id, tags=kept, run_name=run_name), "create run")
        self.run_id = run.info.run_id
        if long:
            try:
                _merge_json_artifact(self.client, self.run_id, TAGS_OVERFLOW, long)
            except BaseException:
                self._abandon()
                raise

    def _abandon(self) -> None:
        """FAILED, best effort (one short try): for a run whose opening failed."""
        try:
            with _fast_http():
                self.client.set_terminated(self.run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - the opening error is the one to report
            log.warning("mlflow run %s could not be marked FAILED: %s", self.run_id, _first_line(exc))

    # -- the training loop's mode: short tries, a spool in the run dir while the server is down
    def go_live(self, spool) -> None:
        """From now on a call that finds the server down writes to `spool` (a file in the run dir) and returns at
        once; the spool is sent when the server answers again (also what an earlier attempt left there)."""
        self.spool, self._live = Path(spool), True
        if self._spooled():
            self._call("send spooled writes", lambda: None, lambda: None)

    def _spooled(self) -> bool:
        return self.spool is not None and self.spool.exists() and self.spool.stat().st_size > 0

    def _call(self, what: str, fn, spool):
        """fn() with one short try once live (after the spool is sent); a transient failure -> spool() instead."""
        if not self._live:
            return _retry(fn, what)
        if time.monotonic() < self._retry_at:
            spool()
            return None
        try:
            with _fast_http():
                self._replay(attempts=1)
                return _retry(fn, what, attempts=1)
        except Exception as exc:  # noqa: BLE001 - classified
            if not _transient(exc):
                raise
            if not self._retry_at:
                log.warning("mlflow server unreachable (%s): run %s goes on, its MLflow writes wait in %s and are "
                            "sent when the server answers (tried again every %.0f s)", _first_line(exc), self.run_id,
                            self.spool, PROBE_S)
            self._retry_at = time.monotonic() + PROBE_S
            spool()
            return None

    def _append(self, *records: dict) -> None:
        try:
            with open(self.spool, "a") as f:
                for r in records:
                    f.write(json.dumps(r, default=str) + "\n")
                f.flush()
        except OSError as exc:  # a full disk too: the metrics are lost, the run goes on
            log.error("could not spool MLflow writes to %s (%s): %d record(s) lost", self.spool, exc, len(records))

    def _spool_pending(self) -> None:
        ms = [[m.key, m.value, m.timestamp, m.step] for m in self._pending]
        self._append(*({"metrics": ms[i:i + _METRICS_PER_BATCH]} for i in range(0, len(ms), _METRICS_PER_BATCH)))
        self._pending.clear()

    def _replay(self, attempts: int) -> None:
        """Send the spool in order; what could not be sent stays in it (raises the error)."""
        if not self._spooled():
            return
        records = [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]
        done = 0
        try:
            for r in records:
                self._apply(r, attempts)
                done += 1
        finally:
            rest = records[done:]
            if not rest:
                self.spool.unlink(missing_ok=True)
                log.info("mlflow server answers again: %d spooled write(s) of run %s sent", done, self.run_id)
                self._retry_at = 0.0
            elif done:
                from magvit2.runs import atomic_write_text
                atomic_write_text(self.spool, "".join(json.dumps(x, default=str) + "\n" for x in rest))

    def _apply(self, r: dict, attempts: int) -> None:
        rid = self.run_id
        if "metrics" in r:
            ms = [Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in r["metrics"]]
            _retry(lambda: self.client.log_batch(rid, metrics=ms, synchronous=True), "log spooled metrics",
                   attempts=attempts)
        elif "tags" in r:
            _set_tags(self.client, rid, r["tags"], attempts)
        elif "dict" in r:
            _retry(lambda: self.client.log_dict(rid, r["dict"], r["name"]), "log spooled dict", attempts=attempts)
        elif "artifact" in r:
            if Path(r["artifact"]).exists():
                fn = self.client.log_artifacts if Path(r["artifact"]).is_dir() else self.client.log_artifact
                _retry(lambda: fn(rid, r["artifact"], r.get("artifact_path")), "log spooled artifact",
                       attempts=attempts)
            else:
                log.warning("spooled artifact %s is gone: not logged to run %s", r["artifact"], rid)

    # -- params: write-once
    def log_params(self, flat: dict[str, str]) -> None:
        """Log params; values over 6000 chars (or keys MLflow rejects) go whole into params_overflow.json.
        On a resumed run only keys not logged before are added (MLflow params are write-once)."""
        flat = {str(k): _scalar(v) for k, v in flat.items()}
        if self.resumed:
            have = _retry(lambda: self.client.get_run(self.run_id), "get run").data.params
            changed = sorted(k for k in flat if k in have and have[k] != flat[k] and have[k] != SEE_PARAMS)
            if changed:
                log.warning("resumed run %s: params are write-once, keeping logged values of %s", self.run_id, changed)
            flat = {k: v for k, v in flat.items() if k not in have}
        overflow = {k: v for k, v in flat.items() if not _valid_key(k)}
        kept, long = _split_long({k: v for k, v in flat.items() if k not in overflow}, MAX_PARAM_VALUE, SEE_PARAMS)
        overflow.update(long)
        if overflow:
            _merge_json_artifact(self.client, self.run_id, PARAMS_OVERFLOW, overflow)
        items = [Param(k, v) for k, v in kept.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i:i + _PARAMS_PER_BATCH]
            _retry(lambda: self.client.log_batch(self.run_id, params=chunk, synchronous=True), "log params")

    # -- metrics
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batched call per 1000 values; transient store errors are retried, and values that still fail stay
        queued and go out with the next call (or at end()), so none is dropped."""
        ts = int(time.time() * 1000)  # fixed before retries: a retried batch is then idempotent
        for k, v in metrics.items():
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metrics[{k!r}]={v!r} is not a number; log_missing(key, reason) instead") from exc
            self._pending.append(Metric(str(k), value, ts, int(step)))
        if self._live:
            self._call("log metrics", lambda: self._flush(attempts=1), self._spool_pending)
            return
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001
            if not _transient(exc):
                raise
            log.warning("mlflow unreachable; %d metric values queued for the next call", len(self._pending))

    def _flush(self, attempts: int = 8) -> None:
        while self._pending:
            chunk = self._pending[:_METRICS_PER_BATCH]
            _retry(lambda: self.client.log_batch(self.run_id, metrics=chunk, synchronous=True), "log metrics",
                   attempts=attempts)
            del self._pending[:len(chunk)]

    def log_missing(self, key: str, reason: str) -> None:
        """A metric that could not be computed honestly: no value, tag magvit2.missing.<key> = reason."""
        if not reason:
            raise ValueError(f"log_missing({key!r}, reason=''): say why the metric is missing")
        self.set_tags({missing(key): reason})

    # -- artifacts and tags
    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            raise ValueError(f"log_artifact(path={str(path)!r}): no such file or folder")
        fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        self._call("log artifact", lambda: fn(self.run_id, str(path), artifact_path),
                   lambda: self._append({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path}))

    def log_image(self, image, name: str) -> None:
        """PIL image, HxWxC / HxW array (uint8 or float in [0, 1]) or a CxHxW tensor -> artifact `name`."""
        if hasattr(image, "detach"):  # torch tensor without importing torch here
            image = image.detach().float().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3, 4):
                image = image.transpose(1, 2, 0)
        _retry(lambda: self.client.log_image(self.run_id, image, artifact_file=name), "log image")

    def log_dict(self, d: dict, name: str) -> None:
        self._call("log dict", lambda: self.client.log_dict(self.run_id, d, name),
                   lambda: self._append({"dict": _plain(d), "name": name}))

    def set_tags(self, tags: dict) -> None:
        tags = {str(k): "" if v is None else str(v) for k, v in tags.items()}
        self._call("log tags", lambda: _set_tags(self.client, self.run_id, tags, 1 if self._live else 8),
                   lambda: self._append({"tags": tags}))

    def end(self, status: str = "FINISHED") -> None:
        """Flush queued metrics (raises if the store stays unreachable) and terminate the run."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r}: use FINISHED, FAILED or KILLED")
        if not self._live:
            self._flush(attempts=12)
            _retry(lambda: self.client.set_terminated(self.run_id, status), "end run")
            return
        # live: the spool and the status go out as soon as the server answers, waiting up to END_WAIT_S for it
        deadline = time.monotonic() + END_WAIT_S
        while True:
            try:
                with _fast_http():
                    self._replay(attempts=1)
                    self._flush(attempts=1)
                    _retry(lambda: self.client.set_terminated(self.run_id, status), "end run", attempts=1)
                return
            except Exception as exc:  # noqa: BLE001
                if not _transient(exc) or time.monotonic() > deadline:
                    if self._pending:
                        self._spool_pending()
                    raise
                time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))

    def __enter__(self) -> "MemberRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


__all__ = ["TrackingError", "check_server", "tracking_uri", "get_experiment_id", "flatten", "ensure_sweep_run",
           "finish_sweep_run", "summarize_sweep_run", "MemberRun"]
