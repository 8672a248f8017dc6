"""A member on two SLURM nodes (`hydra.launcher.nodes=2 tasks_per_node=1`) is one gloo process group across two
hosts, follows the loss curve of a 2-process torchrun bit for bit, and resumes exactly after a preemption.

The two nodes are two network namespaces of this machine (.ci/slurm2.sh: 10.213.0.1 and 10.213.0.2 on a veth pair,
one slurmd each, slurmctld on the first, auth/none, its own slurm.conf). The sweep is submitted from inside the
first node's namespace (`.ci/slurm2.sh exec`), where slurmctld's address exists. The job runs this venv's python
(same filesystem). Rank 1 runs in the second namespace and reaches rank 0 only through MASTER_ADDR = the first
node's name, which resolves to 10.213.0.1 there: no loopback shortcut between the ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_weights, load_ckpt, train_cmd
from test_distributed import _curve, _member_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM2 = str(REPO / ".ci" / "slurm2.sh")
NODES = ("mv2n0", "mv2n1")  # node name = namespace = hostname there; addresses in slurm2.sh
ADDR0 = "10.213.0.1"
# Deterministic with 2 ranks (no dropout in the tokenizer; GAN off: its BatchNorm is per rank). 2 vs 2 processes, so
# the codebook entropy may stay the original's `local`.
TOK = ["stage=tokenizer", "tokenizer.loss.disc_start=1000", "trainer.tokenizer.steps=16",
       "trainer.tokenizer.ckpt_every=4"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.timeout_min=15", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"]


def _in_cluster(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([SLURM2, "exec", *cmd], capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def cluster2():
    missing = [c for c in ("slurmctld", "slurmd", "ip", "nsenter") if shutil.which(c) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not found in CI: .ci/system-deps.sh must run before the tests")
        pytest.skip(f"{missing} not installed (SLURM: .ci/system-deps.sh; ip: iproute2)")
    if os.geteuid() != 0:
        pytest.skip("the 2-node cluster needs root (network namespaces): run the tests as root")
    t0 = time.monotonic()
    p = subprocess.run([SLURM2, "start"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        subprocess.run([SLURM2, "stop"], capture_output=True, timeout=120)
        pytest.fail(f"slurm2.sh start failed:\n{p.stdout}\n{p.stderr}")
    print(f"2-node cluster up in {time.monotonic() - t0:.1f} s")
    try:
        yield
    finally:
        subprocess.run([SLURM2, "logs"], timeout=30)  # tails to stderr, shown when a test failed
        subprocess.run([SLURM2, "stop"], check=True, capture_output=True, timeout=120)


def _status(root: Path) -> dict:
    (p,) = (root / "runs" / "tokenizer").glob("*/status.json")
    return json.loads(p.read_text())


def test_two_node_member_is_one_gloo_group_matches_torchrun_and_resumes_exactly(cluster2, tmp_path):
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}  # --export=ALL passes it on
    one_thread.pop("MLFLOW_TRACKING_URI", None)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME"):
        one_thread.pop(k, None)  # the job must find its own rendezvous
    ref, two = tmp_path / "torchrun", tmp_path / "slurm"
    ref.mkdir(), two.mkdir()

    # MASTER_ADDR is the first node's name (submitit: first host of SLURM_JOB_NODELIST); on both nodes it resolves to
    # the first namespace's address, the only way rank 1 (second namespace) can reach rank 0's store and gloo pair.
    for ns in NODES:
        out = subprocess.run(["ip", "netns", "exec", ns, "getent", "hosts", NODES[0]], capture_output=True,
                             text=True, check=True).stdout
        assert out.split()[0] == ADDR0, out

    # The reference (a local 2-process torchrun) runs while the cluster job does: same results, less wall time.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ref_proc = subprocess.Popen(torchrun + train_cmd(ref, *TOK)[1:], cwd=ref, env=one_thread,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen([SLURM2, "exec", *train_cmd(two, *TOK, *SLURM, multirun=True)], cwd=two, env=one_thread,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list((two / "runs" / "tokenizer").glob("*/checkpoint.pt")):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.1)
        st = _status(two)
        assert st["state"] == "running" and st["world_size"] == 2, st
        job = st["slurm_job_id"]
        nodelist = _in_cluster("squeue", "-h", "-j", job, "-o", "%N").stdout.strip()
        assert nodelist == f"{NODES[0][:-1]}[0-1]" or nodelist == ",".join(NODES), nodelist
        # preempt: USR2 to both ranks (as SLURM's --signal before the time limit); rank 0 requeues from node 0
        subprocess.run([SLURM2, "exec", "scancel", "--signal=USR2", job], check=True, timeout=60)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-4000:]
        ref_out, _ = ref_proc.communicate(timeout=240)
        assert ref_proc.returncode == 0, ref_out[-4000:]
    finally:
        for p in (proc, ref_proc):
            if p.poll() is None:
                p.kill()
        if job and proc.returncode != 0:  # nothing of ours keeps running on the cluster
            _in_cluster("scancel", job)

    st = _status(two)
    assert st["state"] == "finished" and st["step"] == 16 and st["world_size"] == 2, st
    logs = "".join(p.read_text() for p in (two / "submitit").rglob("*_log.*"))
    # one task per node, one group of 2: submitit's JobEnvironment line of each rank, on its own node
    for rank, node in enumerate(NODES):
        assert f"hostname={node}, local_rank=0(1), node={rank}(2), global_rank={rank}(2)" in logs, logs[-3000:]
    assert logs.count("caught SIGUSR2") == 2 and "this job is preempted" in logs and "resuming tokenizer" in logs
    _, run = _member_run(two, "tokenizer")
    assert run.data.tags["magvit2.world_size"] == "2" and run.data.tags["magvit2.host"] == NODES[0]
    assert run.data.tags["magvit2.n_resumes"] == "1" and run.info.status == "FINISHED"

    (rd,) = [d for d in (two / "runs" / "tokenizer").iterdir() if d.is_dir()]
    (ref_rd,) = [d for d in (ref / "runs" / "tokenizer").iterdir() if d.is_dir()]
    assert sorted(f.name for f in rd.glob("rng-*")) == ["rng-0-16.pt", "rng-1-16.pt"]
    a, b = load_ckpt(ref_rd), load_ckpt(rd)
    for k in ("model", "disc"):
        assert_same_weights(a[k], b[k])
    for key in ("train/loss", "train/rec_l1", "train/entropy_codebook"):
        x, y = _curve(ref, "tokenizer", key), _curve(two, "tokenizer", key)
        assert len(x) == len(y) == 16 and x == y, key
