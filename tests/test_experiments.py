"""The tiny scale of every ready experiment (experiments/experiment/*.yaml) trains here and its report section has
the rows, columns and N it should; factorization runs two seeds, so its arms have a spread and an interval.
One root for all: the experiments' AR sweeps share the tiny tokenizer (found by signature) and equal members."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_train

from magvit2.results import experiments, load_runs
from magvit2.results.stats import aggregate

pytestmark = pytest.mark.slow
# the experiment's own scale=tiny, cut to 6 steps and a few images (model sizes stay the scale's: scaling varies them)
FAST = ["scale=tiny", "hydra/launcher=basic", "trainer.tokenizer.steps=6", "trainer.ar.steps=6",
        "trainer.tokenizer.ckpt_every=3", "trainer.ar.ckpt_every=3", "trainer.ar.warmup_steps=2", "tracking.log_every=2",
        "metrics.download=false", "data.train_size=64", "data.val_size=8", "sampling.per_class=1"]
TIMES: dict[str, float] = {}


def sweep(root, name: str, *extra: str):
    """Run the experiment's tiny sweep; its runs as the report loads them (members an earlier sweep had already
    finished included, and the tokenizer they share), with this sweep's overrides (sweeps/<id>/sweep.json)."""
    t0 = time.monotonic()
    run_train(root, f"+experiment={name}", *FAST, *extra, multirun=True, tiny=False)
    TIMES[name] = time.monotonic() - t0
    doc = max((json.loads(f.read_text()) for f in (root / "sweeps").glob("*/sweep.json")),
              key=lambda d: d["submitted"] or 0)
    df = load_runs(sweep=doc["id"], tracking_uri=f"sqlite:///{root}/mlflow.db")
    ov = {m["signature"]: " ".join(m["overrides"]) for m in doc["members"]}
    assert set(ov) <= set(df["signature"]), "a member of the sweep is missing from its report"
    mine = df[df["signature"].isin(ov)]
    assert mine["signature"].is_unique
    return mine.assign(overrides=mine["signature"].map(ov))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("experiments")
    yield r
    print("tiny experiment sweeps (s):", {k: round(v, 1) for k, v in TIMES.items()})


def check(df, name, root, rows: set, columns: list[str]):
    md, pngs = experiments.section(df, name, root / "report", _evals(root) if name == "cross_dataset" else None)
    members = experiments.table(df[df["stage"] == experiments.EXPERIMENTS[name][0]]
                                if name != "cross_dataset" else experiments.evaluations(df, _evals(root)), name)
    agg = aggregate(members)
    got = {"/".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in agg.index}
    assert all(any(g.endswith(r) for g in got) for r in rows) and len(got) == len(rows), (rows, got)
    for c in columns:
        assert c in members.columns, (c, list(members.columns))
        assert f"| {c} |" in md.splitlines()[4] or f" {c} |" in md, c
    assert pngs and all(p.stat().st_size > 3000 for p in pngs)
    assert "By arm, over seeds" in md and "n seeds" in md
    return members, agg, md


def _evals(root):
    return load_runs(experiment="magvit2-evaluate", tracking_uri=f"sqlite:///{root}/mlflow.db")


def test_factorization_two_seeds_aggregate_with_spread_and_report_cli(root):
    df = sweep(root, "factorization", "hydra.sweeper.params.factorization='k6_12,k9_9'", "seed=0,1")
    members, agg, md = check(df, "factorization", root, {"k6_12/stand_B", "k9_9/stand_B"},
                             ["val loss (nats)", "val loss 1 (nats)", "val loss 2 (nats)", "N val loss img",
                              "N samples", "precision", "recall", "tokens/s", "sampling images/s",
                              "model GFLOP/step", "device-hours", "peak RSS (GiB, CPU)"])
    assert "seed" in members.index.names and len(members) == 4
    loss = agg["val loss (nats)"]
    assert (loss["n"] == 2).all() and (loss["std"] > 0).all() and (loss["hi"] > loss["lo"]).all()
    assert " ± " in md and "overlap" in md and "MFU (%)" in md and "no known peak for cpu" in md
    r = subprocess.run([sys.executable, "-m", "magvit2.report", "--sweep", df["sweep_id"].iloc[0], "--out",
                        str(root / "rep"), "--tracking-uri", f"sqlite:///{root}/mlflow.db"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = (root / "rep" / "report.md").read_text()
    assert "### Experiment factorization" in rep
    # the experiment asks for precision / recall: without Inception weights the report says why there is no plot
    assert "precision: no run logged it (no Inception" in rep


def test_lfq_vs_vq(root):
    members, agg, _ = check(sweep(root, "lfq_vs_vq"), "lfq_vs_vq", root,
                            {"tiny/lfq", "tiny/vq", "tiny/vq_plain"},  # the quantizer group names (name:)
                            ["utilization (%)", "N tokens", "PSNR (dB)", "N img", "images/s", "model GFLOP/step"])
    assert (agg[("n seeds", "n")] == 1).all()


def test_intra_vs_heads_scaling_recipe_share_the_tokenizer(root):
    for name, rows in (("intra_vs_heads", {"+intra=paper", "+intra=heads", "+intra=heads_equal_params"}),
                       ("scaling", {"k6_12/stand_B", "k6_12/stand_L", "k6_12/stand_XL"}),
                       ("recipe", {"+recipe=reference", "+recipe=class_rope_identity"})):
        df = sweep(root, name)
        members, agg, md = check(df, name, root, {r.replace("+", "") for r in rows} if name != "scaling" else rows,
                                 ["val loss (nats)", "N val loss img", "tokens/s"])
        assert "n = 1 (one seed" in md
    p = experiments.table(df, "recipe")
    assert p["status"].eq("finished").all()
    assert len({s for s in load_runs(tracking_uri=f"sqlite:///{root}/mlflow.db").query("stage == 'tokenizer'")
                ["signature"]}) == 3 + 1  # lfq_vs_vq's three and the tiny tokenizer every AR seed shares


def test_cross_dataset(root):
    df = sweep(root, "cross_dataset")  # after the AR sweeps its tokenizer is theirs (seed 0): found, not retrained
    t0 = time.monotonic()
    run = root / "runs" / "tokenizer" / df["signature"].iloc[0]
    sys.path.insert(0, str(REPO / "experiments"))
    from cross_dataset import photo_folders
    unseen = photo_folders(root / "folders")["photos_unseen"]  # one folder: two evaluations (16 and 32 px)
    subprocess.run([sys.executable, str(REPO / "experiments" / "cross_dataset.py"), "--root", str(root),
                    "--folder", f"unseen={unseen}", "--run", str(run), "--", "--no-download"], check=True, cwd=root,
                   capture_output=True, timeout=600)
    TIMES["cross_dataset evaluate"] = time.monotonic() - t0
    members, agg, _ = check(df, "cross_dataset", root, {"resolution=16", "resolution=32"},
                            ["PSNR (dB)", "N img", "utilization (%)", "N tokens"])
    assert (members["N img"] == 4).all()
