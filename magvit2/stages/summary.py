"""The few lines a person reads when a run ends: headline metrics, where things are, how to look at them."""
from __future__ import annotations

import os
from pathlib import Path

from magvit2.metrics import registry
from magvit2.runs import RunDir

# the headline metrics, in this order (labels, formats and N: magvit2.metrics.registry)
_KEYS = ("eval/psnr", "eval/ssim_skimage", "eval/ssim", "eval/lpips", "eval/rfid", "eval/utilization",
         "eval/perplexity", "val/loss", "eval/fid", "eval/is")


def _metric_lines(res: dict) -> list[str]:
    """'   PSNR (dB)   24.50  (N = 64 images)' per headline metric the run logged."""
    lines = []
    for k in _KEYS:
        if isinstance(res.get(k), (int, float)):
            m, n = registry.get(k), registry.n_text(k, res)
            lines.append(f"   {m.label:32s} {m.number(res[k]):>8s}" + (f"  (N = {n})" if n else ""))
    return lines


def format_summary(stage: str, result: dict, tracking_uri: str) -> str:
    lines = []
    if isinstance(result.get("tokenizer"), dict):  # an AR run: its tokenizer's numbers first
        tok = result["tokenizer"]
        lines += [f"== tokenizer: {Path(tok.get('run_dir', '?')).parent}"]
        lines += _metric_lines(tok)
        if (Path(tok.get("run_dir", "?")).parent / "recon_grid.png").exists():
            lines.append(f"   {'recon_grid.png':32s} {Path(tok['run_dir']).parent / 'recon_grid.png'}")
    lines.append(f"== magvit2 {stage} run: {result.get('run_dir', '?')}")
    lines += _metric_lines(result)
    rd = Path(result.get("run_dir", "."))
    for f in ("recon_grid.png", "samples.png", "samples.npz"):
        if (rd / f).exists():
            lines.append(f"   {f:32s} {rd / f}")
    if RunDir(rd).status.exists():
        lines.append(f"   {'status / missing metrics':32s} {RunDir(rd).status}, MLflow tags magvit2.missing.*")
    lines.append(f"   MLflow store: {tracking_uri}")
    if tracking_uri.startswith("sqlite"):
        lines.append(f"   open the UI:  mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)")
    else:
        lines.append(f"   open the UI:  {tracking_uri}")
    return "\n".join(lines)


def print_summary(cfg, result) -> None:
    if not isinstance(result, dict) or int(os.environ.get("RANK", "0")) != 0:
        return
    from magvit2 import tracking
    print(format_summary(cfg.stage, result, tracking.tracking_uri(str(cfg.paths.root), cfg.tracking.uri)), flush=True)
