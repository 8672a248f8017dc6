"""The offline spool: a member run's writes while its server does not answer.

Once a member's run is open, the training loop must not wait minutes on a dead server (MLflow's own HTTP retries
plus store.retry): `Spool.call` wraps each of the run's client calls with one short try; when the server does not
answer, what the call would have written goes to the run dir's spool (metrics.jsonl, one JSON record a line) and the
server is tried again after PROBE_S; the spool is sent, in order, once it answers, at the latest when the run ends
(`finish` waits up to END_WAIT_S for it).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from magvit2.tracking.schema import METRICS_PER_BATCH
from magvit2.tracking.store import fast_http, first_line, retry, set_tags, transient

log = logging.getLogger(__name__)

PROBE_S = float(os.environ.get("MAGVIT2_MLFLOW_PROBE_S", "10"))
END_WAIT_S = float(os.environ.get("MAGVIT2_MLFLOW_END_WAIT_S", "180"))


class Spool:
    """The spool file `path` of run `run_id`, and whether its server is known to be down."""

    def __init__(self, path, client: MlflowClient, run_id: str):
        self.path, self.client, self.run_id = Path(path), client, run_id
        self._retry_at = 0.0  # time.monotonic() before which a down server is not tried again

    def pending(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def call(self, what: str, fn, fallback):
        """fn() with one short try, after the spool is sent; the server down (a transient error) -> fallback(),
        which spools what fn would have written."""
        if time.monotonic() < self._retry_at:
            fallback()
            return None
        try:
            with fast_http():
                self.replay(attempts=1)
                return retry(fn, what, attempts=1)
        except Exception as exc:  # noqa: BLE001 - classified
            if not transient(exc):
                raise
            if not self._retry_at:
                log.warning("mlflow server unreachable (%s): run %s goes on, its MLflow writes wait in %s and are "
                            "sent when the server answers (tried again every %.0f s)", first_line(exc), self.run_id,
                            self.path, PROBE_S)
            self._retry_at = time.monotonic() + PROBE_S
            fallback()
            return None

    def finish(self, fn, fallback) -> None:
        """The run's last calls: the spool, then fn(), as soon as the server answers, waiting up to END_WAIT_S for
        it; a server still down (or a refusal) -> fallback() and the error is raised."""
        deadline = time.monotonic() + END_WAIT_S
        while True:
            try:
                with fast_http():
                    self.replay(attempts=1)
                    fn()
                return
            except Exception as exc:  # noqa: BLE001
                if not transient(exc) or time.monotonic() > deadline:
                    fallback()
                    raise
                time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))

    # -- records: {"metrics": [[key, value, timestamp, step], ...]}, {"tags": {...}}, {"dict": ..., "name": ...},
    #    {"artifact": path, "artifact_path": ...}
    def append(self, *records: dict) -> None:
        try:
            with open(self.path, "a") as f:
                for r in records:
                    f.write(json.dumps(r, default=str) + "\n")
                f.flush()
        except OSError as exc:  # a full disk too: the metrics are lost, the run goes on
            log.error("could not spool MLflow writes to %s (%s): %d record(s) lost", self.path, exc, len(records))

    def append_metrics(self, metrics: list[Metric]) -> None:
        ms = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
        self.append(*({"metrics": ms[i:i + METRICS_PER_BATCH]} for i in range(0, len(ms), METRICS_PER_BATCH)))

    def replay(self, attempts: int) -> None:
        """Send the spool in order; what could not be sent stays in it (raises the error)."""
        if not self.pending():
            return
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        done = 0
        try:
            for r in records:
                self._send(r, attempts)
                done += 1
        finally:
            rest = records[done:]
            if not rest:
                self.path.unlink(missing_ok=True)
                log.info("mlflow server answers again: %d spooled write(s) of run %s sent", done, self.run_id)
                self._retry_at = 0.0
            elif done:
                from magvit2.runs import atomic_write_text
                atomic_write_text(self.path, "".join(json.dumps(x, default=str) + "\n" for x in rest))

    def _send(self, r: dict, attempts: int) -> None:
        client, rid = self.client, self.run_id
        if "metrics" in r:
            ms = [Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in r["metrics"]]
            retry(lambda: client.log_batch(rid, metrics=ms, synchronous=True), "log spooled metrics",
                  attempts=attempts)
        elif "tags" in r:
            set_tags(client, rid, r["tags"], attempts)
        elif "dict" in r:
            retry(lambda: client.log_dict(rid, r["dict"], r["name"]), "log spooled dict", attempts=attempts)
        elif "artifact" in r:
            if Path(r["artifact"]).exists():
                fn = client.log_artifacts if Path(r["artifact"]).is_dir() else client.log_artifact
                retry(lambda: fn(rid, r["artifact"], r.get("artifact_path")), "log spooled artifact",
                      attempts=attempts)
            else:
                log.warning("spooled artifact %s is gone: not logged to run %s", r["artifact"], rid)
