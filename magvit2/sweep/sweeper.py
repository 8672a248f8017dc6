"""The magvit2 Hydra sweeper: Hydra's basic sweeper plus what ablation sweeps need.

Before anything is launched it composes and validates every member (one bad member stops the sweep with a message
naming it), derives each member's signature and run dir, and skips members that already finished, so re-running
a sweep trains only what is missing. It records the sweep (sweep.json under paths.root/sweeps/<id>) and opens one
MLflow parent run; every member gets `sweep.id` / `sweep.parent_run_id` appended to its overrides.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper

from magvit2 import config as C
from magvit2.errors import TrackingError
from magvit2.runs import SweepDir
from magvit2.sweep import state, summary

log = logging.getLogger(__name__)


@dataclass
class Magvit2SweeperConf:
    _target_: str = "hydra_plugins.magvit2.Magvit2Sweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None   # sweeps defined in config (experiments/experiment/*.yaml)


ConfigStore.instance().store(group="hydra/sweeper", name="magvit2", node=Magvit2SweeperConf)


def sweep_id_for(rows: List[dict]) -> str:
    """Stable id from what the members are (stage and signature), not from how the overrides were spelled: the
    same sweep submitted again, or written with a redundant `model=tiny` or in another order, gets the same id."""
    key = json.dumps(sorted(f"{r['stage']}:{r['signature']}" for r in rows))
    return hashlib.sha256(key.encode()).hexdigest()[:10]


class Magvit2Sweeper(Sweeper):
    # Not a BasicSweeper subclass: Hydra's plugin scan re-executes core plugin modules, which breaks subclasses.
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins
        self.hydra_context, self.config = hydra_context, config
        # Hydra sets HydraConfig only per job, but the launcher's submitit_folder (${paths.root}) may resolve
        # ${hydra:runtime.cwd} when the launcher is instantiated here: set it from the multirun config first.
        HydraConfig.instance().set_config(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        arguments = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        members, rows, axes = plan(self.hydra_context.config_loader, self.config, arguments)
        sid = self.config.sweep.id or sweep_id_for(rows)
        dry = bool(self.config.get("dry_run", False))
        sweep_dir = SweepDir.of(self.config.paths.root, sid).path
        _overlay_earlier_jobs(sweep_dir, rows)
        print(state.format_members(rows, title=f"sweep {sid}: {len(rows)} members"
                                   + (" (dry run: nothing trained)" if dry else "")))
        if dry:
            return []
        todo = dedup(members, rows)
        closed = None if todo else summary.closed_summary(sweep_dir, rows)
        if closed is not None:  # nothing to train and the record covers these members: it stands as it is
            print(state.format_members(rows, title=f"sweep {sid}: results (already complete; its record stands)"))
            win = state.winner_line(rows)
            if win:
                print(win)
            print(summary.usage_line(closed["wall_s"], rows))
            print(f"next: python -m magvit2.report --sweep {sid}")
            return []
        parent = open_sweep(self.config, self.launcher, sweep_dir, sid, arguments, rows, axes)
        root = str(self.config.paths.root)
        results = launch(self.launcher, sweep_dir, sid, parent, todo, self.max_batch_size)
        if todo and getattr(self.launcher, "detach", False):
            # members finish on their own; `magvit2.sweep status` reports them and closes the parent run
            print(state.format_members(state.refresh(sweep_dir), title=f"sweep {sid}: submitted, not waiting"))
            print(f"reconnect with: python -m magvit2.sweep status {sid} --root {root} [--wait]")
            return []
        close(sweep_dir, sid, parent, results, root)
        for b in results:  # surface a member's exception like Hydra's basic sweeper does
            for r in b:
                _ = r.return_value
        return results


def plan(loader, config, arguments: List[str]) -> tuple[List[List[str]], List[dict], Dict[str, List[str]]]:
    """Every member's overrides and table row (signature, run dir, state), composed and validated, and the swept
    axes ({key: values}); exits with one message naming every bad member before anything starts."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    axes = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    swept = set(axes)
    members = [list(m) for m in BasicSweeper.split_arguments(parsed, None)[0]]
    rows, errors = [], []
    for i, ov in enumerate(members):
        try:
            cfg = loader.load_sweep_config(config, ov)
            HydraConfig.instance().set_config(cfg)  # so ${hydra:...} resolves as it will inside the job
            C.validate(cfg)
            row = state.describe_member(cfg, ov)
            row["member"] = _label(ov, swept) or row["member"]
            rows.append(row)
        except Exception as e:  # composition errors and ConfigError alike name the member
            label = " ".join(o for o in ov if o.split("=", 1)[0] in swept) or " ".join(ov)
            errors.append(f"  member #{i} [{label}]: {e}")
    if errors:
        print("error: the sweep was not started; fix these members:\n" + "\n".join(errors), file=sys.stderr)
        sys.exit(2)
    return members, rows, axes


def dedup(members: List[List[str]], rows: List[dict]) -> List[tuple]:
    """(overrides, row) of the members to submit: neither finished nor queued/running as an earlier job."""
    alive = {r["run_dir"]: r["slurm_job_id"] for r in rows if r.get("job_state") and r["state"] not in state.ENDED}
    todo = [(m, r) for m, r in zip(members, rows) if r["state"] != "finished" and r["run_dir"] not in alive]
    done = sum(r["state"] == "finished" for r in rows)
    if done:
        log.info(f"{done} of {len(rows)} members already finished: their stored results stand")
    if len(rows) - len(todo) > done:
        log.info(f"{len(rows) - len(todo) - done} members still queued or running as their earlier jobs "
                 f"({', '.join(sorted(alive.values()))}): not submitted again")
    return todo


def open_sweep(config, launcher, sweep_dir: Path, sid: str, arguments: List[str], rows: List[dict],
               axes: Dict[str, List[str]]) -> str:
    """The sweep's MLflow parent run (checked server first) and its sweep.json record; returns the parent run id."""
    from magvit2 import tracking  # mlflow import only when something is launched
    root, stage = str(config.paths.root), str(config.stage)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri(root, config.tracking.uri))
    try:  # before anything is submitted: a refused tracking server fails the sweep once, with what to change
        tracking.check_server()
    except TrackingError as e:
        print(f"error: the sweep was not started: {e}", file=sys.stderr)
        sys.exit(2)
    sigs = [r["signature"] for r in rows] + [Path(r["tokenizer"]["run_dir"]).name for r in rows if r.get("tokenizer")]
    parent = tracking.ensure_sweep_run(f"{config.tracking.experiment_prefix}-{stage}", root, sid, stage,
                                       " ".join(arguments), len(rows), members=sigs)
    kind = getattr(launcher, "_EXECUTOR", "basic")  # submitit launchers: "slurm" | "local"
    SweepDir(sweep_dir).write(sid, arguments, rows, parent, str(config.hydra.sweep.dir), kind,
                              os.environ["MLFLOW_TRACKING_URI"], axes)
    return parent


def launch(launcher, sweep_dir: Path, sid: str, parent: str, todo: List[tuple], batch: Optional[int]) -> list:
    """Submit `todo` in batches, recording each job id in sweep.json before waiting on any; the parent run is
    marked FAILED if submission fails."""
    from magvit2 import tracking
    extra = [f"sweep.id='{sid}'", f"+sweep.parent_run_id='{parent}'"]  # quoted: hex ids can parse as numbers
    # sweep.stage: a member's run of another stage (the tokenizer it trains first) is shared, not a member
    jobs = [m + extra + [f"+sweep.member='{r['member']}'", f"+sweep.stage={r['stage']}"] for m, r in todo]
    results = []
    n = batch or len(jobs) or 1
    try:
        for idx in range(0, len(jobs), n):
            run_dirs = [r["run_dir"] for _, r in todo[idx:idx + n]]
            if hasattr(launcher, "on_submit"):
                launcher.on_submit = lambda ids, d=run_dirs: SweepDir(sweep_dir).record_jobs(dict(zip(d, ids)))
            results.append(launcher.launch(jobs[idx:idx + n], initial_job_idx=idx))
    except BaseException:
        tracking.finish_sweep_run(parent, "FAILED")
        raise
    return results


_T0 = time.monotonic()  # the sweep command's start (this module is imported when it starts)


def close(sweep_dir: Path, sid: str, parent: str, results: list, root: str) -> None:
    """After a blocking launch: the results table, and the parent run closed unless earlier jobs still run members."""
    from magvit2 import tracking
    final = state.refresh(sweep_dir)
    if any(r["state"] not in state.ENDED for r in final):  # earlier jobs still run members: not ours to close
        print(state.format_members(final, title=f"sweep {sid}: still running"))
        print(f"follow with: python -m magvit2.sweep status {sid} --root {root} --wait")
    else:
        failed = [r for b in results for r in b if _failed(r)] or [r for r in final if r["state"] != "finished"]
        wall = time.monotonic() - _T0
        try:  # the results stand without their MLflow copy
            wall = summary.record(sweep_dir, final, wall)
        except Exception as e:  # noqa: BLE001
            print(f"warning: the sweep's summary was not written to its MLflow parent run: {type(e).__name__}: {e}",
                  file=sys.stderr)
        tracking.finish_sweep_run(parent, "FAILED" if failed else "FINISHED")
        print(state.format_members(final, title=f"sweep {sid}: results"))
        win = state.winner_line(final)
        if win:
            print(win)
        print(summary.usage_line(wall, final))
        print(f"next: python -m magvit2.report --sweep {sid}")


def _overlay_earlier_jobs(sweep_dir: Path, rows: List[dict]) -> None:
    """If this sweep was submitted before, take each member's state from its earlier job as well (queued, running,
    died, ...), so members whose jobs are still alive are not submitted twice."""
    if SweepDir(sweep_dir).exists():
        earlier = {r["run_dir"]: r for r in state.refresh(sweep_dir)}
        for r in rows:
            e = earlier.get(r["run_dir"])
            if e is not None:
                r.update({k: e.get(k) for k in ("state", "step", "metrics", "slurm_job_id", "job_state")})


def _label(overrides: List[str], swept: set) -> str:
    """A member's name from its swept values: 'k6_12-B', 'k6_12-n_intra=0'."""
    parts = []
    for o in overrides:
        k, _, v = o.partition("=")
        if k in swept:
            parts.append(v if "." not in k else f"{k.rsplit('.', 1)[-1]}={v}")
    return "-".join(parts)


def _failed(ret) -> bool:
    from hydra.core.utils import JobStatus
    return getattr(ret, "status", None) == JobStatus.FAILED
