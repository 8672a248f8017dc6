"""magvit2.metrics.registry: every metric the code logs has one row, and every place that shows a metric reads it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from magvit2.metrics import registry

REPO = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^(train|val|eval|compute|data|sweep)/[a-z0-9_]*[a-z0-9]$")
NOT_METRICS = {"data/tokens", "data/photos"}  # folders under the root, not metric keys


def _literal_keys() -> dict[str, str]:
    """Every string constant in magvit2 shaped like a metric key -> the file it is in."""
    found = {}
    for path in (REPO / "magvit2").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY.match(node.value):
                found.setdefault(node.value, str(path.relative_to(REPO)))
    return {k: f for k, f in found.items() if k not in NOT_METRICS}


def _computed_keys() -> set[str]:
    """The keys the loops build from what the quantizers, the AR loss and the metric classes return (f"train/{k}",
    f"val/{k}", f"eval/{k}"): from running them on tiny inputs."""
    from test_metrics import TinyFeatures

    from magvit2.metrics import GenerationMetrics, ReconstructionMetrics
    from magvit2.models.ar import subtoken_loss
    from magvit2.quantizers.lfq import LFQ
    from magvit2.quantizers.vq import VQ
    keys = set()
    for q, z in ((LFQ(bits=4), torch.randn(2, 4, 3, 3)), (VQ(codebook_size=16, dim=4), torch.randn(2, 4, 3, 3))):
        keys |= {f"train/{k}" for k in q(z).stats}
    logits = [torch.randn(2, 5, 2 ** b) for b in (3, 4, 5)]
    _, logs = subtoken_loss(logits, torch.stack([torch.randint(2 ** b, (2, 5)) for b in (3, 4, 5)], -1))
    keys |= {f"{p}/{k}" for k in ["loss", *logs] for p in ("train", "val")}
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    rm = ReconstructionMetrics(16, inception=TinyFeatures())
    out, _ = registry_loop(rm, x)
    keys |= {f"eval/{k}" for k in out}
    gm = GenerationMetrics(TinyFeatures(), is_splits=1, precision_recall=True)
    gm.update_real(x)
    gm.update_fake(x)
    keys |= {f"eval/{k}" for k in gm.compute()}
    return keys


def registry_loop(rm, x):
    """The shared evaluation loop with a stand-in tokenizer (identity reconstruction, codes from the pixels)."""
    from magvit2.metrics import reconstruct

    class Same(torch.nn.Module):
        def forward(self, x):
            codes = (x[:, 0, ::4, ::4] > 0).long() * 2 + (x[:, 1, ::4, ::4] > 0).long()
            return x, type("Q", (), {"indices": codes})()

    return reconstruct(Same(), [x[:2], x[2:]], rm)


def test_every_logged_key_has_a_row():
    keys = {**_literal_keys(), **{k: "computed" for k in _computed_keys()}}
    assert len(keys) > 40, sorted(keys)
    missing = {k: f for k, f in keys.items() if registry.get(k) is None}
    assert not missing, f"metric keys without a row in magvit2/metrics/registry.py: {missing}"
    assert {"train/loss_2", "val/acc_3", "eval/precision", "eval/n_real_features", "train/entropy_aux"} <= set(keys)


def test_rows_are_consistent():
    labels = [r.label for r in registry.ROWS]
    assert len(labels) == len(set(labels)) and len({r.key for r in registry.ROWS}) == len(registry.ROWS)
    for r in registry.ROWS:
        assert r.better in ("lower", "higher", None) and r.kind in ("claim", "count", "description", "train"), r
        assert r.percent == (r.scale == 100), r  # percent: a fraction shown x100, and said so
        assert r.seeds in ("mean", "constant", "sum") and r.table in ("", "tokenizer", "ar", "cost"), r
        assert not r.unit or r.kind == "train" or r.unit in r.label or r.key.startswith(("compute/", "sweep/")), r
        assert all(registry.get(n).kind == "count" for n in r.n), r  # N keys are counts with a noun
        assert (r.kind == "count") == bool(r.noun), r
        assert ("{k}" in r.key) == ("{k}" in r.label), r
        if "{k}" in r.key:  # a sub-token's own loss: 6 bits of k6_12 vs 18 of none, never ranked across them
            assert not r.comparable and not r.ranked, r
        if r.key.startswith("compute/"):  # costs describe a run; they are not results to rank
            assert r.kind == "description" and r.better is None, r
    from magvit2.sweep.state import KEY_METRICS
    assert all(registry.get(k).ranked for k in KEY_METRICS)
    assert all(registry.get(k).ranked for k in ("val/loss", "eval/psnr", "eval/ssim_skimage", "eval/rfid",
                                                "eval/fid", "eval/is"))
    assert not registry.get("val/loss_1").ranked and registry.get("val/loss_12").label == "val loss 12 (nats)"
    assert registry.by_label("val loss 3 (nats)").key == "val/loss_3" and registry.get("nope/x") is None
    u = registry.get("eval/utilization")
    assert (u.number(0.0118), u.text(0.0118)) == ("1.18", "1.18%")
    assert registry.n_text("eval/fid", {"eval/n_samples": 80.0, "eval/n_real": 20.0}) == "80 samples vs 20 val images"
    assert registry.n_text("eval/fid", {"eval/n_samples": 8.0}, evaluate=True) == "8 samples vs ? reference images"


def test_the_registry_imports_without_torch_pandas_or_mlflow():
    code = ("import sys; import magvit2.metrics.registry; "
            "print(sorted(m for m in ('torch', 'pandas', 'mlflow', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_labels_live_in_the_registry_only():
    """No module spells a metric's label itself: tables, plots, summaries and printouts take it from the registry."""
    # one-word labels ("precision", "LPIPS") are also the metric classes' own dict keys: the others, and old labels
    labels = {r.label for r in registry.ROWS if r.kind in ("claim", "count") and "{k}" not in r.label
              and " " in r.label} | {"SSIM (", "codebook utilization", "(in-loop"}
    for path in (REPO / "magvit2").rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 60:
                hit = [lab for lab in labels if lab == node.value or lab.endswith("(") and lab in node.value
                       or lab in ("codebook utilization", "(in-loop") and lab in node.value]
                assert not hit, (str(path.relative_to(REPO)), node.value)


def test_ssim_has_one_label_in_table_plot_summary_and_printout(tmp_path, capsys):
    from magvit2.evaluate.common import print_table
    from magvit2.results.plots import plot_curves
    from magvit2.results.tables import tokenizer_table
    from magvit2.stages.summary import format_summary
    ssim, util = registry.label("eval/ssim_skimage"), registry.label("eval/utilization")
    res = {"eval/ssim_skimage": 0.75, "eval/utilization": 0.25, "eval/n_images": 4.0, "eval/n_tokens": 64.0}
    df = pd.DataFrame([{"stage": "tokenizer", "status": "FINISHED", "choice.tokenizer": "tiny",
                        "choice.quantizer": "lfq", **res}])
    t = tokenizer_table(df)
    assert t.loc[("tiny", "lfq"), ssim] == 0.75 and t.loc[("tiny", "lfq"), util] == 25.0
    summary = format_summary("tokenizer", {"run_dir": str(tmp_path), **res}, "x")
    assert f"{ssim:32s}    0.750  (N = 4 images)" in summary and f"{util:32s}    25.00  (N = 64 tokens)" in summary
    print_table(res, ("eval/ssim_skimage", "eval/utilization"))
    out = capsys.readouterr().out
    assert re.search(rf"^{re.escape(ssim)}\s+0\.750\s+4 images$", out, re.M) and f"{ssim}: scikit-image's" in out
    assert re.search(rf"^{re.escape(util)}\s+25\.00\s+64 tokens$", out, re.M)
    hist = pd.DataFrame({"run_id": ["a", "a"], "run_name": ["tiny-lfq", "tiny-lfq"], "key": ["eval/ssim_skimage"] * 2,
                         "step": [1, 2], "value": [0.5, 0.75]})
    ax = plot_curves(hist, "eval/ssim_skimage").axes[0]
    assert ax.get_title() == ax.get_ylabel() == ssim  # the metric's name, not the last run's


@pytest.mark.parametrize("key", ["eval/utilization", "compute/mfu"])
def test_percent_rows_are_scaled_in_the_table(key):
    from magvit2.results.tables import tokenizer_table
    df = pd.DataFrame([{"stage": "tokenizer", "status": "FINISHED", "choice.tokenizer": "tiny",
                        "choice.quantizer": "lfq", key: 0.5}])
    assert tokenizer_table(df).iloc[0][registry.label(key)] == 50.0
