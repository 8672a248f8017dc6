"""The MLflow UI's compare page shows our runs: a real server, real runs, Debian chromium driven by playwright."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401 - fixture

from magvit2.tracking import MemberRun, ensure_sweep_run

CHROMIUM = Path("/usr/bin/chromium")
SHOT = Path(__file__).resolve().parents[1] / "test-artifacts" / "mlflow_compare.png"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
RUNS = {"k6_12-B": 12.25, "k9_9-B": 17.75}  # run name -> final eval/fid (shown with 2 decimals)


@pytest.mark.browser
@pytest.mark.slow
def test_compare_page_shows_runs_and_metrics(mlflow_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium (.ci/system-deps.sh installs it)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    url = mlflow_server.url
    ensure_sweep_run("magvit2-ar", str(tmp_path), "ui", "ar", "factorization=k6_12,k9_9 model=B", 2, uri=url)
    ids = []
    for name, fid in RUNS.items():
        m = MemberRun("magvit2-ar", str(tmp_path), "ar", f"sig-{name}", name, {}, "ui", uri=url)
        m.log_params({"choice.factorization": name.split("-")[0], "choice.model": "B"})
        for s in range(3):
            m.log_metrics({"eval/fid": fid + 2 - s, "train/loss": 5.0 - s}, step=s)
        m.end()
        ids.append(m.run_id)
    exp = MlflowClient(url).get_experiment_by_name("magvit2-ar").experiment_id
    page_url = f"{url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp])}"

    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_url, wait_until="domcontentloaded", timeout=60_000)
            for name in RUNS:  # rendered by the React app, not in the served HTML
                page.get_by_text(name).first.wait_for(timeout=60_000)
            for fid in RUNS.values():  # the metrics table arrives with a later request
                page.wait_for_function("v => document.body.innerText.includes(v)", arg=f"{fid}", timeout=60_000)
            page.wait_for_timeout(1000)  # let the charts finish drawing before the screenshot (the UI keeps polling,
            #                              so there is no network-idle moment to wait for)
            text = page.inner_text("body")
            SHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SHOT))  # header, run names, parallel-coordinates plot
            page.get_by_text("train/loss").last.scroll_into_view_if_needed()  # the page scrolls in a container
            page.screenshot(path=str(SHOT.with_name("mlflow_compare_metrics.png")))
        finally:
            browser.close()
    print(f"compare page rendered and checked in {time.monotonic() - t0:.1f} s; screenshot {SHOT}")
    assert "Comparing 2 Runs" in text
    metrics = text[text.index("\nMetrics\n"):text.index("\nArtifacts")]  # the compare page's metrics table
    for name, fid in RUNS.items():
        assert name in text and f"\n{fid}\n" in metrics, (name, metrics)
    assert "eval/fid" in metrics and "train/loss" in metrics
    assert SHOT.stat().st_size > 20_000
