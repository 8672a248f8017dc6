"""A sweep dir, `<paths.root>/sweeps/<id>`, and the one reader and writer of its sweep.json (run dirs: RunDir).

sweep.json  id, arguments, parent_run_id and tracking_uri (the sweep's MLflow parent run), launcher, hydra_dirs,
            axes (the swept settings), submitted (epoch seconds of the last submission), members (overrides, stage,
            signature, run_dir, steps, the shared tokenizer run they train first) and jobs ({run dir: the SLURM job
            it was last submitted as})
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from magvit2.runs.files import read_json, write_json

_RECORDED = ("member", "overrides", "stage", "signature", "run_dir", "steps", "tokenizer")  # of a member's row


class SweepDir:
    def __init__(self, path):
        self.path = Path(path)

    @staticmethod
    def folder(root) -> Path:
        """Where the sweeps of paths.root are."""
        return Path(root) / "sweeps"

    @classmethod
    def of(cls, root, sid: str) -> "SweepDir":
        return cls(cls.folder(root) / sid)

    @staticmethod
    def under(root) -> list["SweepDir"]:
        """Every sweep dir under paths.root holding a sweep.json, the least recently changed first."""
        d = SweepDir.folder(root)
        found = sorted(d.glob("*"), key=os.path.getmtime) if d.is_dir() else []
        return [s for s in map(SweepDir, found) if s.exists()]

    def __repr__(self) -> str:
        return f"SweepDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    id = property(lambda self: self.path.name)
    file = property(lambda self: self.path / "sweep.json")

    def exists(self) -> bool:
        return self.file.exists()

    def read(self, default=None) -> dict | None:
        return read_json(self.file, default)

    def written(self) -> float:
        """When sweep.json was last written (a submission or a job id recorded), epoch seconds."""
        return os.path.getmtime(self.file)

    def write(self, sid: str, arguments: list[str], rows: list[dict], parent_run: str, hydra_dir: str,
              launcher: str, tracking_uri: str, axes: dict | None = None) -> None:
        """Record a (re)submission: its members, keeping the jobs, hydra dirs and axes of earlier submissions."""
        old = self.read({}) or {}
        doc = {"id": sid, "arguments": arguments, "parent_run_id": parent_run, "tracking_uri": tracking_uri,
               "launcher": launcher, "hydra_dirs": sorted(set(old.get("hydra_dirs", [])) | {hydra_dir}),
               "jobs": old.get("jobs", {}), "axes": axes or old.get("axes", {}), "submitted": time.time(),
               "members": [{k: r[k] for k in _RECORDED if k in r} for r in rows]}
        if old.get("summary"):  # what the sweep's MLflow record says: kept until members are added
            doc["summary"] = old["summary"]
        write_json(self.file, doc)

    def record_summary(self, summary: dict) -> None:
        """The closed sweep's summary (finished members, wall seconds, device-hours), as its MLflow record has it."""
        doc = self.read(None)
        if doc is not None:
            doc["summary"] = summary
            write_json(self.file, doc)

    def record_jobs(self, jobs: dict[str, str]) -> None:
        """Remember the job each member (by run dir) was just submitted as, before waiting on any of them."""
        doc = self.read(None)
        if doc is not None and jobs:
            doc["jobs"].update(jobs)
            write_json(self.file, doc)
