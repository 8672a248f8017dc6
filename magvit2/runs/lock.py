"""The inter-process lock of a run dir (and of anything else shared by a sweep's jobs)."""
from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from magvit2.runs.files import storage_error

log = logging.getLogger(__name__)


class FileLock:
    """An flock on `<path>.lock`, shared by every process that sees the file system (a sweep's jobs)."""

    def __init__(self, path: Path):
        self.path = Path(str(path) + ".lock")
        self.fd = None

    def __enter__(self) -> "FileLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = open(self.path, "a")
        except OSError as e:  # a read-only root: one line naming paths.root, not a traceback
            err = storage_error(e, self.path)
            if err is e:
                raise
            raise err from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for {self.path.parent.name}/{self.path.stem}: another process is working on it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()
        self.fd = None
