"""Files on disk: a run dir (RunDir, its status.json and checkpoint keys), a sweep dir (SweepDir), the run dir lock
and atomic writes. Each module imports only magvit2.errors and magvit2.tempfiles from magvit2 (RunDir.of reads
the config's signature when called)."""
from magvit2.runs.dir import Ckpt, RunDir
from magvit2.runs.files import (atomic_write, atomic_write_text, read_json, slurm_job_id, storage_error, tmp_prefix,
                                write_json)
from magvit2.runs.lock import FileLock
from magvit2.runs.sweep import SweepDir

__all__ = ["Ckpt", "FileLock", "RunDir", "SweepDir", "atomic_write", "atomic_write_text", "read_json",
           "slurm_job_id", "storage_error", "tmp_prefix", "write_json"]
