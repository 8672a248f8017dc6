"""Test helpers: a real `mlflow server` on loopback, and fresh sqlite tracking stores.

`MlflowServer` starts `mlflow server` in its own session (process group) on a free 127.0.0.1 port with a sqlite
backend and a local artifact root in a temp dir, polls /health, and stops the whole group (gunicorn/uvicorn
workers included). Import the fixtures into a test module: `from mlflow_server import mlflow_server, sqlite_uri`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`with MlflowServer(tmp_dir) as srv: ... srv.url ...`; restart() keeps the same port and store."""

    def __init__(self, workdir: Path, port: int | None = None, start_timeout_s: float = 90.0,
                 host: str = "127.0.0.1", args: tuple[str, ...] = ()):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = host  # "0.0.0.0": reachable through the machine's host name too
        self.args = tuple(args)  # more `mlflow server` options (--allowed-hosts ...)
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")

    def start(self) -> "MlflowServer":
        db = self.dir / "mlflow.db"
        if not db.exists():
            shutil.copy(empty_store(), db)  # skips the slow first-time schema migration
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{db}",
               "--default-artifact-root", str(self.dir / "artifacts"),
               "--host", self.host, "--port", str(self.port), "--workers", "1", *self.args]
        t0 = time.monotonic()
        self.log = open(self.dir / "server.log", "ab")
        # start_new_session = setsid: the server and its workers share one process group we can kill at once.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.timeout} s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        p = self.dir / "server.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        except ProcessLookupError:
            pass
        # workers may outlive the leader for a moment; make sure none keeps the port
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        self.log.close()

    def restart(self) -> "MlflowServer":
        self.stop()
        return self.start()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_EMPTY: dict[str, Path] = {}


def empty_store() -> Path:
    """A migrated, empty mlflow.db (creating one runs ~10 s of schema migrations; copying it is instant).
    Cached in the temp dir per MLflow version, published by an atomic rename."""
    if "db" not in _EMPTY:
        import tempfile

        import mlflow
        from mlflow.tracking import MlflowClient

        cached = Path(tempfile.gettempdir()) / f"magvit2-test-mlflow-{mlflow.__version__}-empty.db"
        if not cached.exists():
            d = Path(tempfile.mkdtemp(prefix="mlflow-empty-"))
            MlflowClient(f"sqlite:///{d / 'mlflow.db'}").search_experiments()  # runs the migrations
            os.replace(d / "mlflow.db", cached)
            shutil.rmtree(d, ignore_errors=True)
        _EMPTY["db"] = cached
    return _EMPTY["db"]


def fresh_sqlite(root: Path) -> str:
    """A sqlite tracking uri under `root` backed by a copy of the empty store (root as in paths.root)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store(), root / "mlflow.db")
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.fixture
def sqlite_root(tmp_path, monkeypatch):
    """paths.root with a ready sqlite store; MLFLOW_TRACKING_URI unset so the default (root/mlflow.db) is used."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fresh_sqlite(tmp_path / "outputs")
    return tmp_path / "outputs"


def readme_server_lines(readme: Path) -> tuple[str, str]:
    """The `mlflow server ...` command (with its continuation lines) and the `export MLFLOW_TRACKING_URI=` line of
    the README's "Running a sweep on SLURM" section, verbatim."""
    section = Path(readme).read_text().split("## Running a sweep on SLURM", 1)[1]
    lines = section.split("```bash", 1)[1].split("```", 1)[0].splitlines()
    i = j = next(i for i, line in enumerate(lines) if line.startswith("mlflow server"))
    while lines[j].rstrip().endswith("\\"):
        j += 1
    export = next(line for line in lines if line.startswith("export MLFLOW_TRACKING_URI="))
    return "\n".join(lines[i:j + 1]), export


class ReadmeServer:
    """The README's server command run as written (in `workdir`, with `bin_dir` first on PATH), only its port 5000
    swapped for a free one; `.uri` is what the README's export line gives (http://<hostname>:<port>)."""

    def __init__(self, readme: Path, workdir: Path, bin_dir: Path, timeout: float = 90.0):
        import re
        self.dir, self.port, self.timeout = Path(workdir), free_port(), timeout
        server, export = readme_server_lines(readme)
        self.script = "\n".join(re.sub(r"\b5000\b", str(self.port), s) for s in (server, export))
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def __enter__(self) -> "ReadmeServer":
        (self.dir / "outputs").mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_store(), self.dir / "outputs" / "mlflow.db")  # skips ~10 s of schema migrations
        self.log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen(["bash", "-c", f'{self.script}\necho "$MLFLOW_TRACKING_URI" > uri.txt\nwait'],
                                     cwd=self.dir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200 and (self.dir / "uri.txt").exists():
                        self.uri = (self.dir / "uri.txt").read_text().strip()
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"README server not healthy: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return (self.dir / "server.log").read_text(errors="replace")[-n:]

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bash, the server and its workers: one process group
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
