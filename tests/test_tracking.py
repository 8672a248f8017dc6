"""magvit2.tracking against a real sqlite MLflow store (no mocks)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import sqlite_root  # noqa: F401 - fixture

from magvit2 import config as C
from magvit2 import tracking
from magvit2.errors import TrackingError
from magvit2.tracking import MemberRun, ensure_sweep_run, finish_sweep_run, flatten, get_experiment_id

EXP = "magvit2-ar"


def test_flatten():
    cfg = {"factorization": {"bits": [6, 12], "name": "k6_12"}, "model": {"dim": 1024, "head": None, "x": {}},
           "trainer": {"lr": 3e-4, "compile": False, "betas": (0.9, 0.95), "sched": [{"a": 1}]}, "seed": 0}
    assert flatten(cfg) == {
        "factorization.bits": "[6, 12]", "factorization.name": "k6_12", "model.dim": "1024", "model.head": "null",
        "model.x": "{}", "trainer.lr": "0.0003", "trainer.compile": "false", "trainer.betas": "[0.9, 0.95]",
        "trainer.sched": '[{"a": 1}]', "seed": "0"}
    assert flatten({"a": 1}, prefix="cfg") == {"cfg.a": "1"}
    with pytest.raises(ValueError, match="appears twice"):
        flatten({"a.b": 1, "a": {"b": 2}})
    with pytest.raises(ValueError, match="needs a dict"):
        flatten([1, 2])


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri("out/sub") == f"sqlite:///{tmp_path}/out/sub/mlflow.db"
    assert (tmp_path / "out" / "sub").is_dir()  # sqlite cannot create its folder itself
    assert tracking.tracking_uri("out", "http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri("out", "http://127.0.0.1:5000") == "http://127.0.0.1:1"


def test_experiment_created_once_with_absolute_artifacts(sqlite_root):
    ids = []
    barrier = threading.Barrier(4)

    def make():
        barrier.wait()
        ids.append(get_experiment_id("magvit2-tokenizer", str(sqlite_root)))

    threads = [threading.Thread(target=make) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(ids) == 4 and len(set(ids)) == 1
    client = MlflowClient(tracking.tracking_uri(str(sqlite_root)))
    exp = client.get_experiment(ids[0])
    assert exp.name == "magvit2-tokenizer"
    assert exp.artifact_location == f"file://{sqlite_root.resolve()}/mlartifacts/magvit2-tokenizer"
    assert [e.name for e in client.search_experiments()].count("magvit2-tokenizer") == 1
    # the MLflow UI opens it in its model-training view (not GenAI's) and lists it with a description
    assert exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    assert exp.tags[tracking.NOTE].startswith("magvit2 ")


def test_experiments_made_before_the_kind_tag_get_it(sqlite_root):
    """An experiment from an older magvit2 (no kind, no description) gets both; a description edited since stays."""
    client = MlflowClient(tracking.tracking_uri(str(sqlite_root)))
    old = client.create_experiment("magvit2-ar")
    client.set_experiment_tag(old, tracking.NOTE, "my notes")
    m = MemberRun(EXP, str(sqlite_root), "ar", "s", "n", {}, None)
    m.end()
    assert m.experiment_id == old
    tags = client.get_experiment(old).tags
    assert tags[tracking.EXPERIMENT_KIND] == "custom_model_development" and tags[tracking.NOTE] == "my notes"
    sweep = ensure_sweep_run("magvit2-tokenizer", str(sqlite_root), "s1", "tokenizer", "", 1)
    exp = client.get_experiment(client.get_run(sweep).info.experiment_id)
    assert "tokenizer" in exp.tags[tracking.NOTE] and exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"


def test_schema_matches_the_installed_mlflow():
    """schema.py spells MLflow's limits and tag names without importing mlflow: they must be MLflow's."""
    from mlflow.utils import mlflow_tags, validation

    from magvit2.tracking import schema
    assert (schema.MAX_PARAM_VALUE, schema.MAX_TAG_VALUE, schema.MAX_KEY) == (
        validation.MAX_PARAM_VAL_LENGTH, validation.MAX_TAG_VAL_LENGTH, validation.MAX_ENTITY_KEY_LENGTH)
    assert (schema.PARAMS_PER_BATCH, schema.METRICS_PER_BATCH) == (
        validation.MAX_PARAMS_TAGS_PER_BATCH, validation.MAX_METRICS_PER_BATCH)
    assert (schema.PARENT_RUN_ID, schema.NOTE) == (mlflow_tags.MLFLOW_PARENT_RUN_ID, mlflow_tags.MLFLOW_RUN_NOTE)
    for key in ("model.dim", "train/loss", "a b:c-d_e", "bad@key", "a//b", "../x", "./x", "x" * 251):
        ok = bool(validation.validate_param_and_metric_name(key)) and not validation.path_not_unique(key)
        assert schema.valid_key(key) == (ok and len(key) <= validation.MAX_ENTITY_KEY_LENGTH), key
    # the experiment kind is the UI's own tag (no Python constant in mlflow): its bundle must still read it
    bundle = Path(validation.__file__).parents[1] / "server" / "js" / "build" / "static" / "js"
    js = [p.read_text(errors="ignore") for p in bundle.glob("*.js")]
    if not js:
        pytest.skip("this mlflow has no bundled UI")
    assert any(f'"{schema.EXPERIMENT_KIND}"' in t for t in js)
    assert any(f'"{schema.MODEL_TRAINING}"' in t for t in js)


def test_tag_names_do_not_import_mlflow():
    """The sweep's plan and a dry run read tag names and flatten configs: `import magvit2.tracking` loads no mlflow
    (nor torch) until a run, store or server is used."""
    import subprocess
    import sys

    code = ("import sys; from magvit2 import tracking; from magvit2.tracking import KIND, flatten, check_id; "
            "tracking.flatten({'a': [1]}); tracking.missing('x'); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torch')], 'heavy import'; "
            "tracking.MemberRun; assert 'mlflow' in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-2000:]


def test_params_overflow_and_artifacts(sqlite_root, tmp_path):
    root = str(sqlite_root)
    long = "".join(chr(97 + i % 26) for i in range(10000))
    with MemberRun(EXP, root, "ar", "sig1", "k6_12-B", {"magvit2.overrides": "x" * 9000}, None) as m:
        m.log_params({"model.dim": "1024", "data.file_list": long, "bad@key": "v"})
        m.log_missing("eval/fid", "no Inception weights")
        m.log_image(np.linspace(0, 1, 8 * 8 * 3).reshape(8, 8, 3), "samples.png")
        m.log_dict({"fid": None}, "eval.json")
        f = tmp_path / "config.yaml"
        f.write_text("model:\n  dim: 1024\n")
        m.log_artifact(f)
    client = m.client
    run = client.get_run(m.run_id)
    assert run.data.params == {"model.dim": "1024", "data.file_list": tracking.SEE_PARAMS}
    assert run.info.status == "FINISHED"
    t = run.data.tags
    assert t["magvit2.missing.eval/fid"] == "no Inception weights" and "eval/fid" not in run.data.metrics
    assert t["magvit2.kind"] == "member" and t["magvit2.sweep_id"] == "" and "mlflow.parentRunId" not in t
    assert t["magvit2.overrides"] == tracking.SEE_TAGS
    arts = {a.path for a in client.list_artifacts(m.run_id)}
    assert arts == {"params_overflow.json", "tags_overflow.json", "samples.png", "eval.json", "config.yaml"}
    d = Path(client.download_artifacts(m.run_id, "params_overflow.json", str(tmp_path)))
    assert json.loads(d.read_text()) == {"data.file_list": long, "bad@key": "v"}  # whole, not truncated
    d = Path(client.download_artifacts(m.run_id, "tags_overflow.json", str(tmp_path)))
    assert json.loads(d.read_text()) == {"magvit2.overrides": "x" * 9000}


def test_resume_keeps_params_and_continues_metrics(sqlite_root):
    root = str(sqlite_root)
    sweep = ensure_sweep_run(EXP, root, "s-resume", "ar", "model=B", 1)
    m = MemberRun(EXP, root, "ar", "sig", "k6_12-B", {"magvit2.git_sha": "abc"}, "s-resume")
    m.log_params({"model.dim": "1024", "trainer.steps": "10"})
    for s in range(5):
        m.log_metrics({"train/loss": 10.0 - s, "train/lr": 1e-3}, step=s)
    m.end("KILLED")  # preempted

    r = MemberRun(EXP, root, "ar", "sig", "ignored-name", {"magvit2.slurm_job_id": "42_1"}, "s-resume",
                  run_id=m.run_id)
    assert r.run_id == m.run_id and r.resumed
    assert r.client.get_run(r.run_id).info.status == "RUNNING"
    r.log_params({"model.dim": "2048", "trainer.steps": "10", "trainer.resume_from": "ckpt.pt"})  # no error
    for s in range(5, 10):
        r.log_metrics({"train/loss": 10.0 - s}, step=s)
    r.end()
    run = r.client.get_run(m.run_id)
    assert run.data.params == {"model.dim": "1024", "trainer.steps": "10", "trainer.resume_from": "ckpt.pt"}
    hist = sorted((h.step, h.value) for h in r.client.get_metric_history(m.run_id, "train/loss"))
    assert hist == [(s, 10.0 - s) for s in range(10)]
    assert run.info.status == "FINISHED" and run.info.run_name == "k6_12-B"
    t = run.data.tags
    assert t["mlflow.parentRunId"] == sweep and t["magvit2.n_resumes"] == "1"
    assert t["magvit2.slurm_job_id"] == "42_1" and t["magvit2.git_sha"] == "abc"
    runs = r.client.search_runs([r.experiment_id], "tags.`magvit2.kind` = 'member'")
    assert len(runs) == 1  # no second run was created


def test_sweep_run_reused_by_tag(sqlite_root):
    root = str(sqlite_root)
    a = ensure_sweep_run(EXP, root, "2024-01-01_00-00-00", "ar", "factorization=k6_12,k9_9", 2)
    client = MlflowClient(tracking.tracking_uri(root))
    finish_sweep_run(a)
    assert client.get_run(a).info.status == "FINISHED"
    b = ensure_sweep_run(EXP, root, "2024-01-01_00-00-00", "ar", "factorization=k6_12,k9_9 model=B", 2)
    assert b == a and client.get_run(a).info.status == "RUNNING"
    t = client.get_run(a).data.tags
    assert t["magvit2.kind"] == "sweep" and t["magvit2.overrides"] == "factorization=k6_12,k9_9 model=B"
    assert t["magvit2.n_members"] == "2" and t["mlflow.runName"] == "sweep-2024-01-01_00-00-00"
    assert ensure_sweep_run(EXP, root, "other", "ar", "", 1) != a
    # a member whose sweep run is missing creates it once; its siblings find it by tag
    kids = [MemberRun(EXP, root, "ar", f"s{i}", f"m{i}", {}, "fresh") for i in range(2)]
    parents = {k.client.get_run(k.run_id).data.tags["mlflow.parentRunId"] for k in kids}
    found = client.search_runs([kids[0].experiment_id], "tags.`magvit2.sweep_id` = 'fresh' and "
                                                        "tags.`magvit2.kind` = 'sweep'")
    assert len(found) == 1 and parents == {found[0].info.run_id}
    with pytest.raises(ValueError, match="sweep_id"):
        ensure_sweep_run(EXP, root, "it's", "ar", "", 1)


@pytest.mark.slow
def test_metrics_survive_a_locked_database(sqlite_root, caplog):
    """Another writer holds the sqlite file longer than MLflow's busy timeout (20 s): 'database is locked' is
    retried, and no value is lost."""
    root = str(sqlite_root)
    m = MemberRun(EXP, root, "ar", "sig", "locked", {}, None)
    m.log_metrics({"train/loss": 1.0}, step=0)
    db = sqlite3.connect(sqlite_root / "mlflow.db", isolation_level=None, check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")
    threading.Timer(21.0, lambda: db.execute("COMMIT")).start()
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="magvit2.tracking"):
        m.log_metrics({"train/loss": 0.5, "train/acc_1": 0.25}, step=1)
    waited = time.monotonic() - t0
    db.close()
    assert any("database is locked" in r.getMessage() and "retry" in r.getMessage() for r in caplog.records)
    assert not m._pending  # went out in this call, after the lock was released
    m.end()
    assert waited > 20.0  # it really was blocked past the first attempt
    hist = sorted((h.step, h.value) for h in m.client.get_metric_history(m.run_id, "train/loss"))
    assert hist == [(0, 1.0), (1, 0.5)]
    assert [h.value for h in m.client.get_metric_history(m.run_id, "train/acc_1")] == [0.25]


def test_bad_arguments(sqlite_root):
    with pytest.raises(ValueError, match="stage"):
        MemberRun(EXP, str(sqlite_root), "gan", "s", "n", {}, None)
    with pytest.raises(ValueError, match="run_id"):
        MemberRun(EXP, str(sqlite_root), "ar", "s", "n", {}, None, run_id="0" * 32)
    m = MemberRun(EXP, str(sqlite_root), "ar", "s", "n", {}, None)
    with pytest.raises(ValueError, match="log_missing"):
        m.log_metrics({"eval/fid": "n/a"}, step=0)
    with pytest.raises(ValueError, match="status"):
        m.end("DONE")


def test_refusals_are_not_retried_but_outages_are():
    """A 4xx answer (403 Invalid Host header, 401) stays one however often it is asked: retrying only hid the error
    behind ~37 s of warnings. Connection failures and 5xx still are retried."""
    from mlflow.exceptions import MlflowException

    from magvit2.tracking.store import transient
    refused = "API request to endpoint /api/2.0/mlflow/runs/create failed with error code {} != 200. Response body: 'x'"
    assert not transient(MlflowException(refused.format(403)))
    assert not transient(MlflowException(refused.format(401)))
    assert transient(MlflowException(refused.format(429)))
    assert transient(MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/create failed with "
                                     "exception HTTPConnectionPool: Max retries exceeded (Connection refused)"))


def test_check_server_names_what_to_change_for_a_dead_server():
    from mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        tracking.check_server(uri)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert uri in msg and "Connection refused" in msg and "MLFLOW_TRACKING_URI" in msg and "tracking.uri" in msg, msg
    assert took < 15, took  # MLflow's own client retries a dead server for minutes
    tracking.check_server(f"sqlite:///{time.time()}.db")  # local stores: nothing to check


def _member_cfg(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    import magvit2.train  # noqa: F401  (its resolvers)
    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(str(repo / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", "sweep.id=sw1", "+sweep.member=k6_12-tiny",
                                            *overrides])


def test_a_sweep_member_and_the_tokenizer_it_trains_first(sqlite_root, monkeypatch):
    """The tokenizer an AR member trains first is named for what it is, tagged with the sweep but nested under no
    (empty, forever RUNNING) parent run; both carry the SLURM job in the array form squeue shows (18_0, not 19)."""
    from omegaconf import OmegaConf

    from magvit2.runs import RunDir
    from magvit2.runtime.status import RunStatus
    from magvit2.runtime.tracker import open_member_run
    root = str(sqlite_root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(root))
    for k, v in {"SLURM_JOB_ID": "19", "SLURM_ARRAY_JOB_ID": "18", "SLURM_ARRAY_TASK_ID": "0"}.items():
        monkeypatch.setenv(k, v)
    parent = ensure_sweep_run(EXP, root, "sw1", "ar", "factorization=k6_12,k9_9", 2)
    cfg = _member_cfg(sqlite_root, f"+sweep.parent_run_id={parent}", "+sweep.stage=ar")
    runs = {}
    for stage in ("tokenizer", "ar"):  # as stages/pipeline.py runs them: the tokenizer with stage=tokenizer merged
        c = OmegaConf.merge(cfg, {"stage": stage})
        rd = RunDir(C.run_dir(c))
        tr = open_member_run(c, stage, rd, 1, None)
        RunStatus(rd).opened(2, 1, "cpu", tr.run_id)  # as RunContext.open does next
        tr.end()
        runs[stage] = (tr.client.get_run(tr.run_id), rd)
        assert rd.read_status()["opened"]  # the wall clock behind the sweep's device-hours
    (tok, tok_dir), (ar, _) = runs["tokenizer"], runs["ar"]
    assert tok.info.run_name == f"tokenizer tiny-lfq {tok_dir.signature}"
    assert "mlflow.parentRunId" not in tok.data.tags and tok.data.tags["magvit2.sweep_id"] == "sw1"
    client = MlflowClient(tracking.tracking_uri(root))
    tok_exp = client.get_experiment_by_name("magvit2-tokenizer").experiment_id
    assert not client.search_runs([tok_exp], "tags.`magvit2.kind` = 'sweep'")  # no empty parent run there
    assert ar.info.run_name == "k6_12-tiny" and ar.data.tags["mlflow.parentRunId"] == parent
    assert tok.data.tags["magvit2.slurm_job_id"] == ar.data.tags["magvit2.slurm_job_id"] == "18_0"
    assert RunDir(ar.data.tags["magvit2.run_dir"]).read_status()["slurm_job_id"] == "18_0"  # as the status table
