"""The MLflow UI as a user on another machine reaches it: the README's server command as written, Debian chromium
(playwright) at http://<hostname>:<port> (the address the README exports and the tools print), the runs table of a
sweep's experiment, then the compare view of its members. MLflow 3 blocks cross-origin state-changing requests (the
runs table is a POST) from origins other than localhost unless --cors-allowed-origins names them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import ReadmeServer

from magvit2.tracking import MemberRun, ensure_sweep_run

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
RUNS = {"k6_12-B": 12.25, "k9_9-B": 17.75}  # run name -> final eval/fid (shown with 2 decimals)


@pytest.mark.browser
@pytest.mark.slow
def test_ui_at_the_host_name_shows_runs_table_and_compare_view(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium (.ci/system-deps.sh installs it)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with ReadmeServer(REPO / "README.md", tmp_path, Path(sys.executable).parent) as srv:
        url = srv.uri
        assert "127.0.0.1" not in url and "localhost" not in url, url  # the host name, as another machine uses it
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

        t0 = time.monotonic()
        errors: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.on("response", lambda r: (r.status == 403 or r.status >= 500) and "/api/" in r.url
                        and errors.append(f"{r.status} {r.request.method} {r.url}"))
                # the runs table: a POST to runs/search, refused (403 -> "INTERNAL_ERROR") without the CORS origin
                page.goto(f"{url}/#/experiments/{exp}/runs", wait_until="domcontentloaded", timeout=60_000)
                page.get_by_text("sweep-ui").first.wait_for(timeout=60_000)  # the parent run, once runs/search answered
                # the members are nested under the sweep's parent run: expand it as a user would
                page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
                for name in RUNS:
                    page.get_by_text(name).first.wait_for(timeout=60_000)
                page.wait_for_timeout(1000)
                runs_text = page.inner_text("body")
                SHOTS.mkdir(exist_ok=True)
                page.screenshot(path=str(SHOTS / "mlflow_runs_table.png"))
                # the compare view of the sweep's members
                page.goto(f"{url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp])}",
                          wait_until="domcontentloaded", timeout=60_000)
                for fid in RUNS.values():  # the metrics table arrives with a later request
                    page.wait_for_function("v => document.body.innerText.includes(v)", arg=f"{fid}", timeout=60_000)
                page.wait_for_timeout(1000)  # let the charts draw (the UI keeps polling: no network-idle moment)
                text = page.inner_text("body")
                page.screenshot(path=str(SHOTS / "mlflow_compare.png"))
            finally:
                browser.close()
        print(f"runs table and compare view at {url} checked in {time.monotonic() - t0:.1f} s; screenshots in {SHOTS}")
        log = srv.tail(20_000)
    assert not errors, errors
    assert "INTERNAL_ERROR" not in runs_text and "Request error" not in runs_text, runs_text[:2000]
    assert "Blocked cross-origin request" not in log, log[-2000:]
    assert "Comparing 2 Runs" in text
    metrics = text[text.index("\nMetrics\n"):text.index("\nArtifacts")]  # the compare page's metrics table
    for name, fid in RUNS.items():
        assert name in text and f"\n{fid}\n" in metrics, (name, metrics)
    assert "eval/fid" in metrics and "train/loss" in metrics
