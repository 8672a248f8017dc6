"""magvit2.results + magvit2.report on a synthetic 2x2 AR sweep logged with MemberRun to a real sqlite store."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import fresh_sqlite

from magvit2 import tracking
from magvit2.results import (ar_table, load_history, load_runs, missing_note, plot_curves, plot_scaling,
                              plot_utilization, to_markdown, tokenizer_table)

REPO = Path(__file__).resolve().parents[1]
SWEEP = "2024-05-01_12-00-00"
PARAMS = {"tiny": 1_234_567, "B": 343_600_000}
# (factorization, model) -> final metrics; FID of k9_9-B is missing with a reason (and so is its N of val images)
N_GEN = {"tiny": {"eval/n_samples": 8.0, "eval/n_real": 20.0}, "B": {"eval/n_samples": 50000.0, "eval/n_real": 50000.0}}
FINAL = {
    ("k6_12", "tiny"): {"eval/fid": 41.5, "eval/is": 20.25, "val/loss": 7.5, "val/n_images": 64.0, "val/loss_1": 2.5,
                        "val/loss_2": 5.0, **N_GEN["tiny"]},
    ("k6_12", "B"): {"eval/fid": 12.25, "eval/is": 80.5, "val/loss": 6.25, "val/n_images": 64.0, "val/loss_1": 2.0,
                     "val/loss_2": 4.25, **N_GEN["B"]},
    ("k9_9", "tiny"): {"eval/fid": 45.75, "eval/is": 18.0, "val/loss": 8.5, "val/n_images": 64.0, "val/loss_1": 4.5,
                       "val/loss_2": 4.0, **N_GEN["tiny"]},
    ("k9_9", "B"): {"eval/is": 70.125, "val/loss": 7.0, "val/n_images": 64.0, "val/loss_1": 3.5, "val/loss_2": 3.5,
                    "eval/n_samples": 50000.0},
}
MISSING_REASON = "no Inception weights at metrics.inception_path"
# tokenizer runs: quantizer -> final metrics, utilization history (VQ collapses); rFID missing for both
N_TOK = {"eval/n_images": 64.0, "eval/n_tokens": 16384.0}
TOK = {"lfq": {"eval/psnr": 21.5, "eval/ssim": 0.625, "eval/ssim_skimage": 0.75, "eval/lpips": 0.125,
               "eval/perplexity": 250000.0, **N_TOK},
       "vq": {"eval/psnr": 19.25, "eval/ssim": 0.5, "eval/ssim_skimage": 0.5625, "eval/lpips": 0.25,
              "eval/perplexity": 900.5, **N_TOK}}
UTIL = {"lfq": [1.0, 1.0, 1.0], "vq": [0.5, 0.25, 0.125]}


def _bits(fac: str) -> list[int]:
    return [18] if fac == "none" else [int(b) for b in fac[1:].split("_")]


def _log_member(root: Path, fac: str, model: str, sweep: str, final: dict, steps: int = 5) -> str:
    m = tracking.MemberRun("magvit2-ar", str(root), "ar", f"sig-{fac}-{model}", f"{fac}-{model}",
                           {"magvit2.overrides": f"factorization={fac} model={model}"}, sweep)
    cfg = {"stage": "ar", "factorization": {"bits": _bits(fac)}, "model": {"dim": 64 if model == "tiny" else 1024},
           "trainer": {"compile": model == "B", "lr": 3e-4, "ar": {"steps": 40}}, "seed": 7,
           "derived": {"params": PARAMS.get(model, 1), "bits": "-".join(map(str, _bits(fac)))},
           "choice": {"factorization": fac, "model": model}}
    m.log_params(tracking.flatten(cfg))
    for s in range(steps):  # histories end at the final values
        m.log_metrics({k: v + (steps - 1 - s) for k, v in final.items() if k.startswith("val/")}, step=10 * s)
    m.log_metrics({k: v for k, v in final.items() if k.startswith("eval/")}, step=10 * (steps - 1))
    if "eval/fid" not in final:
        m.log_missing("eval/fid", MISSING_REASON)
    m.end()
    return m.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "outputs"
    uri = fresh_sqlite(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        sweep_run = tracking.ensure_sweep_run("magvit2-ar", str(root), SWEEP, "ar", "factorization=k6_12,k9_9 "
                                              "model=tiny,B", 4)
        ids = {}
        for key in [("k9_9", "B"), ("k6_12", "tiny"), ("k9_9", "tiny"), ("k6_12", "B")]:  # not in table order
            ids[key] = _log_member(root, *key, SWEEP, FINAL[key])
        tracking.finish_sweep_run(sweep_run)
        # another sweep whose factorizations must sort by M, then bits
        for fac in ["k3_6_9", "k12_6", "none", "k6_12"]:
            _log_member(root, fac, "L", "order", {"val/loss": 1.0}, steps=1)
        tok = {}
        for q in ("vq", "lfq"):
            m = tracking.MemberRun("magvit2-tokenizer", str(root), "tokenizer", f"tok-{q}", f"tiny-{q}", {}, "tok")
            m.log_params(tracking.flatten({"choice": {"tokenizer": "tiny", "quantizer": q}, "quantizer": {"K": 18},
                                           "trainer": {"tokenizer": {"steps": 200}, "ar": {"steps": 9}}, "seed": 3}))
            for s, u in enumerate(UTIL[q]):
                m.log_metrics({"eval/utilization": u, "train/loss": 1.0 / (s + 1)}, step=100 * s)
            m.log_metrics(TOK[q], step=200)
            m.log_missing("eval/rfid", f"no Inception weights ({q})")
            m.end()
            tok[q] = m.run_id
        yield {"root": root, "uri": uri, "ids": ids, "sweep_run": sweep_run, "tok": tok}


def test_load_runs_types_and_order(store):
    df = load_runs(sweep=SWEEP, tracking_uri=store["uri"])
    assert len(df) == 4 and set(df["run_id"]) == set(store["ids"].values())
    assert list(df["factorization"].cat.categories) == ["k6_12", "k9_9"] and df["factorization"].cat.ordered
    assert list(df["model"].cat.categories) == ["tiny", "B"] and df["model"].cat.ordered
    assert list(zip(df["factorization"], df["model"])) == [("k6_12", "tiny"), ("k6_12", "B"), ("k9_9", "tiny"),
                                                           ("k9_9", "B")]
    assert (df["stage"] == "ar").all() and (df["sweep_id"] == SWEEP).all() and (df["status"] == "FINISHED").all()
    assert (df["parent_run_id"] == store["sweep_run"]).all()
    assert df["derived.params"].dtype == "int64" and df["model.dim"].dtype == "int64"
    assert df["trainer.lr"].dtype == "float64" and df["trainer.compile"].dtype == "boolean"
    assert df["factorization.bits"].tolist() == ["[6, 12]", "[6, 12]", "[9, 9]", "[9, 9]"]
    for (fac, model), final in FINAL.items():
        row = df[(df["factorization"] == fac) & (df["model"] == model)].iloc[0]
        assert row["run_name"] == f"{fac}-{model}" and row["signature"] == f"sig-{fac}-{model}"
        for k in ("eval/fid", "eval/is", "val/loss", "val/loss_1", "val/loss_2"):
            assert (row[k] == final[k]) if k in final else pd.isna(row[k]), (fac, model, k)
        assert row["missing"] == ({} if "eval/fid" in final else {"eval/fid": MISSING_REASON})
    assert df["eval/fid"].dtype == "float64"


def test_factorization_order_by_m_then_bits(store):
    df = load_runs(sweep="order", tracking_uri=store["uri"])
    assert list(df["factorization"].cat.categories) == ["none", "k6_12", "k12_6", "k3_6_9"]
    with pytest.raises(ValueError, match="experiment='nope'"):
        load_runs(experiment="nope", tracking_uri=store["uri"])
    assert len(load_runs(experiment="magvit2-ar", tracking_uri=store["uri"])) == 8


def test_a_sweep_reports_members_an_earlier_sweep_finished(tmp_path, monkeypatch):
    """Re-running a sweep with one more member trains only that one; the report still lists every member."""
    root = tmp_path / "outputs"
    uri = fresh_sqlite(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.ensure_sweep_run("magvit2-ar", str(root), "first", "ar", "factorization=k6_12,k9_9", 2,
                                      members=["sig-k6_12-tiny", "sig-k9_9-tiny"])
    old = {f: _log_member(root, f, "tiny", "first", FINAL[(f, "tiny")]) for f in ("k6_12", "k9_9")}
    tracking.finish_sweep_run(first)
    second = tracking.ensure_sweep_run("magvit2-ar", str(root), "second", "ar", "factorization=k6_12,k12_6", 2,
                                       members=["sig-k6_12-tiny", "sig-k12_6-tiny"])
    new = _log_member(root, "k12_6", "tiny", "second", {"val/loss": 9.0})
    tracking.finish_sweep_run(second)
    df = load_runs(sweep="second", tracking_uri=uri)
    assert set(df["run_id"]) == {old["k6_12"], new}, "the member the first sweep finished is missing"
    assert dict(zip(df["run_name"], df["sweep_id"])) == {"k6_12-tiny": "first", "k12_6-tiny": "second"}
    assert set(load_runs(sweep="first", tracking_uri=uri)["run_id"]) == set(old.values())
    # a member list longer than MLflow keeps in a tag is stored whole in the run's tags overflow artifact
    long = [f"{i:016x}" for i in range(600)]
    third = tracking.ensure_sweep_run("magvit2-ar", str(root), "third", "ar", "seed=0..599", 600, members=long)
    run = MlflowClient(uri).get_run(third)
    assert run.data.tags[tracking.MEMBERS] == tracking.SEE_TAGS
    assert tracking.tag_value(MlflowClient(uri), run, tracking.MEMBERS).split() == long


def test_history_and_plots(store, tmp_path):
    ids = list(store["ids"].values())
    h = load_history(ids, ["val/loss*"], tracking_uri=store["uri"])
    assert set(h["key"]) == {"val/loss", "val/loss_1", "val/loss_2"}
    assert len(h) == 4 * 3 * 5
    one = h[(h["run_id"] == store["ids"][("k6_12", "B")]) & (h["key"] == "val/loss")]
    assert one["step"].tolist() == [0, 10, 20, 30, 40] and one["value"].tolist() == [10.25, 9.25, 8.25, 7.25, 6.25]
    df = load_runs(sweep=SWEEP, tracking_uri=store["uri"])
    fig = plot_scaling(df, "eval/fid", tmp_path / "s.png")
    lines = fig.axes[0].get_lines()
    assert sorted(len(l.get_xdata()) for l in lines) == [1, 2]  # k9_9 has only the tiny point (B's FID missing)
    plot_curves(h, "val/loss", tmp_path / "c.png")
    assert (tmp_path / "s.png").stat().st_size > 5000 and (tmp_path / "c.png").stat().st_size > 5000
    # x: the model size by name, in size order (not the parameter count, which includes the 2^K-way head)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["tiny", "B"]
    assert sorted(round(x) for l in lines for x in l.get_xdata()) == [0, 0, 1]
    # a metric no run logged: no figure, no file (the report says so in its text)
    assert plot_scaling(df, "eval/nothing", tmp_path / "n.png") is None and not (tmp_path / "n.png").exists()
    assert plot_curves(h, "eval/nothing", tmp_path / "n.png") is None and not (tmp_path / "n.png").exists()
    assert missing_note(df, "eval/fid") == f"FID (in-loop): no run logged it ({MISSING_REASON}), so no plot."


def test_members_of_one_model_size_sit_together_in_the_scaling_plot():
    names = ["k6_12-n_intra=0", "k6_12-n_intra=1", "k9_9-n_intra=0", "k9_9-n_intra=1", "k6_12-B"]
    models = ["tiny"] * 4 + ["B"]
    df = pd.DataFrame({"run_name": names, "model": pd.Categorical(models, ["tiny", "B"], ordered=True),
                       "val/loss": [7.0, 7.5, 8.0, 8.5, 6.0], "missing": [{}] * 5})
    fig = plot_scaling(df, "val/loss")
    xs = {l.get_label(): list(l.get_xdata()) for l in fig.axes[0].get_lines()}
    assert set(xs) == {"k6_12", "k6_12-n_intra=0", "k6_12-n_intra=1", "k9_9-n_intra=0", "k9_9-n_intra=1"}
    tiny = [x for k, v in xs.items() if k != "k6_12" for x in v]
    assert all(abs(x) < 0.25 for x in tiny) and len(set(tiny)) == 4  # side by side at the tiny tick, not on top
    assert [round(x) for x in xs["k6_12"]] == [1]


AR_HEADER = ["factorization", "model", "status", "protocol", "steps (schedule)", "seed", "FID (in-loop)", "IS", "N samples", "N val img",
             "val loss (nats)", "N val loss img", "val loss 1 (nats)", "val loss 2 (nats)", "params (incl. head)"]


def test_ar_table_markdown(store):
    t = ar_table(load_runs(sweep=SWEEP, tracking_uri=store["uri"]))
    assert list(t.columns) == AR_HEADER[2:] + ["missing"]
    assert t.loc[("k9_9", "B"), "missing"] == f"FID (in-loop): {MISSING_REASON}"
    md = to_markdown(t)
    # status, steps, seed; the best of each metric in bold (lowest FID and loss, highest IS); no N or count is, nor
    # a per-sub-token loss across factorizations (k6_12's sub-token 1 has 6 bits, k9_9's 9)
    assert "| k9_9 | B | finished | precise | 40 | 7 | — (1) | 70.12 | 50,000 | — | 7 | 64 | 3.5 | 3.5 | 343,600,000 |" in md
    assert "| k6_12 | B | finished | precise | 40 | 7 | **12.25** | **80.5** | 50,000 | 50,000 | **6.25** | 64 | 2 | 4.25 |" in md
    assert "| k6_12 | tiny | finished | precise | 40 | 7 | 41.5 | 20.25 | 8 | 20 | 7.5 |" in md
    assert f"Missing values:\n\n1. FID (in-loop) of k9_9/B: {MISSING_REASON}" in md and "[^" not in md


def test_tokenizer_table_and_utilization(store, tmp_path):
    df = load_runs(sweep="tok", tracking_uri=store["uri"])
    assert df["stage"].tolist() == ["tokenizer"] * 2 and df["experiment"].tolist() == ["magvit2-tokenizer"] * 2
    t = tokenizer_table(df)
    assert list(t.index) == [("tiny", "lfq"), ("tiny", "vq")] and list(t.index.names) == ["tokenizer", "quantizer"]
    assert list(t.columns) == ["status", "protocol", "steps (schedule)", "seed", "rFID", "PSNR (dB)", "SSIM", "SSIM (Gaussian 11x11)",
                               "LPIPS", "N img", "utilization (%)", "perplexity", "N tokens", "missing"]
    assert t["rFID"].isna().all() and t.loc[("tiny", "vq"), "missing"] == "rFID: no Inception weights (vq)"
    assert t.loc[("tiny", "vq"), "utilization (%)"] == 12.5 and t.loc[("tiny", "lfq"), "PSNR (dB)"] == 21.5
    md = to_markdown(t)  # utilization in percent, as the training summary prints it; SSIM: skimage's
    assert "| tiny | vq | finished | precise | 200 | 3 | — (2) | 19.25 | 0.5625 | 0.5 | 0.25 | 64 | 12.5 | 900.5 | 16,384 |" in md
    assert ("| tiny | lfq | finished | precise | 200 | 3 | — (1) | **21.5** | **0.75** | **0.625** | **0.125** | 64 | **100** | "
            "250,000 | 16,384 |") in md  # LPIPS: lower is better
    h = load_history(df["run_id"], "eval/utilization", tracking_uri=store["uri"])
    fig = plot_utilization(h, tmp_path / "u.png")
    ys = {l.get_label(): list(l.get_ydata()) for l in fig.axes[0].get_lines()}
    assert ys == {"tiny-lfq": [100 * u for u in UTIL["lfq"]], "tiny-vq": [100 * u for u in UTIL["vq"]]}
    assert (tmp_path / "u.png").stat().st_size > 5000


def _table_rows(md: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    lines = md.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(header_start))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for l in lines[i + 2:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip().strip("|").split("|")])
    return header, rows


@pytest.mark.slow
def test_report_cli(store, tmp_path):
    out = tmp_path / "rep"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "magvit2.report", "--sweep", SWEEP, "--out", str(out),
                        "--tracking-uri", store["uri"]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"report CLI took {took:.1f} s")
    md = (out / "report.md").read_text()
    header, rows = _table_rows(md, "| factorization | model |")
    assert header == AR_HEADER
    expect = []
    for (fac, model), f in FINAL.items():
        fid = f"{f['eval/fid']:g}" if "eval/fid" in f else "— (1)"
        n_real = f"{f['eval/n_real']:,.0f}" if "eval/n_real" in f else "—"
        expect.append([fac, model, "finished", "precise", "40", "7", fid, f"{f['eval/is']:.4g}", f"{f['eval/n_samples']:,.0f}",
                       n_real, f"{f['val/loss']:g}", f"{f['val/n_images']:,.0f}", f"{f['val/loss_1']:g}",
                       f"{f['val/loss_2']:g}", f"{PARAMS[model]:,}"])
    assert [[c.strip("*") for c in r] for r in rows] == expect
    assert f"1. FID (in-loop) of k9_9/B: {MISSING_REASON}" in md
    assert "FID (in-loop): N samples vs N val images, not the paper's 50k-sample gFID" in md
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"scaling_eval_fid.png", "curve_val_loss.png", "curve_val_loss_2.png"} <= set(pngs)
    assert "precision (k = 3" not in md and "| precision |" not in md  # not asked for: no column, plot or note
    for p in pngs:
        assert (out / p).stat().st_size > 5000, p
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "k9_9" in html and "data:image/png;base64" in html
    assert not re.search(r"\[\^\d+\]", html) and "<strong>12.25</strong>" in html  # rendered, no raw "[^1]:"
    nb = (out / "report.ipynb").read_text()
    assert f"kernel python: {sys.executable}" in nb  # papermill ran this interpreter, not some global kernel


@pytest.mark.slow
def test_report_cli_tokenizer_experiment(store, tmp_path):
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, "-m", "magvit2.report", "--experiment", "magvit2-tokenizer", "--out",
                        str(out), "--tracking-uri", store["uri"]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "report.md").read_text()
    header, rows = _table_rows(md, "| tokenizer | quantizer |")
    assert header == ["tokenizer", "quantizer", "status", "protocol", "steps (schedule)", "seed", "rFID", "PSNR (dB)", "SSIM",
                      "SSIM (Gaussian 11x11)", "LPIPS", "N img", "utilization (%)", "perplexity", "N tokens"]
    assert [r[:2] + r[6:7] for r in rows] == [["tiny", "lfq", "— (1)"], ["tiny", "vq", "— (2)"]]
    assert "2. rFID of tiny/vq: no Inception weights (vq)" in md and "Autoregressive" not in md
    assert (out / "utilization.png").stat().st_size > 5000 and "(utilization.png)" in md
    # no run logged rFID: a line in the text says so (with the runs' reasons), not an empty plot
    assert not (out / "curve_tokenizer_eval_rfid.png").exists() and "curve_tokenizer_eval_rfid" not in md
    assert ("- rFID: no run logged it (no Inception weights (lfq); no Inception weights (vq)), so no plot." in md)
    html = (out / "report.html").read_text()
    assert "no run logged it" in html and not re.search(r"\[\^\d+\]", html)


def test_report_no_runs_is_an_error(store, tmp_path, capsys):
    from magvit2.report import main

    rc = main(["--sweep", "no-such-sweep", "--out", str(tmp_path / "r"), "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert rc == 2 and "no member runs match sweep='no-such-sweep'" in err and SWEEP in err
    assert not (tmp_path / "r").exists()


def test_summary_shows_each_metric_with_its_n_and_the_reference_ssim():
    from magvit2.stages.summary import format_summary

    tok = {"run_dir": "/r/tokenizer/sig/x", "eval/psnr": 24.5, "eval/ssim": 0.5, "eval/ssim_skimage": 0.75,
           "eval/utilization": 0.25, "eval/perplexity": 900.0, "eval/n_images": 64.0, "eval/n_tokens": 16384.0}
    res = {"run_dir": "/r/ar/sig", "val/loss": 7.5, "eval/fid": 55.5, "eval/is": 3.25, "eval/n_samples": 80.0,
           "eval/n_real": 20.0, "tokenizer": tok}
    lines = [" ".join(l.split()) for l in format_summary("ar", res, "sqlite:///x.db").splitlines()]
    for want in ("PSNR (dB) 24.50 (N = 64 images)", "SSIM 0.750 (N = 64 images)",
                 "SSIM (Gaussian 11x11) 0.500 (N = 64 images)", "utilization (%) 25.00 (N = 16,384 tokens)",
                 "perplexity 900 (N = 16,384 tokens)", "FID (in-loop) 55.50 (N = 80 samples vs 20 val images)",
                 "IS 3.25 (N = 80 samples)", "val loss (nats) 7.500 (N = ? images)"):
        assert want in lines, (want, lines)
    old = [" ".join(l.split()) for l in format_summary("tokenizer", {"eval/psnr": 20.0}, "x").splitlines()]
    assert "PSNR (dB) 20.00 (N = ? images)" in old  # a run from before N was logged says so


def test_one_factorization_has_one_colour_in_every_plot():
    from magvit2.results.plots import styles
    a = styles(["k9_9-B", "k6_12-tiny", "k6_12-B", "tokenizer tiny-vq_plain 0123", "n_intra=0-B"])
    b = styles(["k6_12", "k9_9", "vq_plain-tiny", "seed=1-B"])
    assert a[1]["color"] == a[2]["color"] == b[0]["color"] and a[0]["color"] == b[1]["color"] != b[0]["color"]
    assert a[1]["linestyle"] != a[2]["linestyle"]  # one colour: the dashes tell the sizes apart
    assert a[3]["color"] == b[2]["color"] and len({s["color"] for s in a}) == 4
