"""Temp files for atomic writes (write, then os.replace), with the permissions open() would give: mkstemp makes them
0600, so on a shared cluster a teammate could not read a run's checkpoints, results or samples.npz."""
from __future__ import annotations

import os
import re
import tempfile


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status), else by setting and restoring."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^Umask:\s*([0-7]+)$", f.read(), re.M)
        if m:
            return int(m.group(1), 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def mkstemp(folder, prefix: str, suffix: str = "") -> tuple[int, str]:
    """tempfile.mkstemp in `folder`, with mode 0666 less the umask (0644 under the usual 022)."""
    fd, path = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, path
