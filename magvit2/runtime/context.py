"""One stage's run inside this process: the run dir's lock, the resume (checkpoint + RNG) and the step cadence (log,
eval, checkpoint, preemption, divergence). It calls the components that do the rest: RunStatus (status.json),
Accounting (compute/*, logged by finish() so no training loop has to), open_member_run (the MLflow member run, main
process only). A stage runs through train_stage(), which acquires the run dir and records a failure; its loop calls
open, restore_rng, end_step after every optimizer step, then finish."""
from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig

from magvit2 import config as C
from magvit2.checkpoint import set_rng_state
from magvit2.errors import Diverged
from magvit2.runs import Ckpt, RunDir, storage_error
from magvit2.runtime import dist
from magvit2.runtime.accounting import Accounting
from magvit2.runtime.preempt import Preemption
from magvit2.runtime.status import RunStatus
from magvit2.runtime.tracker import check_server, open_member_run

log = logging.getLogger(__name__)


class RunContext:
    def __init__(self, cfg: DictConfig, stage: str):
        self.cfg, self.stage, self.t = cfg, stage, cfg.trainer[stage]
        self.run = RunDir(C.run_dir(cfg, stage))
        self.acc = dist.make_accelerator(self.t.precision, self.t.grad_accum)
        self.is_main = self.acc.is_main_process
        self.preempt = Preemption()
        self.status = RunStatus(self.run)  # written by the main process only
        self.cost = Accounting(cfg, stage, self.acc)
        self.tracker = None  # the MLflow member run, on the main process once open
        self._lock = None
        self._nonfinite = None  # steps with a non-finite loss, counted on the device (no sync per step)

    run_dir = property(lambda self: self.run.path)
    signature = property(lambda self: self.run.signature)

    def acquire(self) -> dict | None:
        """Lock the run dir (waiting if another process trains it). Returns its status if it already finished.
        A finished run is read without the lock (finished is final), so it is found on a read-only file system too;
        a read-only root otherwise raises StorageError naming paths.root."""
        if self.is_main and not self.run.finished():
            try:
                self.run.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                err = storage_error(e, self.run.path)
                if err is e:
                    raise
                raise err from e
            self._lock = self.run.lock().__enter__()
            self.run.clean_tmp()  # the lock is ours: temp files here are of writers that died
        self.acc.wait_for_everyone()
        done = self.run.finished()
        if done:
            self.close("FINISHED")
        return done

    def open(self) -> dict | None:
        """Load the checkpoint if any, open (or reopen) the MLflow run. Returns the checkpoint."""
        check_server(self.cfg)  # every rank: a refused server stops all ranks at once, not rank 0 alone
        ckpt = self.run.load_resume()  # checkpoint.pt, else checkpoint.prev.pt when the newest does not load
        self.acc.wait_for_everyone()  # every rank has loaded before the unreadable file is set aside
        if self.is_main:
            self.run.set_aside_unreadable()
        dist.seed_everything(int(self.cfg.seed) + self.acc.process_index)  # model init, before any resume
        if self.is_main:
            self.tracker = open_member_run(self.cfg, self.stage, self.run, self.acc.num_processes, ckpt)
            self.run.write_config(self.cfg)
            self.status.opened(int(self.t.steps), self.acc.num_processes, str(self.acc.device), self.tracker.run_id)
        self.preempt.install()
        return ckpt

    def restore_rng(self, ckpt: dict | None) -> None:
        """Call last before the loop: model construction and DataLoader iterators draw from the RNG too."""
        if ckpt is not None:
            set_rng_state(self.run.load_rng(self.acc.process_index, ckpt))
        self.cost.start()

    def log(self, metrics: dict, step: int) -> None:
        if self.is_main and self.tracker is not None and metrics:
            self.tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step)

    def log_params(self, params: dict) -> None:
        if "derived.grid" in params:
            self.cost.grid = int(params["derived.grid"])
            if self.is_main:
                self.status.grid(self.cost.grid)
        if self.is_main and self.tracker is not None:
            try:
                self.tracker.log_params({k: str(v) for k, v in params.items()})
            except Exception as e:  # already logged by the first attempt of a resumed run
                log.debug(f"params not re-logged: {e}")

    def save(self, step: int, payload: dict) -> None:
        self.run.save(step, {**payload, Ckpt.MLFLOW_RUN_ID: self.tracker.run_id if self.tracker else None},
                      self.acc.process_index, self.acc.wait_for_everyone)

    def check_finite(self, step: int) -> None:
        """Raise Diverged once more steps than max_nonfinite_steps had a non-finite loss (summed over ranks, so all
        ranks agree). Called before every checkpoint, so the last checkpoint on disk is a good one."""
        if self._nonfinite is None:
            return
        n = int(self.acc.reduce(self._nonfinite, "sum"))
        if n > int(self.t.get("max_nonfinite_steps", 0)):
            raise Diverged(f"{self.stage} run {self.signature} diverged: {n} step(s) up to step {step} had a "
                           f"non-finite loss (trainer.{self.stage}.max_nonfinite_steps="
                           f"{self.t.get('max_nonfinite_steps', 0)}); lower trainer.{self.stage}.lr or raise the "
                           f"tolerance; its last good checkpoint is kept in {self.run_dir}")

    def logs_at(self, step: int) -> bool:
        """Whether end_step(step) logs metrics (every tracking.log_every steps, and the last): a loop computes
        log-only quantities (the AR's sub-token accuracy) on those steps alone."""
        return step % self.cfg.tracking.log_every == 0 or step == self.t.steps

    def end_step(self, step: int, bar, metrics, evaluate, payload, postfix: dict, losses=()) -> dict | None:
        """What follows optimizer step `step` (1-based) in both loops: every tracking.log_every steps (and the last)
        metrics() -> MLflow, status.json and the bar (postfix: {label: metric key}); every eval_every steps
        evaluate() -> MLflow; every ckpt_every steps a checkpoint of payload(); on a preemption signal a checkpoint,
        then exit. The last step's eval and checkpoint are the loop's own. Returns the logged metrics, else None.
        losses: this step's loss tensors, checked for finiteness at every log step and before every checkpoint."""
        t, logged = self.t, None
        if losses:
            bad = torch.stack([~torch.isfinite(x.detach().float()).all() for x in losses]).any().to(torch.int64)
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        log_step = self.logs_at(step)
        if log_step or step % t.ckpt_every == 0:
            self.check_finite(step)
        if log_step:
            logged = metrics()  # all ranks: it may all-reduce
            self.log(logged, step)
            if self.is_main:
                self.status.logged(step, logged)
            bar.set_postfix({label: f"{logged[k]:.3f}" for label, k in postfix.items()})
        bar.update(1)
        tic = time.perf_counter()  # in-loop eval and checkpoints are not training throughput
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            self.log(evaluate(), step)
        if step % t.ckpt_every == 0 and step != t.steps:
            self.save(step, payload())
        self.cost.step_done(tic)
        if self.preempt.requested(self.acc):  # one all-reduce per step when distributed: asked once
            self.check_finite(step)
            self.save(step, payload())
            if self.is_main:
                self.status.preempted(step)
                self.close("KILLED")
            self.preempt.hand_over(self.is_main)
        return logged

    def finish(self, step: int, results: dict) -> dict:
        self.run.prune(self.acc.process_index)  # the final checkpoint alone: no fallback needed any more
        if self.is_main:
            clean = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            self.status.finished(step, clean)
            cost = self.cost.finish(self.run, self.tracker)
            if cost:
                self.status.add_metrics(cost)
            self.run.write_results({**results, **cost})
            if self.tracker is not None:  # the final eval table; the checkpoint is referenced, not copied
                from magvit2 import tracking
                self.tracker.log_dict(results, "eval.json")
                self.tracker.set_tags({tracking.CHECKPOINT: str(self.run.checkpoint)})
            self.close("FINISHED")
        self.preempt.uninstall()
        self.acc.wait_for_everyone()
        return {"run_dir": str(self.run_dir), "signature": self.signature, **results}

    def fail(self, err: BaseException) -> None:
        """Status and MLflow run set to failed (diverged) as far as possible: a full disk or a dead server must not
        hide `err`, the error the caller re-raises."""
        try:
            if self.is_main:
                diverged = isinstance(err, Diverged)
                try:
                    self.status.failed(err)
                except Exception as e:  # noqa: BLE001 - e.g. the disk is still full
                    log.warning(f"could not record the failure in {self.run.status}: {e}")
                if diverged and self.tracker is not None:
                    from magvit2 import tracking
                    try:
                        self.tracker.set_tags({tracking.RUN_STATE: "diverged"})
                    except Exception as e:  # noqa: BLE001
                        log.warning(f"could not tag the MLflow run diverged: {e}")
                self.close("FAILED")
            else:
                self.run.clean_tmp_of_this_process()
        finally:
            self.preempt.uninstall()

    def close(self, status: str) -> None:
        try:
            if self.tracker is not None:
                try:
                    self.tracker.end(status)
                except Exception as e:  # noqa: BLE001 - the run's files are the record; MLflow is its mirror
                    log.warning(f"MLflow run {self.tracker.run_id} could not be ended {status}: {e}"
                                + (f"; its unsent writes are kept in {self.run.spool}" if self.run.spool.exists()
                                   else ""))
                self.tracker = None
        finally:
            if self._lock is not None:
                if self.is_main:
                    self.run.clean_tmp_of_this_process()
                self._lock.__exit__(None, None, None)
                self._lock = None

    def progress(self, start: int, total: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=start, desc=desc, disable=not self.is_main, dynamic_ncols=True,
                    mininterval=1.0)


def train_stage(cfg: DictConfig, stage: str, train, label: str) -> dict:
    """acquire -> train(ctx) -> on an error, the run recorded failed (ctx.fail) and the error re-raised. A run that
    already finished is not trained: its run dir, signature and final metrics. A SystemExit (the preemption
    hand-over) leaves the run as it is: preempted, to be resumed. label: the run in the log ('AR run')."""
    ctx = RunContext(cfg, stage)
    done = ctx.acquire()
    if done:
        log.info(f"{label} {ctx.signature} already finished: {ctx.run_dir}")
        return {"run_dir": str(ctx.run_dir), "signature": ctx.signature, **done.get("metrics", {})}
    try:
        return train(ctx)
    except BaseException as e:
        if not isinstance(e, SystemExit):
            ctx.fail(e)
        raise
