"""Run and sweep state on disk: what a status table, a dedup check or a resumed job reads.

run_dir/status.json   {state: new|running|finished|failed|preempted, step, metrics, slurm_job_id, host, updated}
run_dir/checkpoint.pt the latest atomic checkpoint (resume point)
sweeps/<id>/sweep.json  members (overrides, stage, signature, run_dir) and the SLURM job ids they were sent as

A sweep table adds what only the SLURM queue knows: queued (job waits), starting (job runs, run not open yet),
died (job left the queue unfinished: killed, out of memory, node failure), stopped (preempted, not requeued;
resubmitting the sweep resumes it).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from magvit2 import config as C

STATUS = "status.json"
CKPT = "checkpoint.pt"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def read_status(run_dir: Path) -> dict:
    st = read_json(Path(run_dir) / STATUS, None)
    if st is None:
        st = {"state": "partial" if (Path(run_dir) / CKPT).exists() else "new", "step": 0, "metrics": {}}
    return st


def write_status(run_dir: Path, **fields) -> dict:
    st = read_status(run_dir)
    st.update(fields, host=socket.gethostname(), updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    if os.environ.get("SLURM_JOB_ID"):
        st["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"]) + (
            f"_{os.environ['SLURM_ARRAY_TASK_ID']}" if os.environ.get("SLURM_ARRAY_TASK_ID") else "")
    atomic_write_text(Path(run_dir) / STATUS, json.dumps(st, indent=1, default=str))
    return st


def describe_member(cfg: DictConfig, overrides: list[str]) -> dict:
    rd = C.run_dir(cfg)
    st = read_status(rd)
    return {"member": C.member_name(cfg), "overrides": [o for o in overrides if not o.startswith("sweep.")],
            "stage": cfg.stage, "signature": C.signature(cfg), "run_dir": str(rd), "state": st["state"],
            "step": st.get("step", 0), "steps": int(cfg.trainer[cfg.stage].steps), "metrics": st.get("metrics", {}),
            "slurm_job_id": st.get("slurm_job_id")}


def write_sweep(sweep_dir: Path, sid: str, arguments: list[str], rows: list[dict], parent_run: str,
                hydra_dir: str, launcher: str, tracking_uri: str) -> None:
    old = read_json(Path(sweep_dir) / "sweep.json", {}) or {}
    doc = {"id": sid, "arguments": arguments, "parent_run_id": parent_run, "tracking_uri": tracking_uri,
           "launcher": launcher, "hydra_dirs": sorted(set(old.get("hydra_dirs", [])) | {hydra_dir}),
           "jobs": old.get("jobs", {}),
           "members": [{k: r[k] for k in ("member", "overrides", "stage", "signature", "run_dir", "steps")}
                       for r in rows]}
    atomic_write_text(Path(sweep_dir) / "sweep.json", json.dumps(doc, indent=1))


def record_jobs(sweep_dir: Path, jobs: dict[str, str]) -> None:
    """Remember the job each member (by run dir) was just submitted as, before waiting on any of them."""
    doc = read_json(Path(sweep_dir) / "sweep.json", None)
    if doc is not None and jobs:
        doc["jobs"].update(jobs)
        atomic_write_text(Path(sweep_dir) / "sweep.json", json.dumps(doc, indent=1))


TERMINAL = ("finished", "failed")
ENDED = TERMINAL + ("died", "stopped")  # no job will change these members any more (resubmit to continue)


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id: SLURM state} of the given jobs still known to squeue, or None where squeue cannot answer."""
    ids = sorted({j.split("_")[0] for j in job_ids if j})
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:  # every job already left the queue
        return None
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def refresh(sweep_dir: Path) -> list[dict]:
    """Member rows from the run dirs; on SLURM the queue refines what the run dirs cannot know yet (or any more)."""
    doc = read_json(Path(sweep_dir) / "sweep.json", None)
    if doc is None:
        raise FileNotFoundError(f"no sweep recorded at {sweep_dir}")
    rows = []
    for m in doc["members"]:
        st = read_status(Path(m["run_dir"]))
        submitted = doc.get("jobs", {}).get(m["run_dir"])
        rows.append({**m, "state": st["state"], "step": st.get("step", 0), "metrics": st.get("metrics", {}),
                     "slurm_job_id": submitted or st.get("slurm_job_id"),
                     "_jobs": [j for j in (submitted, st.get("slurm_job_id")) if j]})
    live = [r for r in rows if r["state"] not in TERMINAL and r["_jobs"]]
    queue = queue_states([j for r in live for j in r["_jobs"]]) if doc.get("launcher") == "slurm" and live else None
    for r in live if queue is not None else []:
        # our submission, or the job that last wrote the run dir (another sweep sharing this member)
        q = r["job_state"] = next((queue[j] for j in r["_jobs"] if j in queue), None)
        if q in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING") and r["state"] != "running":
            r["state"] = "queued"
        elif q == "RUNNING" and r["state"] in ("new", "partial", "preempted"):
            r["state"] = "starting"  # the job runs, the member has not opened its run yet
        elif q is None:  # left the queue: finished meanwhile, or ended without finishing
            now = read_status(Path(r["run_dir"]))
            gone = "stopped" if now["state"] == "preempted" else "died"  # stopped: a checkpoint to resume
            r.update(state=now["state"] if now["state"] in TERMINAL else gone, step=now.get("step", 0),
                     metrics=now.get("metrics", {}))
    for r in rows:
        del r["_jobs"]
    return rows


def _short(metrics: dict, n: int = 4) -> str:
    keys = [k for k in metrics if k.startswith(("eval/", "val/loss"))][:n] or list(metrics)[:n]
    return " ".join(f"{k.split('/', 1)[-1]}={metrics[k]:.4g}" for k in keys
                    if isinstance(metrics[k], (int, float)))


def format_members(rows: list[dict], title: str = "") -> str:
    from tabulate import tabulate
    table = []
    for i, r in enumerate(rows):
        step = f"{r.get('step', 0)}/{r['steps']}" if r.get("steps") else r.get("step", 0)
        table.append([i, r["member"], r["state"], step, _short(r.get("metrics", {})), r.get("slurm_job_id") or "",
                      r["run_dir"]])
    out = tabulate(table, headers=["#", "member", "state", "step", "last metrics", "slurm job", "run dir"])
    return f"{title}\n{out}" if title else out
