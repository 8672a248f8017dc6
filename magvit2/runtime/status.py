"""What a training run writes into its status.json, and when (the file itself: magvit2.runs.status). The sweep's
table reads these writes: the state, the step, the last metrics and the steps/s between two log steps."""
from __future__ import annotations

import time

from magvit2.errors import Diverged
from magvit2.runs import RunDir


class RunStatus:
    """One attempt's writes, on the main process only."""

    def __init__(self, run: RunDir):
        self.run = run
        self._mark = None  # (step, time) of the last log step: the steps/s up to the next one

    def opened(self, steps: int, world_size: int, device: str, mlflow_run_id: str | None) -> None:
        """This attempt runs: its wall clock starts (earlier attempts' seconds kept)."""
        self.run.start_attempt(state="running", steps=steps, world_size=world_size, device=device,
                               mlflow_run_id=mlflow_run_id)

    def grid(self, grid: int) -> None:
        """The AR's token grid, for its FLOPs: a resumed attempt logs no params but needs it."""
        self.run.write_status(grid=grid)

    def logged(self, step: int, metrics: dict) -> None:
        now = time.time()
        last = self._mark
        rate = (step - last[0]) / max(now - last[1], 1e-9) if last and step > last[0] else None
        self._mark = (step, now)
        self.run.write_status(step=step, metrics={k: float(v) for k, v in metrics.items()}, steps_per_s=rate)

    def preempted(self, step: int) -> None:
        self.run.write_status(state="preempted", step=step)

    def finished(self, step: int, metrics: dict) -> None:
        self.run.write_status(state="finished", step=step, metrics=metrics)

    def add_metrics(self, metrics: dict) -> None:
        self.run.write_status(metrics={**self.run.read_status().get("metrics", {}), **metrics})

    def failed(self, err: BaseException) -> None:
        self.run.write_status(state="diverged" if isinstance(err, Diverged) else "failed",
                              error=f"{type(err).__name__}: {err}")
