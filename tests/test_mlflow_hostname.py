"""Issue 12.2: MLflow 3's server answers 403 "Invalid Host header" to requests addressed to a host name it was not
started with (`--allowed-hosts`). The README's server command must work as written with
MLFLOW_TRACKING_URI=http://$(hostname):5000, and a run or sweep that still meets a refusing server must stop at once
with one line that says what to change, not retry for a minute and end in a traceback."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, empty_store, free_port

from conftest import REPO, run_train

HOST = socket.gethostname()


def _host_resolves() -> bool:
    try:
        socket.gethostbyname(HOST)
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _host_resolves(), reason=f"this machine's host name {HOST!r} does not resolve")


def _readme_server_and_uri() -> tuple[str, str]:
    """The `mlflow server ...` command (with its continuation lines) and the `export MLFLOW_TRACKING_URI=` line of
    the README's "Running a sweep on SLURM" section, verbatim."""
    section = (REPO / "README.md").read_text().split("## Running a sweep on SLURM", 1)[1]
    lines = section.split("```bash", 1)[1].split("```", 1)[0].splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("mlflow server"))
    j = i
    while lines[j].rstrip().endswith("\\"):
        j += 1
    export = next(line for line in lines if line.startswith("export MLFLOW_TRACKING_URI="))
    return "\n".join(lines[i:j + 1]), export


def test_readme_server_command_accepts_its_own_tracking_uri(tmp_path):
    server, export = _readme_server_and_uri()
    assert server.rstrip().split("#")[0].rstrip().endswith("&"), server  # started in the background, as documented
    port = free_port()  # the README's port 5000 may be taken on a test machine: the only change made to the lines
    script = "\n".join(re.sub(r"\b5000\b", str(port), s) for s in (server, export))
    (tmp_path / "outputs").mkdir()
    shutil.copy(empty_store(), tmp_path / "outputs" / "mlflow.db")  # skips ~10 s of schema migrations
    # job execution off: only the server's background job consumers (~5 s of start-up), not its HTTP side
    env = {**os.environ, "PATH": f"{Path(REPO / '.venv' / 'bin')}:{os.environ['PATH']}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(["bash", "-c", f'{script}\necho "$MLFLOW_TRACKING_URI" > uri.txt\nwait'], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail(f"README server not healthy: {(tmp_path / 'server.log').read_text()[-3000:]}")
        uri = (tmp_path / "uri.txt").read_text().strip()
        assert uri == f"http://{HOST}:{port}"
        client = MlflowClient(uri)  # the Host header is now "<hostname>:<port>": refused without --allowed-hosts
        exp = client.create_experiment("readme-check")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "x", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
        from magvit2.tracking import check_server
        check_server(uri)  # what every run and sweep asks first
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # bash, the server and its workers: one process group
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def refusing_server(tmp_path_factory):
    """A server started like the README's before the fix: no --allowed-hosts, so host-name requests get 403."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-no-allowed-hosts"), host="0.0.0.0") as srv:
        yield f"http://{HOST}:{srv.port}"


def _assert_one_clear_line(p: subprocess.CompletedProcess, uri: str) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "retry 1/" not in out and "Retrying" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    line = errors[0]
    host = uri.split("//", 1)[1]
    for needed in ("403", "MLFLOW_TRACKING_URI", "tracking.uri", "--allowed-hosts", host, "--cors-allowed-origins",
                   f"'http://{host}'"):
        assert needed in line, (needed, line)
    return line


def test_run_against_refusing_server_stops_at_once_with_one_line(refusing_server, tmp_path):
    t0 = time.monotonic()
    p = run_train(tmp_path, "stage=tokenizer", env={"MLFLOW_TRACKING_URI": refusing_server}, check=False,
                  timeout=120)
    took = time.monotonic() - t0
    line = _assert_one_clear_line(p, refusing_server)
    print(f"refused run ended after {took:.1f} s (process start included): {line}")
    assert took < 40  # before the fix: ~37 s of retries on top of start-up, then a traceback


def test_sweep_against_refusing_server_submits_nothing(refusing_server, tmp_path):
    t0 = time.monotonic()
    p = run_train(tmp_path, "stage=tokenizer", "quantizer=lfq,vq", "hydra/launcher=local", multirun=True,
                  env={"MLFLOW_TRACKING_URI": refusing_server}, check=False, timeout=120)
    took = time.monotonic() - t0
    line = _assert_one_clear_line(p, refusing_server)
    print(f"refused sweep ended after {took:.1f} s: {line}")
    assert "submitted job" not in p.stdout + p.stderr and not (tmp_path / "runs").exists()


def test_the_servers_restart_hint_serves_its_client_and_its_ui(refusing_server, tmp_path):
    """The flags check_server's 403 line tells to restart with make a server that takes the client's requests by host
    name and the UI's opened at http://<host>:<port> (MLflow 3 also checks a browser's Origin: without
    --cors-allowed-origins the UI's runs table gets 403 "Blocked cross-origin request")."""
    import json
    import shlex
    import urllib.error

    from magvit2.errors import TrackingError
    from magvit2.tracking import check_server
    with pytest.raises(TrackingError) as e:
        check_server(refusing_server)
    flags = re.search(r"restart it with (.*?) \(README", str(e.value)).group(1)
    old, port = refusing_server.rsplit(":", 1)[1], free_port()  # the refusing server keeps its port
    args = shlex.split(flags.replace(f":{old}", f":{port}"))
    assert args[0] == "--allowed-hosts" and args[2] == "--cors-allowed-origins", args
    with MlflowServer(tmp_path / "srv", port=port, host="0.0.0.0", args=args):
        uri = f"http://{HOST}:{port}"
        check_server(uri)
        MlflowClient(uri).create_experiment("ui-check")

        def search(origin: str) -> int:  # what the UI's runs table asks, as a browser sends it
            req = urllib.request.Request(f"{uri}/ajax-api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": ["0"]}).encode(),
                                         headers={"Content-Type": "application/json", "Origin": origin})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        assert search(uri) == 200
        assert search("http://elsewhere.example:5000") == 403  # the origin check is on: the flag is what passes
