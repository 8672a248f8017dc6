"""The local SLURM cluster of .ci/slurm.sh: batch jobs, multi-task steps, submitit, requeue and signals.

These run real jobs through slurmctld/slurmd, so they prove the cluster the sweep tests rely on behaves like a
real one (requeue restarts the script, --signal reaches it before the time limit).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if shutil.which("sinfo") is None:
        if os.environ.get("CI"):
            pytest.fail("sinfo not found in CI: .ci/system-deps.sh must run before the tests")
        pytest.skip("SLURM is not installed (run .ci/system-deps.sh, then .ci/slurm.sh start, as root)")
    if os.geteuid() == 0:  # idempotent and fast when the cluster is already up
        subprocess.run([str(REPO / ".ci" / "slurm.sh"), "start"], check=True, timeout=120)
    else:  # sinfo retries for ~10 s when slurmctld is down
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if up.returncode != 0 or up.stdout.split()[:1] not in (["idle"], ["mixed"], ["allocated"]):
            pytest.skip("SLURM is not running and starting it needs root: sudo .ci/slurm.sh start")
    submitted: list[str] = []
    yield submitted
    if submitted:  # nothing of ours keeps running after the module
        subprocess.run(["scancel", *submitted], capture_output=True)


def sbatch(cluster: list, script: str, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True, text=True, check=True)
    job_id = out.stdout.strip().split(";")[0]
    cluster.append(job_id)
    return job_id


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    return re.search(rf"\b{field}=(\S*)", out.stdout).group(1)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_finished(job_id: str, timeout: float = 30) -> str:
    finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    state = wait_for(lambda: job_field(job_id, "JobState") in finished and job_field(job_id, "JobState"),
                     timeout, f"job {job_id} to finish")
    return state


def test_batch_job_completes_with_its_output(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = sbatch(slurm_cluster, "#!/bin/bash\necho \"sum=$((17 + 25)) job=$SLURM_JOB_ID part=$SLURM_JOB_PARTITION\"\n",
                 "-o", str(out), "--cpus-per-task", "1", "--mem", "100M")
    assert wait_finished(job) == "COMPLETED"
    assert job_field(job, "ExitCode") == "0:0"
    assert out.read_text().split() == ["sum=42", f"job={job}", "part=debug"]


def test_failing_job_is_reported_failed(slurm_cluster, tmp_path):
    job = sbatch(slurm_cluster, "#!/bin/bash\nexit 3\n", "-o", str(tmp_path / "o"))
    assert wait_finished(job) == "FAILED"
    assert job_field(job, "ExitCode") == "3:0"


def test_two_tasks_per_node_run_both_ranks(slurm_cluster, tmp_path):
    out = tmp_path / "ranks.txt"
    script = "#!/bin/bash\nsrun --export=ALL bash -c 'echo $SLURM_PROCID/$SLURM_NTASKS/$SLURM_CPUS_PER_TASK'\n"
    job = sbatch(slurm_cluster, script, "-o", str(out), "--ntasks-per-node", "2", "--cpus-per-task", "1",
                 "--mem", "200M")
    assert wait_finished(job) == "COMPLETED"
    assert sorted(out.read_text().split()) == ["0/2/1", "1/2/1"]


def test_submitit_runs_one_result_per_rank(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    # No cluster= given: submitit must detect the local SLURM by itself. Jobs run this test's interpreter.
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", slurm_python=shlex.quote(sys.executable))
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="debug", timeout_min=5, slurm_srun_args=["--export=ALL"],
                               tasks_per_node=2, cpus_per_task=1, mem_gb=1)

    def rank_and_world():  # local, so cloudpickle ships it by value (tests/ is not importable in the job)
        import os
        import submitit

        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks, os.environ["SLURM_JOB_PARTITION"]

    job = executor.submit(rank_and_world)
    slurm_cluster.append(job.job_id)
    assert sorted(job.results()) == [(0, 2, "debug"), (1, 2, "debug")]


@pytest.mark.slow  # ~7 s: slurmctld holds a requeued job for cred_expire + 1 s
def test_requeue_restarts_a_running_batch_job(slurm_cluster, tmp_path):
    starts = tmp_path / "starts.txt"
    script = f"#!/bin/bash\n#SBATCH --requeue\necho \"restart=$SLURM_RESTART_COUNT\" >> {starts}\nsleep 300\n"
    job = sbatch(slurm_cluster, script, "-o", str(tmp_path / "o"), "--mem", "100M")
    wait_for(lambda: starts.exists() and starts.read_text(), 15, "the first start")
    subprocess.run(["scontrol", "requeue", job], check=True)
    # slurmctld holds a requeued job for AuthInfo cred_expire + 1 s (5 + 1 with .ci/slurm.sh) before it may start again.
    wait_for(lambda: len(starts.read_text().splitlines()) >= 2, 40, "the restart after scontrol requeue")
    assert starts.read_text().splitlines() == ["restart=", "restart=1"]
    assert job_field(job, "Restarts") == "1"
    subprocess.run(["scancel", job], check=True)


@pytest.mark.slow  # 3-33 s: slurmctld checks time limits (and sends --signal) every 30 s
def test_signal_before_time_limit_reaches_the_batch_script(slurm_cluster, tmp_path):
    # What submitit relies on for checkpointing: --signal=<sig>@<seconds before the limit>.
    log = tmp_path / "sig.txt"
    script = (f"#!/bin/bash\ntrap 'echo got-USR1 >> {log}; exit 0' USR1\necho started >> {log}\n"
              f"for i in $(seq 600); do sleep 0.1; done\necho no-signal >> {log}\n")
    job = sbatch(slurm_cluster, script, "-o", str(tmp_path / "o"), "--time", "1", "--signal", "B:USR1@57")
    assert wait_finished(job, timeout=45) == "COMPLETED"
    assert log.read_text().split() == ["started", "got-USR1"]
