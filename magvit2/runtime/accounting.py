"""What a run cost, logged at its end as compute/* (a quantity that cannot be known is logged missing, with why).
Throughput and FLOP/s are of this attempt's training steps, with in-loop eval and checkpoints left out; wall time
and device-hours are of all attempts (status.json: magvit2.runs.status). FLOPs, peaks, memory: runtime.compute."""
from __future__ import annotations

import logging
import time

from magvit2.runs import RunDir
from magvit2.runtime import compute

log = logging.getLogger(__name__)


class Accounting:
    def __init__(self, cfg, stage: str, acc):
        self.cfg, self.stage, self.t, self.acc = cfg, stage, cfg.trainer[stage], acc
        self.grid = None  # the AR's token grid side (derived.grid), for its FLOPs
        self.steps, self.excluded, self.t0, self.t1 = 0, 0.0, None, None  # this attempt's training clock

    def start(self) -> None:
        """The loop starts: peak memory and the training clock from here."""
        compute.reset_peak_memory(self.acc.device)
        self.t0 = time.perf_counter()

    def step_done(self, untimed_from: float) -> None:
        """A step ended; what ran since `untimed_from` (perf_counter: in-loop eval, checkpoints) is not training."""
        now = time.perf_counter()
        self.steps, self.excluded, self.t1 = self.steps + 1, self.excluded + now - untimed_from, now

    def finish(self, run: RunDir, tracker) -> dict:
        """compute/* of this run, logged to the MLflow run `tracker` (None: not logged); {} if it cannot be counted
        (the accounting never fails a trained run)."""
        try:
            dev, world = self.acc.device, self.acc.num_processes
            st = run.read_status()
            out = {"compute/wall_s": run.wall_seconds(), "compute/device_hours": run.device_hours(),
                   "compute/world_size": float(world)}
            mem_key, out[mem_key] = compute.peak_memory(dev)
            missing, grid = {}, self.grid or st.get("grid")
            flops, how = compute.flops_per_step(self.cfg, self.stage, grid)
            peak, peak_src = compute.peak_flops(dev, str(self.t.precision))
            train_s = (self.t1 or 0) - (self.t0 or 0) - self.excluded
            if self.steps and train_s > 0:
                rate = self.steps / train_s
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
            if tracker is not None:
                tracker.log_metrics({k: float(v) for k, v in out.items()}, int(self.t.steps))
                for k, why in missing.items():
                    tracker.log_missing(k, why)
                tracker.set_tags({compute.DEVICE_TAG: compute.device_name(dev), compute.FLOPS_TAG: how,
                                  compute.PEAK_TAG: peak_src})
            return out
        except Exception as e:  # noqa: BLE001 - the accounting never fails a trained run
            log.warning(f"compute accounting of {run.signature} skipped: {type(e).__name__}: {e}")
            return {}
