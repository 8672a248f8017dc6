"""Preemption: a signal only sets a flag; the loop checkpoints at the next step boundary, then hands over.

SLURM's warning signal (submitit sends USR2 by default, `--signal` users often pick USR1) -> checkpoint, then
submitit's own handler runs (it calls the launcher's checkpoint(), requeues the job and exits); outside submitit we
requeue with scontrol ourselves. SIGTERM (scontrol requeue, preemption, Ctrl-C'd srun) -> checkpoint and exit; SLURM
requeues the job if it was requeued. Either way the restarted member finds the checkpoint in its run dir.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from magvit2.runs import slurm_job_id

log = logging.getLogger(__name__)
_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._prev: dict[int, object] = {}

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._prev[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._prev.clear()

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            log.warning(f"caught {signal.Signals(signum).name}: checkpointing at the next step boundary")
        self.signum = signum

    def requested(self, accelerator=None) -> bool:
        """True on every process as soon as any process got a signal (one tiny all-reduce when distributed)."""
        flag = self.signum is not None
        if accelerator is not None and accelerator.num_processes > 1:
            import torch
            t = torch.tensor([float(self.signum or 0)], device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            if self.signum is None and t.item() > 0:
                self.signum = signal.SIGTERM
            flag = t.item() > 0
        return flag

    def hand_over(self, is_main: bool) -> None:
        """Called after the checkpoint is on disk. Does not return."""
        signum = self.signum or signal.SIGTERM
        prev = self._prev.get(signum)
        self.uninstall()
        if signum != signal.SIGTERM and callable(prev):
            prev(signum, None)  # submitit: checkpoint() -> requeue -> sys.exit
        elif signum != signal.SIGTERM and is_main and os.environ.get("SLURM_JOB_ID"):
            subprocess.run(["scontrol", "requeue", slurm_job_id()], check=False, timeout=60)
        log.warning("exiting after the preemption checkpoint; a restart resumes from it")
        sys.exit(128 + int(signum))
