"""`hydra/launcher=slurm` and `hydra/launcher=local`: hydra-submitit-launcher with project defaults.

Adds to the upstream launchers: `srun_args` (default --export=ALL so the job sees the submitting env), requeue on
(`max_num_timeout`), and `detach: true`, which returns as soon as the job array is submitted so a login shell can
leave; `python -m magvit2.sweep status <id>` reconnects.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.magvit2.Magvit2SlurmLauncher"
    submitit_folder: str = "${paths.root}/submitit/%j"
    partition: Optional[str] = None
    timeout_min: int = 24 * 60
    tasks_per_node: int = 1               # = GPUs per node: one process per GPU, one accelerate group per member
    gpus_per_node: Optional[int] = None
    nodes: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    max_num_timeout: int = 20             # requeues on timeout/preemption (the run resumes from its checkpoint)
    signal_delay_s: int = 120
    srun_args: List[str] = field(default_factory=lambda: ["--export=ALL"])
    setup: Optional[List[str]] = None     # shell lines run before srun (module load, source venv, ...)
    detach: bool = False


@dataclass
class LocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.magvit2.Magvit2LocalLauncher"
    submitit_folder: str = "${paths.root}/submitit/%j"
    timeout_min: int = 24 * 60
    detach: bool = False                  # refused: local jobs are children of the submitting process


ConfigStore.instance().store(group="hydra/launcher", name="slurm", node=SlurmConf)
ConfigStore.instance().store(group="hydra/launcher", name="local", node=LocalConf)


class _Detachable(upstream.BaseSubmititLauncher):
    def __init__(self, **params: Any) -> None:
        self.detach = bool(params.pop("detach", False))
        if self.detach and self._EXECUTOR == "local":
            print("error: hydra.launcher.detach=true needs hydra/launcher=slurm: local jobs are children of this "
                  "command and end with it; drop detach (or run the sweep under nohup/tmux)", file=sys.stderr)
            sys.exit(2)
        super().__init__(**params)
        self.submitted: list = []
        self.on_submit = None  # the sweeper records job ids here, before any result is awaited

    def _executor(self):
        import submitit
        p = dict(self.params)
        init = {"folder": p.pop("submitit_folder")}
        if "max_num_timeout" in p:
            init[f"{self._EXECUTOR}_max_num_timeout"] = p.pop("max_num_timeout")
        ex = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        ex.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in p.items()})
        return ex

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        args = []
        for i, ov in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(ov))}")
            args.append((list(ov), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                         Singleton.get_state()))
        jobs = self._executor().map_array(self, *zip(*args))
        self.submitted = [(list(ov), j.job_id) for ov, j in zip(job_overrides, jobs)]
        for ov, jid in self.submitted:
            log.info(f"submitted job {jid}: {' '.join(filter_overrides(ov))}")
        if self.on_submit is not None:
            self.on_submit([jid for _, jid in self.submitted])
        if self.detach:
            return []
        return [j.results()[0] for j in jobs]


class SlurmLauncher(_Detachable, upstream.SlurmLauncher):
    _EXECUTOR = "slurm"


class LocalLauncher(_Detachable, upstream.LocalLauncher):
    _EXECUTOR = "local"
