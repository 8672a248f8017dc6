"""One stage's run inside this process: its RunDir (files), accelerator, MLflow member run (main process only) and
preemption handler. A loop calls acquire, open, restore_rng, end_step after every optimizer step, then finish.
finish() also logs what the run cost (compute/*: magvit2.runtime.compute), so no training loop has to."""
from __future__ import annotations

import logging
import os
import time

import torch
from omegaconf import DictConfig

from magvit2.checkpoint import set_rng_state
from magvit2.errors import Diverged
from magvit2.runs import RunDir
from magvit2.runtime import dist
from magvit2.runtime.preempt import Preemption

log = logging.getLogger(__name__)


class RunContext:
    def __init__(self, cfg: DictConfig, stage: str):
        self.cfg, self.stage, self.t = cfg, stage, cfg.trainer[stage]
        self.run = RunDir.of(cfg, stage)
        self.acc = dist.make_accelerator(self.t.precision, self.t.grad_accum)
        self.is_main = self.acc.is_main_process
        self.preempt = Preemption()
        self.tracker = None  # the MLflow member run, on the main process once open
        self._lock = None
        self._nonfinite = None  # steps with a non-finite loss, counted on the device (no sync per step)
        # this attempt's training clock: steps timed, seconds of in-loop eval/checkpoints to leave out, loop start
        self._clock = {"steps": 0, "excluded": 0.0, "t0": None, "t1": None}
        self._grid = None  # the AR's token grid side (derived.grid), for its FLOPs

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
                from magvit2.runs import storage_error
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
        if str(os.environ.get("MLFLOW_TRACKING_URI") or self.cfg.tracking.uri or "").startswith("http"):
            from magvit2 import tracking  # every rank: a refused server stops all ranks at once, not rank 0 alone
            tracking.check_server(tracking.tracking_uri(str(self.cfg.paths.root), self.cfg.tracking.uri))
        ckpt = self.run.load_resume()  # checkpoint.pt, else checkpoint.prev.pt when the newest does not load
        self.acc.wait_for_everyone()  # every rank has loaded before the unreadable file is set aside
        if self.is_main:
            self.run.set_aside_unreadable()
        dist.seed_everything(int(self.cfg.seed) + self.acc.process_index)  # model init, before any resume
        if self.is_main:
            from magvit2.runtime.tracker import open_member_run
            self.tracker = open_member_run(self.cfg, self.stage, self.run, self.acc.num_processes, ckpt)
            self.run.write_config(self.cfg)
            self.run.write_status(state="running", steps=int(self.t.steps), world_size=self.acc.num_processes,
                                  device=str(self.acc.device), mlflow_run_id=self.tracker.run_id)
        self.preempt.install()
        return ckpt

    def restore_rng(self, ckpt: dict | None) -> None:
        """Call last before the loop: model construction and DataLoader iterators draw from the RNG too."""
        if ckpt is not None:
            set_rng_state(self.run.load_rng(self.acc.process_index, ckpt))
        from magvit2.runtime.compute import reset_peak_memory
        reset_peak_memory(self.acc.device)
        self._clock["t0"] = time.perf_counter()

    def log(self, metrics: dict, step: int) -> None:
        if self.is_main and self.tracker is not None and metrics:
            self.tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step)

    def log_params(self, params: dict) -> None:
        if "derived.grid" in params:  # kept in status.json too: a resumed attempt logs no params but needs it
            self._grid = int(params["derived.grid"])
            if self.is_main:
                self.run.write_status(grid=self._grid)
        if self.is_main and self.tracker is not None:
            try:
                self.tracker.log_params({k: str(v) for k, v in params.items()})
            except Exception as e:  # already logged by the first attempt of a resumed run
                log.debug(f"params not re-logged: {e}")

    def save(self, step: int, payload: dict) -> None:
        self.run.save(step, {**payload, "mlflow_run_id": self.tracker.run_id if self.tracker else None},
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
        log_step = step % self.cfg.tracking.log_every == 0 or step == t.steps
        if log_step or step % t.ckpt_every == 0:
            self.check_finite(step)
        if log_step:
            logged = metrics()  # all ranks: it may all-reduce
            self.log(logged, step)
            if self.is_main:  # steps/s since the last status write: the sweep table's rate and ETA
                now = time.time()
                last = getattr(self, "_rate_mark", None)
                rate = (step - last[0]) / max(now - last[1], 1e-9) if last and step > last[0] else None
                self._rate_mark = (step, now)
                self.run.write_status(step=step, metrics={k: float(v) for k, v in logged.items()},
                                      steps_per_s=rate)
            bar.set_postfix({label: f"{logged[k]:.3f}" for label, k in postfix.items()})
        bar.update(1)
        tic = time.perf_counter()  # in-loop eval and checkpoints are not training throughput
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            self.log(evaluate(), step)
        if step % t.ckpt_every == 0 and step != t.steps:
            self.save(step, payload())
        now = time.perf_counter()
        self._clock.update(steps=self._clock["steps"] + 1, excluded=self._clock["excluded"] + now - tic, t1=now)
        if self.preempt.requested(self.acc):  # one all-reduce per step when distributed: asked once
            self.check_finite(step)
            self.save(step, payload())
            if self.is_main:
                self.run.write_status(state="preempted", step=step)
                self.close("KILLED")
            self.preempt.hand_over(self.is_main)
        return logged

    def finish(self, step: int, results: dict) -> dict:
        self.run.prune(self.acc.process_index)  # the final checkpoint alone: no fallback needed any more
        if self.is_main:
            clean = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            self.run.write_status(state="finished", step=step, metrics=clean)
            cost = self._account()
            if cost:
                self.run.write_status(metrics={**clean, **cost})
            self.run.write_results({**results, **cost})
            if self.tracker is not None:  # the final eval table; the checkpoint is referenced, not copied
                from magvit2 import tracking
                self.tracker.log_dict(results, "eval.json")
                self.tracker.set_tags({tracking.CHECKPOINT: str(self.run.checkpoint)})
            self.close("FINISHED")
        self.preempt.uninstall()
        self.acc.wait_for_everyone()
        return {"run_dir": str(self.run_dir), "signature": self.signature, **results}

    def _account(self) -> dict:
        """compute/* of this run, logged to MLflow (a quantity that cannot be known is logged missing, with why).
        Throughput and FLOP/s are of this attempt's training steps; wall time and device-hours of all attempts."""
        from magvit2.runtime import compute
        from magvit2.runtime.tracker import run_seconds
        from magvit2.sweep.summary import run_device_hours
        try:
            c, dev, world = self._clock, self.acc.device, self.acc.num_processes
            st = self.run.read_status()
            out = {"compute/wall_s": run_seconds(st), "compute/device_hours": run_device_hours(self.run.path),
                   "compute/world_size": float(world)}
            mem_key, out[mem_key] = compute.peak_memory(dev)
            missing, grid = {}, self._grid or st.get("grid")
            flops, how = compute.flops_per_step(self.cfg, self.stage, grid)
            peak, peak_src = compute.peak_flops(dev, str(self.t.precision))
            train_s = (c["t1"] or 0) - (c["t0"] or 0) - c["excluded"]
            if c["steps"] and train_s > 0:
                rate = c["steps"] / train_s
                out["compute/steps_per_s"] = rate
                out["compute/images_per_s"] = rate * int(self.t.batch_size)
                if self.stage == "ar" and grid:
                    out["compute/tokens_per_s"] = out["compute/images_per_s"] * int(grid) ** 2
            else:
                missing["compute/steps_per_s"] = "no training step in this attempt (resumed at its last step)"
            if flops is None:
                missing["compute/flops_per_step"] = how
            else:
                out["compute/flops_per_step"] = flops
                if "compute/steps_per_s" in out:
                    out["compute/achieved_tflops"] = flops * out["compute/steps_per_s"] / 1e12
                    if peak is None:
                        missing["compute/mfu"] = peak_src
                    else:
                        out["compute/mfu"] = flops * out["compute/steps_per_s"] / (peak * world)
            if self.tracker is not None:
                self.log(out, int(self.t.steps))
                for k, why in missing.items():
                    self.tracker.log_missing(k, why)
                self.tracker.set_tags({compute.DEVICE_TAG: compute.device_name(dev), compute.FLOPS_TAG: how,
                                       compute.PEAK_TAG: peak_src})
            return out
        except Exception as e:  # noqa: BLE001 - the accounting never fails a trained run
            log.warning(f"compute accounting of {self.signature} skipped: {type(e).__name__}: {e}")
            return {}

    def fail(self, err: BaseException) -> None:
        """Status and MLflow run set to failed (diverged) as far as possible: a full disk or a dead server must not
        hide `err`, the error the caller re-raises."""
        try:
            if self.is_main:
                diverged = isinstance(err, Diverged)
                try:
                    self.run.write_status(state="diverged" if diverged else "failed",
                                          error=f"{type(err).__name__}: {err}")
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
