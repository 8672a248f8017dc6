"""Sweep state on disk: what a status table or a dedup check reads (run dirs: magvit2.runs).

sweeps/<id>/sweep.json  members (overrides, stage, signature, run_dir) and the SLURM job ids they were sent as

A sweep table adds what only the SLURM queue knows: queued (job waits), starting (job runs, run not open yet),
died (job left the queue unfinished: killed, out of memory, node failure), stopped (preempted, not requeued;
resubmitting the sweep resumes it).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from omegaconf import DictConfig

from magvit2 import config as C
from magvit2.runs import RunDir, atomic_write_text, read_json


def describe_member(cfg: DictConfig, overrides: list[str]) -> dict:
    rd = RunDir.of(cfg)
    st = rd.read_status()
    return {"member": C.member_name(cfg), "overrides": [o for o in overrides if not o.startswith("sweep.")],
            "stage": cfg.stage, "signature": rd.signature, "run_dir": str(rd), "state": st["state"],
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


TERMINAL = ("finished", "failed", "diverged")
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
        st = RunDir(m["run_dir"]).read_status()
        submitted = doc.get("jobs", {}).get(m["run_dir"])
        rows.append({**m, "state": st["state"], "step": st.get("step", 0), "metrics": st.get("metrics", {}),
                     "steps_per_s": st.get("steps_per_s"),
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
            now = RunDir(r["run_dir"]).read_status()
            gone = "stopped" if now["state"] == "preempted" else "died"  # stopped: a checkpoint to resume
            r.update(state=now["state"] if now["state"] in TERMINAL else gone, step=now.get("step", 0),
                     metrics=now.get("metrics", {}))
    for r in rows:
        del r["_jobs"]
    return rows


def _short(metrics: dict, n: int = 4) -> str:
    """A few metrics with their prefix kept (train/ while running, eval/ and val/ once finished)."""
    keys = [k for k in metrics if k.startswith(("eval/", "val/loss"))][:n] or list(metrics)[:n]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics[k], (int, float)))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_members(rows: list[dict], title: str = "") -> str:
    from tabulate import tabulate
    table = []
    for i, r in enumerate(rows):
        step = f"{r.get('step', 0)}/{r['steps']}" if r.get("steps") else r.get("step", 0)
        rate, eta = r.get("steps_per_s"), ""
        if rate and r["state"] == "running" and r.get("steps"):
            eta = _duration((r["steps"] - r.get("step", 0)) / rate)
        table.append([i, r["member"], r["state"], step, f"{rate:.3g}" if rate else "", eta,
                      _short(r.get("metrics", {})), r.get("slurm_job_id") or "", r["run_dir"]])
    out = tabulate(table, headers=["#", "member", "state", "step", "steps/s", "ETA", "last metrics", "slurm job",
                                   "run dir"])
    return f"{title}\n{out}" if title else out


# The key metric a sweep's summary ranks members by, in order of preference: (key, lower is better).
KEY_METRICS = (("eval/fid", True), ("val/loss", True), ("eval/rfid", True), ("eval/psnr", False))


def winner_line(rows: list[dict]) -> str | None:
    """'winner by <key>: <member> (<value> vs <runner-up> <value>, <delta>)' over the finished members."""
    done = [r for r in rows if r["state"] == "finished"]
    for key, lower in KEY_METRICS:
        have = [r for r in done if isinstance(r.get("metrics", {}).get(key), (int, float))]
        if not have:
            continue
        have.sort(key=lambda r: r["metrics"][key], reverse=not lower)
        best = have[0]
        line = f"winner by {key} ({'lower' if lower else 'higher'} is better): {best['member']} " \
               f"{best['metrics'][key]:.4g}"
        if len(have) > 1:
            second = have[1]
            d = best["metrics"][key] - second["metrics"][key]
            rel = f", {d / abs(second['metrics'][key]):+.1%}" if second["metrics"][key] else ""
            line += f" vs {second['member']} {second['metrics'][key]:.4g} ({d:+.4g}{rel}; n = 1 seed each)"
        return line
    return None
