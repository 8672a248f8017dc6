"""Seed statistics (issue 21.5): the report and the sweep's CLI give the same verdict (a paired or Welch t-test),
cost / throughput columns carry no interval, and values are shown at the precision their interval supports."""
import pandas as pd
import pytest
from scipy import stats as sps

from magvit2.results import stats
from magvit2.results.tables import seeds_markdown
from magvit2.sweep import state

LOSS = {"k6_12": (7.0, 7.1, 7.05), "k9_9": (8.5, 8.6, 8.4)}
SPEED = {"k6_12": (74.0, 102.4, 60.0), "k9_9": (70.0, 71.0, 90.0)}


def _table() -> pd.DataFrame:
    rows = [{"factorization": f, "seed": s, "val loss (nats)": LOSS[f][s], "tokens/s": SPEED[f][s]}
            for f in LOSS for s in range(3)]
    return pd.DataFrame(rows).set_index(["factorization", "seed"])


def test_report_and_cli_say_the_same_verdict():
    agg = stats.aggregate(_table())
    lines = stats.overlaps(agg, "val loss (nats)", lower_better=True)
    p = sps.ttest_rel(LOSS["k6_12"], LOSS["k9_9"]).pvalue
    want = f"distinguishable at 5% (paired t-test over 3 shared seeds: p = {p:.2g})"
    assert len(lines) == 1 and want in lines[0]
    rows = [{"member": f"{f}-{s}", "state": "finished", "overrides": [f"factorization={f}", f"seed={s}"],
             "metrics": {"val/loss": v}} for f, vals in LOSS.items() for s, v in enumerate(vals)]
    assert state.winner_line(rows).endswith(want)
    assert stats.compare({0: 1.0}, {0: 2.0, 1: 3.0}).startswith("n = 1 vs 2: no claim")
    assert "Welch" in stats.compare({0: 1.0, 1: 1.2}, {5: 2.0, 6: 2.4})  # no shared seeds


def test_throughput_has_no_interval_and_values_follow_the_interval_precision():
    agg = stats.aggregate(_table())
    assert agg[("tokens/s", "lo")].isna().all()  # a description: no (possibly negative) t-interval
    md = seeds_markdown(agg)
    row = next(line for line in md.splitlines() if line.startswith("| k6_12"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    loss, speed = cells[2], cells[3]
    assert speed.count("[") == 0 and " ± " in speed
    half = (agg.loc["k6_12", ("val loss (nats)", "hi")] - agg.loc["k6_12", ("val loss (nats)", "lo")]) / 2
    assert half == pytest.approx(0.124, abs=1e-3) and loss.strip("*") == "7.05 ± 0.05 [6.93, 7.17]", loss
