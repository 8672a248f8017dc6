"""Sweep state: what a status table or a dedup check reads from the sweep dir (sweep.json: magvit2.runs.SweepDir),
the members' run dirs (magvit2.runs.RunDir) and the SLURM queue.

A sweep table adds what only the SLURM queue knows: queued (job waits), starting (job runs, run not open yet),
died (job left the queue unfinished: killed, out of memory, node failure), stopped (preempted, not requeued;
resubmitting the sweep resumes it); and what the shared tokenizer's run dir and lock say: waiting (the member's
job waits for the tokenizer another member trains).
"""
from __future__ import annotations

import fcntl
import subprocess
import statistics
from pathlib import Path

from omegaconf import DictConfig

from magvit2 import config as C
from magvit2.metrics import registry
from magvit2.runs import RunDir, SweepDir
from magvit2.runtime.tracker import tokenizer_run_name


def describe_member(cfg: DictConfig, overrides: list[str]) -> dict:
    rd = RunDir(C.run_dir(cfg))
    st = rd.read_status()
    row = {"member": C.member_name(cfg), "overrides": [o for o in overrides if not o.startswith("sweep.")],
           "stage": cfg.stage, "signature": rd.signature, "run_dir": str(rd), "state": st["state"],
           "step": st.get("step", 0), "steps": int(cfg.trainer[cfg.stage].steps), "metrics": st.get("metrics", {}),
           "slurm_job_id": st.get("slurm_job_id")}
    if cfg.stage == "ar" and cfg.tokens.tokenizer in (None, "auto"):  # trained first (once) by whichever job locks it
        tok = RunDir(C.run_dir(cfg, "tokenizer"))
        row["tokenizer"] = {"name": tokenizer_run_name(cfg, tok.signature), "run_dir": str(tok),
                            "steps": int(cfg.trainer.tokenizer.steps)}
    return row


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
    doc = SweepDir(sweep_dir).read()
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
    _mark_waiting(rows)
    return rows


def _locked(run_dir: str) -> bool:
    """Whether a process holds the run dir's lock (<run dir>.lock) right now."""
    try:
        with open(str(run_dir) + ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with the trainer's exclusive lock only
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:  # no lock file: nobody ever trained it
        return False


def shared_rows(rows: list[dict]) -> list[dict]:
    """One row per shared tokenizer run the members train first, from its run dir and lock: state, step, steps/s,
    the job that trains it."""
    out = []
    for tok in {r["tokenizer"]["run_dir"]: r["tokenizer"] for r in rows if r.get("tokenizer")}.values():
        st = RunDir(tok["run_dir"]).read_status()
        state = st["state"]
        if state in ("new", "partial", "preempted") and _locked(tok["run_dir"]):
            state = "starting"  # a job holds its lock and has not opened the run yet
        out.append({"member": tok["name"], "stage": "tokenizer", "signature": Path(tok["run_dir"]).name,
                    "run_dir": tok["run_dir"], "state": state, "step": st.get("step", 0),
                    "steps": st.get("steps") or tok["steps"], "steps_per_s": st.get("steps_per_s"),
                    "metrics": st.get("metrics", {}), "slurm_job_id": st.get("slurm_job_id")})
    return out


def _mark_waiting(rows: list[dict]) -> None:
    """Members whose job has not opened their run while their tokenizer trains: `waiting`, and which one they wait
    for (the member whose job trains it says so instead)."""
    busy = {t["run_dir"]: t for t in shared_rows(rows) if t["state"] in ("starting", "running")}
    for r in rows:
        t = busy.get((r.get("tokenizer") or {}).get("run_dir"))
        if t is None or r["state"] not in ("new", "partial", "starting"):
            continue
        if t.get("slurm_job_id") and t["slurm_job_id"] == r.get("slurm_job_id"):
            r["note"] = f"training tokenizer {t['signature']}"
        else:
            r.update(state="waiting", note=f"waiting for tokenizer {t['signature']}")


def _value(key: str, v: float) -> str:
    m = registry.get(key)  # as the run's summary and the report show it: utilization 1.18%, not 0.0118
    return m.text(v) if m else f"{v:.4g}"


def _short(metrics: dict, n: int = 4) -> str:
    """A few metrics with their prefix kept (train/ while running, eval/ and val/ once finished)."""
    keys = [k for k in metrics if k.startswith(("eval/", "val/loss"))][:n] or list(metrics)[:n]
    return " ".join(f"{k}={_value(k, metrics[k])}" for k in keys if isinstance(metrics[k], (int, float)))


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_members(rows: list[dict], title: str = "") -> str:
    """The member table; a shared tokenizer the members train first gets its own row (#: tok) above them."""
    from tabulate import tabulate
    table = []
    for i, r in [("tok", t) for t in shared_rows(rows)] + list(enumerate(rows)):
        step = f"{r.get('step', 0)}/{r['steps']}" if r.get("steps") else r.get("step", 0)
        rate, eta = r.get("steps_per_s"), ""
        if rate and r["state"] == "running" and r.get("steps"):
            eta = duration((r["steps"] - r.get("step", 0)) / rate)
        table.append([i, r["member"], r["state"], step, f"{rate:.3g}" if rate else "", eta,
                      r.get("note") or _short(r.get("metrics", {})), r.get("slurm_job_id") or "", r["run_dir"]])
    out = tabulate(table, headers=["#", "member", "state", "step", "steps/s", "ETA", "last metrics", "slurm job",
                                   "run dir"])
    return f"{title}\n{out}" if title else out


# The key metric a sweep's summary ranks members by, in order of preference; each one a ranked registry row (a
# claim with a better direction, comparable across factorizations).
KEY_METRICS = ("eval/fid", "val/loss", "eval/rfid", "eval/psnr")


def ranked(rows: list[dict]) -> tuple[str, bool, list[dict]] | None:
    """(key metric, lower is better, finished members best first) for the first KEY_METRICS key they logged."""
    done = [r for r in rows if r["state"] == "finished"]
    for key in KEY_METRICS:
        lower = registry.get(key).better == "lower"
        have = [r for r in done if isinstance(r.get("metrics", {}).get(key), (int, float))]
        if have:
            return key, lower, sorted(have, key=lambda r: r["metrics"][key], reverse=not lower)
    return None


def _arm(row: dict) -> tuple:
    """A member's arm: its overrides less seed= (its name when the overrides are unknown)."""
    return tuple(o for o in row["overrides"] if not o.startswith("seed=")) if row.get("overrides") else (row["member"],)


def _seed(row: dict):
    return next((o.split("=", 1)[1] for o in row.get("overrides") or () if o.startswith("seed=")), row["member"])


def winner_line(rows: list[dict]) -> str | None:
    """'best by <key>: <arm> <value> vs <runner-up> <value> (<delta>); <verdict>' over the finished members.
    Members that differ only in seed= are one arm (mean ± std over its n seeds); the verdict is the report's
    (magvit2.results.stats.compare): a winner is named only when a t-test over the seeds distinguishes the arms."""
    from magvit2.results import stats  # scipy: only when a sweep ends, never in the plan step
    rank = ranked(rows)
    if rank is None:
        return None
    key, lower, have = rank
    arms: dict[tuple, dict] = {}
    for r in have:
        arms.setdefault(_arm(r), {})[_seed(r)] = r["metrics"][key]
    seeded = any(len(v) > 1 for v in arms.values())
    if seeded:  # an arm by what sets it apart from the others
        common = set.intersection(*(set(a) for a in arms))
        names = {a: " ".join(o for o in a if o not in common) or "all" for a in arms}
    else:
        names = {_arm(r): r["member"] for r in have}
    order = sorted(arms, key=lambda a: statistics.fmean(arms[a].values()), reverse=not lower)
    fmt = registry.get(key).fmt or ".4g"

    def value(a) -> str:
        v = list(arms[a].values())
        m = format(statistics.fmean(v), fmt)
        return m if not seeded else f"{m} (n = 1)" if len(v) < 2 else f"{m} ± {statistics.stdev(v):.2g} (n = {len(v)})"
    better = ("lower" if lower else "higher") + " is better" + ("; mean ± std over seeds" if seeded else "")
    if len(order) < 2:
        return f"{key} ({better}): {names[order[0]]} {value(order[0])}; one arm, nothing to compare"
    a, b = order[0], order[1]
    m1, m2 = statistics.fmean(arms[a].values()), statistics.fmean(arms[b].values())
    rel = f", {100 * (m1 - m2) / abs(m2):+.2g}%" if m2 else ""
    verdict = stats.compare(arms[a], arms[b])
    head = "winner" if verdict.startswith("distinguishable") else "best mean"
    return (f"{head} by {key} ({better}): {names[a]} {value(a)} vs {names[b]} {value(b)} "
            f"({m1 - m2:+.2g}{rel}); {verdict}")