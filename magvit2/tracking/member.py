"""One member's MLflow run: created (a child of its sweep's run) or resumed, params write-once, metrics batched and
never dropped, artifacts and tags; once the training loop runs, its writes go through the offline spool."""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from magvit2.tracking.schema import (HOST, KIND, MAX_PARAM_VALUE, MAX_TAG_VALUE, METRICS_PER_BATCH, N_RESUMES,
                                     PARAMS_OVERFLOW, PARAMS_PER_BATCH, PARENT_RUN_ID, SEE_PARAMS, SEE_TAGS, SIGNATURE,
                                     STAGE, SWEEP_ID, TAGS_OVERFLOW, check_id, missing, plain, scalar, split_long,
                                     valid_key)
from magvit2.tracking.spool import Spool
from magvit2.tracking.store import (fast_http, first_line, get_experiment_id, merge_json_artifact, retry, set_tags,
                                    tracking_uri, transient)
from magvit2.tracking.sweeps import ensure_sweep_run, find_sweep_run

log = logging.getLogger(__name__)


class MemberRun:
    """One member's MLflow run: a child of the sweep run when `sweep_id` is given (nested=False: only tagged with it,
    for a shared run trained for the sweep in another experiment, e.g. its tokenizer); `run_id` given -> resume it."""

    def __init__(self, experiment: str, root: str, stage: str, signature: str, run_name: str, tags: dict,
                 sweep_id: str | None, run_id: str | None = None, uri: str | None = None, nested: bool = True):
        if stage not in ("tokenizer", "ar"):
            raise ValueError(f"stage={stage!r}: use 'tokenizer' or 'ar'")
        self.root, self.uri = root, uri
        self.client = MlflowClient(tracking_uri(root, uri))
        self.experiment_id = get_experiment_id(experiment, root, uri, stage)
        self._pending: list[Metric] = []
        self._spool: Spool | None = None  # set by go_live: the loop's writes wait there while the server is down
        self.resumed = run_id is not None
        if run_id is not None:
            try:
                run = retry(lambda: self.client.get_run(run_id), "get run")
            except MlflowException as exc:
                raise ValueError(f"run_id={run_id!r} is not in {self.client.tracking_uri}: "
                                 "point MLFLOW_TRACKING_URI at the store the run was logged to, or start a new run "
                                 "(run_id=None)") from exc
            self.run_id = run.info.run_id
            n = int(run.data.tags.get(N_RESUMES, "0")) + 1
            retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen run")
            try:
                self.set_tags({**(tags or {}), N_RESUMES: n})
            except BaseException:  # a failed attempt leaves no RUNNING run behind
                self.abandon()
                raise
            return
        base = {KIND: "member", SWEEP_ID: sweep_id or "", STAGE: stage, SIGNATURE: signature,
                HOST: socket.gethostname()}  # the caller adds SLURM_JOB_ID (magvit2.runs.slurm_job_id)
        base.update({str(k): "" if v is None else str(v) for k, v in (tags or {}).items()})
        if sweep_id:
            check_id("sweep_id", sweep_id)
        if sweep_id and nested:  # normally created by the launcher before members start; created here if it is not
            parent = find_sweep_run(self.client, self.experiment_id, sweep_id)
            base[PARENT_RUN_ID] = (parent.info.run_id if parent is not None else
                                   ensure_sweep_run(experiment, root, sweep_id, stage, "", 0, uri))
        kept, long = split_long(base, MAX_TAG_VALUE, SEE_TAGS)
        run = retry(lambda: self.client.create_run(self.experiment_id, tags=kept, run_name=run_name), "create run")
        self.run_id = run.info.run_id
        if long:
            try:
                merge_json_artifact(self.client, self.run_id, TAGS_OVERFLOW, long)
            except BaseException:
                self.abandon()
                raise

    def abandon(self) -> None:
        """FAILED, best effort (one short try): for a run whose opening failed."""
        try:
            with fast_http():
                self.client.set_terminated(self.run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - the opening error is the one to report
            log.warning("mlflow run %s could not be marked FAILED: %s", self.run_id, first_line(exc))

    # -- the training loop's mode: short tries, a spool in the run dir while the server is down
    def go_live(self, spool) -> None:
        """From now on a call that finds the server down writes to `spool` (a file in the run dir) and returns at
        once; the spool is sent when the server answers again (also what an earlier attempt left there)."""
        self._spool = Spool(spool, self.client, self.run_id)
        if self._spool.pending():
            self._spool.call("send spooled writes", lambda: None, lambda: None)

    def _write(self, what: str, fn, record: dict) -> None:
        """fn(): retried before go_live; after it, through the spool (`record`: what it writes, for the spool)."""
        if self._spool is None:
            retry(fn, what)
        else:
            self._spool.call(what, fn, lambda: self._spool.append(record))

    # -- params: write-once
    def log_params(self, flat: dict[str, str]) -> None:
        """Log params; values over 6000 chars (or keys MLflow rejects) go whole into params_overflow.json.
        On a resumed run only keys not logged before are added (MLflow params are write-once)."""
        flat = {str(k): scalar(v) for k, v in flat.items()}
        if self.resumed:
            have = retry(lambda: self.client.get_run(self.run_id), "get run").data.params
            changed = sorted(k for k in flat if k in have and have[k] != flat[k] and have[k] != SEE_PARAMS)
            if changed:
                log.warning("resumed run %s: params are write-once, keeping logged values of %s", self.run_id, changed)
            flat = {k: v for k, v in flat.items() if k not in have}
        overflow = {k: v for k, v in flat.items() if not valid_key(k)}
        kept, long = split_long({k: v for k, v in flat.items() if k not in overflow}, MAX_PARAM_VALUE, SEE_PARAMS)
        overflow.update(long)
        if overflow:
            merge_json_artifact(self.client, self.run_id, PARAMS_OVERFLOW, overflow)
        items = [Param(k, v) for k, v in kept.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i:i + PARAMS_PER_BATCH]
            retry(lambda: self.client.log_batch(self.run_id, params=chunk, synchronous=True), "log params")

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
        if self._spool is not None:
            self._spool.call("log metrics", lambda: self._flush(attempts=1), self._spool_pending)
            return
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001
            if not transient(exc):
                raise
            log.warning("mlflow unreachable; %d metric values queued for the next call", len(self._pending))

    def _flush(self, attempts: int = 8) -> None:
        while self._pending:
            chunk = self._pending[:METRICS_PER_BATCH]
            retry(lambda: self.client.log_batch(self.run_id, metrics=chunk, synchronous=True), "log metrics",
                  attempts=attempts)
            del self._pending[:len(chunk)]

    def _spool_pending(self) -> None:
        self._spool.append_metrics(self._pending)
        self._pending.clear()

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
        self._write("log artifact", lambda: fn(self.run_id, str(path), artifact_path),
                    {"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_image(self, image, name: str) -> None:
        """PIL image, HxWxC / HxW array (uint8 or float in [0, 1]) or a CxHxW tensor -> artifact `name`."""
        if hasattr(image, "detach"):  # torch tensor without importing torch here
            image = image.detach().float().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3, 4):
                image = image.transpose(1, 2, 0)
        retry(lambda: self.client.log_image(self.run_id, image, artifact_file=name), "log image")

    def log_dict(self, d: dict, name: str) -> None:
        self._write("log dict", lambda: self.client.log_dict(self.run_id, d, name), {"dict": plain(d), "name": name})

    def set_tags(self, tags: dict) -> None:
        tags = {str(k): "" if v is None else str(v) for k, v in tags.items()}
        attempts = 8 if self._spool is None else 1
        self._write("log tags", lambda: set_tags(self.client, self.run_id, tags, attempts), {"tags": tags})

    def end(self, status: str = "FINISHED") -> None:
        """Flush queued metrics (raises if the store stays unreachable) and terminate the run."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r}: use FINISHED, FAILED or KILLED")
        if self._spool is None:
            self._flush(attempts=12)
            retry(lambda: self.client.set_terminated(self.run_id, status), "end run")
            return

        def last_calls():
            self._flush(attempts=1)
            retry(lambda: self.client.set_terminated(self.run_id, status), "end run", attempts=1)

        self._spool.finish(last_calls, lambda: self._spool_pending() if self._pending else None)

    def __enter__(self) -> "MemberRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))
