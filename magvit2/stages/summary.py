"""The few lines a person reads when a run ends: headline metrics, where things are, how to look at them."""
from __future__ import annotations

import os
from pathlib import Path

from magvit2.runs import RunDir

# (key, label, format, what N counts). "SSIM" is the reference's (scikit-image, 7x7 uniform window); the Gaussian
# one is labelled as such. The FID is the in-loop one (samples vs val images), not the paper's 50k gFID protocol.
_KEYS = [("eval/psnr", "PSNR", ".2f", "img"), ("eval/ssim_skimage", "SSIM", ".3f", "img"),
         ("eval/ssim", "SSIM (Gaussian 11x11)", ".3f", "img"), ("eval/lpips", "LPIPS", ".3f", "img"),
         ("eval/rfid", "rFID", ".2f", "img"), ("eval/utilization", "codebook utilization", ".2%", "tok"),
         ("eval/perplexity", "code perplexity", ".0f", "tok"),
         ("val/loss", "val loss (sum over sub-tokens)", ".3f", "val"),
         ("eval/fid", "FID (in-loop)", ".2f", "fid"), ("eval/is", "IS", ".2f", "gen")]
_N = {"val": [("val/n_images", "images")], "img": [("eval/n_images", "images")],
      "tok": [("eval/n_tokens", "tokens")],
      "gen": [("eval/n_samples", "samples")], "fid": [("eval/n_samples", "samples"), ("eval/n_real", "val images")]}


def _n_text(res: dict, what: str | None) -> str:
    """"N = 64 images" (or "N = 80 samples vs 64 val images") from the N keys logged with the metrics."""
    if what is None:
        return ""
    parts = [f"{res[k]:,.0f} {unit}" if isinstance(res.get(k), (int, float)) else f"? {unit}" for k, unit in _N[what]]
    return "  (N = " + " vs ".join(parts) + ")"


def _metric_lines(res: dict) -> list[str]:
    return [f"   {name:32s} {format(res[k], fmt):>8s}{_n_text(res, what)}" for k, name, fmt, what in _KEYS
            if isinstance(res.get(k), (int, float))]


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
