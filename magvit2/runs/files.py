"""Writing files that readers may see at any moment: atomic writes (temp file, fsync, rename), the StorageError a full
disk or a read-only folder becomes, and the SLURM job id every run record names."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from magvit2.errors import StorageError
from magvit2.tempfiles import mkstemp


def slurm_job_id() -> str:
    """The job as squeue and sacct name it: `<array job>_<task>` in a job array, else the job id ('' outside)."""
    e = os.environ
    if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
    return e.get("SLURM_JOB_ID", "")


_ROOT_SETTING = "paths.root (or MAGVIT2_ROOT)"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(e: OSError, path) -> OSError:
    """A full disk or a read-only folder as a StorageError (one line: the path and the setting to change); any other
    OSError as it is."""
    if e.errno in _FULL:
        return StorageError(f"no space left to write {path} ({os.strerror(e.errno)}): free space on that file "
                            f"system or point {_ROOT_SETTING} at a disk with room; the run can then be started again "
                            f"and resumes from its last checkpoint")
    if e.errno in _READ_ONLY:
        return StorageError(f"cannot write {path} ({os.strerror(e.errno)}): training writes its run dir under "
                            f"{_ROOT_SETTING}; point it at a writable folder (finished runs can still be read where "
                            f"they are)")
    return e


def tmp_prefix(path: Path) -> str:
    """Prefix of the temp files of a write to `path` in progress: `.<name>.tmp-<pid>-`."""
    return f".{Path(path).name}.tmp-{os.getpid()}-"


def atomic_write(path: Path, write, mode: str = "w", keep_old: Path | None = None) -> None:
    """write(f) into a temp file next to `path`, fsync, rename over it: readers see the old file or the new one
    (keep_old: the old file is first renamed to it). The temp file goes on any failure; a full disk or a read-only
    folder raises StorageError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp(path.parent, tmp_prefix(path))  # 0666 less the umask, as open() would
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if keep_old is not None and path.exists():
                os.replace(path, keep_old)
            os.replace(tmp, path)
            tmp = None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        err = storage_error(e, path)
        if err is e:
            raise
        raise err from e
    except RuntimeError as e:  # torch.save reports a full disk as RuntimeError("... error code: 28 ...")
        if re.search(r"No space left on device|error code: 28\b|errno 28\b", str(e), re.I):
            raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return default


def write_json(path: Path, doc) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, default=str))
