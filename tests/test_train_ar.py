"""Stage II through the real entry point: the headline sweep (dry run, and end to end with tiny models), dedup,
validation before launch, the tokenizer dependency, resume, and `python -m magvit2.sample`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from conftest import REPO, assert_same_weights, load_ckpt, run_train, train_cmd

HEADLINE = ["factorization=k6_12,k9_9", "model=B,L,XL"]


def test_headline_command_dry_run_lists_six_valid_members(root):
    p = subprocess.run([sys.executable, "-m", "magvit2.train", "-m", *HEADLINE, "dry_run=true", f"paths.root={root}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [l.split() for l in p.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == ["k6_12-B", "k6_12-L", "k6_12-XL", "k9_9-B", "k9_9-L", "k9_9-XL"]
    assert all(r[2] == "new" for r in rows)
    assert len({r[-1] for r in rows}) == 6  # one run dir (signature) per member
    assert not (root / "runs").exists()  # nothing trained


def test_one_bad_member_stops_the_sweep_before_launch(root):
    p = run_train(root, "factorization=k6_12,k6_6_6", "tokenizer.bits=12", multirun=True, check=False, tiny=False,
                  timeout=300)
    assert p.returncode == 2
    assert "member #1 [factorization=k6_6_6" in p.stderr and "tokenizer.bits=12" in p.stderr
    assert not (root / "runs").exists()



def test_detach_with_the_local_launcher_is_refused(root):
    p = run_train(root, "model=B,L", "hydra/launcher=local", "hydra.launcher.detach=true", multirun=True, check=False,
                  tiny=False, timeout=300)
    assert p.returncode == 2 and "hydra.launcher.detach=true needs hydra/launcher=slurm" in p.stderr, p.stderr[-2000:]
    assert not (root / "runs").exists() and not (root / "submitit").exists()


@pytest.mark.slow
def test_headline_sweep_with_tiny_models_end_to_end(root, start_train):
    run_train(root, "factorization=k6_12,k9_9", "model=tiny", multirun=True)
    ar = sorted((root / "runs" / "ar").glob("*/status.json"))
    assert len(ar) == 2 and all(json.loads(f.read_text())["state"] == "finished" for f in ar)
    assert len(list((root / "runs" / "tokenizer").glob("*/checkpoint.pt"))) == 1  # trained once, shared
    for f in ar:
        rd = f.parent
        assert (rd / "samples.png").exists()
        npz = np.load(rd / "samples.npz")["arr_0"]
        assert npz.shape == (4 * 2, 16, 16, 3) and npz.dtype == np.uint8  # 4 classes x 2 per class
        res = json.loads((rd / "results.json").read_text())
        assert res["val/loss"] > 0 and "val/loss_1" in res and "val/loss_2" in res

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("magvit2-ar")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("magvit2.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.params["choice.factorization"] for r in children} == {"k6_12", "k9_9"}
    assert {r.data.params["derived.M"] for r in children} == {"2"}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"train/loss_1", "train/loss_2", "train/acc_1", "train/tokens_per_s", "val/loss"} <= set(r.data.metrics)
        assert r.data.metrics["compute/sample_images_per_s"] > 0  # the in-loop sampling's throughput
        # train/lr at step s is the lr step s used: warmup from 0.005x, then the decay ends at final_lr_ratio
        lrs = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/lr")]
        peak = float(r.data.params["trainer.ar.lr"])
        assert lrs[0] == (1, pytest.approx(0.005 * peak)) and lrs[-1] == (6, pytest.approx(0.1 * peak)), lrs
        assert "magvit2.missing.eval/fid" in r.data.tags  # no Inception weights offline: missing, not faked

    # the same sweep again trains nothing and reports the stored results; meanwhile (reads only), the sampling CLI
    again = start_train(root, "factorization=k6_12,k9_9", "model=tiny", multirun=True)
    rd = ar[0].parent
    samplers = [subprocess.Popen([sys.executable, "-m", "magvit2.sample", str(rd), "--per-class", "3", "--classes", "1",
                                  "2", "--seed", "7", "--out", str(root / f"s{k}")], cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k in range(2)]
    p2 = again.finish()
    assert p2.stdout.count("finished") >= 2 and "already finished" in p2.stderr + p2.stdout
    assert len(client.search_runs([exp.experiment_id])) == 3  # no new member runs
    # a closed sweep keeps its record (issue 21.2): one wall time in the metric history, the same description and
    # end time, nothing reopened
    before, after = parents[0], client.get_run(parents[0].info.run_id)
    walls = client.get_metric_history(before.info.run_id, "sweep/wall_s")
    assert [m.value for m in walls] == [before.data.metrics["sweep/wall_s"]], walls
    assert after.data.tags["mlflow.note.content"] == before.data.tags["mlflow.note.content"]
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert "already complete; its record stands" in p2.stdout
    assert [json.loads(f.read_text())["updated"] for f in ar] == \
        [json.loads(f.read_text())["updated"] for f in sorted((root / "runs" / "ar").glob("*/status.json"))]

    # sampling CLI on a finished run, reproducible for a seed
    outs = []
    for k, q in enumerate(samplers):
        _, err = q.communicate(timeout=300)
        assert q.returncode == 0, err[-3000:]
        outs.append(np.load(root / f"s{k}" / "samples.npz")["arr_0"])
    assert outs[0].shape == (6, 16, 16, 3) and np.array_equal(outs[0], outs[1])


@pytest.mark.slow
def test_ar_kill_and_resume_matches_uninterrupted(tmp_path, start_train):
    # tokens=online (the original's): each step encodes its own crops; 16 images of batch 8 -> a new epoch (other
    # crops) every 2 steps, so the resumed run must re-draw the crops of the epochs it re-enters
    online = ["tokens=online", "data.train_size=16"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    uninterrupted = start_train(a, *online)  # a: the reference, alongside b (separate roots; start-up dominates)
    # b: kill during AR training (after its first checkpoint), start again
    proc = subprocess.Popen(train_cmd(b, *online), cwd=b, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not list((b / "runs" / "ar").glob("*/checkpoint.pt")) and time.time() < deadline:
        assert proc.poll() is None, "run ended before the AR checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (rd,) = [d for d in (b / "runs" / "ar").iterdir() if d.is_dir()]
    assert load_ckpt(rd)["step"] < 6
    run_train(b, *online)
    uninterrupted.finish()
    (ref_dir,) = [d for d in (a / "runs" / "ar").iterdir() if d.is_dir()]
    ref = load_ckpt(ref_dir)
    run = mlflow.MlflowClient(f"sqlite:///{a}/mlflow.db").get_run(json.loads((ref_dir / "status.json").read_text())
                                                                   ["mlflow_run_id"])
    assert run.data.params["derived.tokens"] == "online" and run.data.params["tokens.name"] == "online"
    assert not list((a / "cache").rglob("train-*.npz"))  # no train token cache: encoded at every step
    got = load_ckpt(rd)
    assert got["step"] == 6
    assert_same_weights(ref["model"], got["model"])


@pytest.mark.slow
def test_cached_tokens_end_to_end(root):
    # tokens=cached: 2 crops x flip = 4 token variants per train image, extracted once, read by (epoch, image)
    run_train(root, "tokens=cached", "tokens.crops=2", "tokens.flips=true", "data.train_size=16", "trainer.ar.steps=4")
    (rd,) = [d for d in (root / "runs" / "ar").iterdir() if d.is_dir()]
    st = json.loads((rd / "status.json").read_text())
    assert st["state"] == "finished" and st["step"] == 4
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(st["mlflow_run_id"])
    assert run.data.params["derived.tokens"] == "cached" and run.data.params["derived.train_tokens"] == "64"
    (done,) = list((root / "cache" / "tokens").glob("*/done.json"))
    assert json.loads(done.read_text())["counts"] == {"train": 64, "val": 20}


def test_explicit_tokenizer_checkpoint_errors(root):
    p = run_train(root, "tokens.tokenizer=/nope/checkpoint.pt", check=False)
    assert p.returncode == 2 and "tokens.tokenizer=/nope/checkpoint.pt: file not found" in p.stderr
