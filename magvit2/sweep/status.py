"""`python -m magvit2.sweep status <sweep id | sweep dir> [--root outputs] [--wait] [--tail N --member I]`,
`python -m magvit2.sweep list [--root outputs]`, `python -m magvit2.sweep cancel <sweep id> [--root outputs]`

Reconnects to a sweep (also one submitted with hydra.launcher.detach=true): a table of its members with state,
step, last metrics, SLURM job id and run dir, read from the run dirs and the SLURM queue; --wait polls until every
member finished or failed; --tail prints the end of a member's job log. Once every member has ended, the sweep's
MLflow parent run is closed (FINISHED, or FAILED if a member did not finish): a detached sweep has no other owner.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from magvit2.runs import SweepDir
from magvit2.sweep import state, summary


def find_sweep(ref: str, root: Path) -> Path:
    p = Path(ref)
    if SweepDir(p).exists():
        return p
    sweeps = SweepDir.folder(root)
    cands = sorted(sweeps.glob(f"{ref}*")) if sweeps.exists() else []
    if len(cands) == 1:
        return cands[0]
    known = ", ".join(c.name for c in sorted(sweeps.glob("*"))) if sweeps.exists() else "none"
    raise SystemExit(f"error: no single sweep matches {ref!r} under {sweeps} (known: {known}); give a sweep "
                     f"id or dir, and --root if paths.root was not ./outputs")


def member_logs(row: dict, root: Path) -> list[Path]:
    """The member's own job logs, stdout then stderr (where the progress bar and its ETA go): the submitit folder
    of exactly its job (`<array>_<task>`, not another task of the array), rank 0; else the newest hydra log naming
    its run dir."""
    jid = row.get("slurm_job_id")
    if jid:
        folder = root / "submitit" / jid
        logs = [f for ext in ("out", "err") for f in sorted(folder.glob(f"*_0_log.{ext}"))]
        if logs:
            return logs
    logs = [p for p in (root / "hydra").rglob("*.log") if row["run_dir"] in p.read_text(errors="ignore")]
    return [max(logs, key=os.path.getmtime)] if logs else []


def close_parent_run(sweep_dir: Path, rows: list[dict]) -> str | None:
    """FINISHED/FAILED on the sweep's MLflow parent run once no member can change any more; returns the status."""
    doc = SweepDir(sweep_dir).read({})
    if not doc.get("parent_run_id") or not doc.get("tracking_uri") or any(
            r["state"] not in state.ENDED for r in rows):
        return None
    from magvit2 import tracking
    status = "FINISHED" if all(r["state"] == "finished" for r in rows) else "FAILED"
    if tracking.end_if_running(doc["parent_run_id"], status, doc["tracking_uri"]):  # once, by whoever closes it
        summary.record(sweep_dir, rows, summary.wall_since_submission(sweep_dir, rows))
    return status


def _counts(rows: list[dict]) -> str:
    states = sorted({r["state"] for r in rows})
    return "  ".join(f"{s}: {sum(r['state'] == s for r in rows)}" for s in states)


def list_sweeps(root: Path) -> int:
    """One line per sweep under root: id, members, state counts, launcher, when it was last submitted."""
    from tabulate import tabulate
    table = []
    for d in SweepDir.under(root):
        doc = d.read(None)
        if doc is None:
            continue
        rows = state.refresh(d)
        ended = all(r["state"] in state.ENDED for r in rows)
        table.append([d.id, len(rows), "ended" if ended else "active", _counts(rows), doc.get("launcher", ""),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(d.written()))])
    if not table:
        print(f"no sweeps under {root / 'sweeps'}")
        return 0
    print(tabulate(table, headers=["sweep", "members", "state", "members by state", "launcher", "submitted"]))
    return 0


def cancel_sweep(sweep_dir: Path) -> int:
    """scancel the jobs of members that have not ended, then mark the sweep's MLflow parent run KILLED."""
    import subprocess
    rows = state.refresh(sweep_dir)
    jobs = sorted({r["slurm_job_id"] for r in rows if r.get("slurm_job_id") and r["state"] not in state.ENDED})
    if jobs:
        p = subprocess.run(["scancel", *jobs], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            print(f"error: scancel {' '.join(jobs)} failed: {p.stderr.strip()}", file=sys.stderr)
            return 1
    doc = SweepDir(sweep_dir).read({})
    if doc.get("parent_run_id") and doc.get("tracking_uri"):
        from magvit2 import tracking
        tracking.end_if_running(doc["parent_run_id"], "KILLED", doc["tracking_uri"])
    print(f"sweep {sweep_dir.name}: cancelled {len(jobs)} job(s){': ' + ' '.join(jobs) if jobs else ''}; "
          f"MLflow parent run KILLED; resubmit the same command to resume the members")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.sweep")
    sub = ap.add_subparsers(dest="cmd", required=True)
    root_default = Path(os.environ.get("MAGVIT2_ROOT", "outputs"))
    ls = sub.add_parser("list", help="the sweeps under the root, with their state and counts")
    ls.add_argument("--root", type=Path, default=root_default)
    cc = sub.add_parser("cancel", help="scancel a sweep's unfinished members and mark its parent run KILLED")
    cc.add_argument("sweep", help="sweep id (or a unique prefix) or sweep dir")
    cc.add_argument("--root", type=Path, default=root_default)
    st = sub.add_parser("status", help="member table of a sweep")
    st.add_argument("sweep", help="sweep id (or a unique prefix) or sweep dir")
    st.add_argument("--root", type=Path, default=root_default)
    st.add_argument("--wait", action="store_true", help="poll until every member finished or failed")
    st.add_argument("--interval", type=float, default=float(os.environ.get("MAGVIT2_POLL_S", 30)),
                    help="seconds between polls with --wait (default: $MAGVIT2_POLL_S or 30)")
    st.add_argument("--tail", type=int, default=0, help="print the last N lines of a member's log")
    st.add_argument("--member", type=int, default=0, help="which member (# in the table) --tail reads")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        return list_sweeps(a.root)
    sweep_dir = find_sweep(a.sweep, a.root)
    if a.cmd == "cancel":
        return cancel_sweep(sweep_dir)
    rows = state.refresh(sweep_dir)
    if a.tail and not 0 <= a.member < len(rows):
        print(f"error: --member {a.member} out of range (0..{len(rows) - 1})", file=sys.stderr)
        return 2
    last = None
    while a.wait and any(r["state"] not in state.ENDED for r in rows):
        if _counts(rows) != last:
            last = _counts(rows)
            print(f"[{time.strftime('%H:%M:%S')}] {last}", flush=True)
        time.sleep(a.interval)
        rows = state.refresh(sweep_dir)
    print(state.format_members(rows, title=f"sweep {sweep_dir.name}"))
    print(_counts(rows))
    try:
        closed = close_parent_run(sweep_dir, rows)
    except Exception as e:  # the table stands without MLflow (server down, store moved)
        print(f"warning: could not close the sweep's MLflow parent run: {type(e).__name__}: {e}", file=sys.stderr)
        closed = None
    if closed:
        print(f"sweep ended: MLflow parent run {closed}")
    if all(r["state"] in state.ENDED for r in rows):  # the summary a blocking sweep prints at its end
        done = summary.closed_summary(sweep_dir, rows)  # the recorded wall time, over every submission
        wall = done["wall_s"] if done else summary.wall_since_submission(sweep_dir, rows)
        print("\n".join(line for line in (state.winner_line(rows), summary.usage_line(wall, rows)) if line))
    if a.tail:
        logs = member_logs(rows[a.member], a.root)
        if not logs:
            print(f"(no log found for member #{a.member} yet)")
        for log in logs:
            print(f"--- {log} (last {a.tail} lines)")
            text = log.read_text(errors="replace").replace("\r", "\n")  # progress bars redraw with \r
            print("\n".join([ln for ln in text.splitlines() if ln.strip()][-a.tail:]))
    return 1 if a.wait and any(r["state"] != "finished" for r in rows) else 0

