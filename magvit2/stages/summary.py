"""The few lines a person reads when a run ends: headline metrics, where things are, how to look at them."""
from __future__ import annotations

import os
from pathlib import Path

_KEYS = [("eval/psnr", "PSNR", ".2f"), ("eval/ssim", "SSIM", ".3f"), ("eval/lpips", "LPIPS", ".3f"),
         ("eval/rfid", "rFID", ".2f"), ("eval/utilization", "codebook utilization", ".2%"),
         ("eval/perplexity", "code perplexity", ".0f"), ("val/loss", "val loss (sum over sub-tokens)", ".3f"),
         ("eval/fid", "FID", ".2f"), ("eval/is", "IS", ".2f")]


def format_summary(stage: str, result: dict, tracking_uri: str) -> str:
    lines = []
    if isinstance(result.get("tokenizer"), dict):  # an AR run: its tokenizer's numbers first
        tok = result["tokenizer"]
        lines += [f"== tokenizer: {Path(tok.get('run_dir', '?')).parent}"]
        lines += [f"   {name:32s} {format(tok[k], fmt)}" for k, name, fmt in _KEYS if isinstance(tok.get(k), (int, float))]
        if (Path(tok.get("run_dir", "?")).parent / "recon_grid.png").exists():
            lines.append(f"   {'recon_grid.png':32s} {Path(tok['run_dir']).parent / 'recon_grid.png'}")
    lines.append(f"== magvit2 {stage} run: {result.get('run_dir', '?')}")
    for k, name, fmt in _KEYS:
        if isinstance(result.get(k), (int, float)):
            lines.append(f"   {name:32s} {format(result[k], fmt)}")
    rd = Path(result.get("run_dir", "."))
    for f in ("recon_grid.png", "samples.png", "samples.npz"):
        if (rd / f).exists():
            lines.append(f"   {f:32s} {rd / f}")
    if os.path.exists(rd / "status.json"):
        lines.append(f"   {'status / missing metrics':32s} {rd / 'status.json'}, MLflow tags magvit2.missing.*")
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
