"""What both evaluations share: flags, output folders, the results file, the printed table and the MLflow run."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from magvit2.metrics import protocol, registry
from magvit2.metrics.missing import Missing

EXPERIMENT = "magvit2-evaluate"


def add_common_args(ap) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: <root>/evaluate/<kind>/<name>-<hash of the settings>)")
    ap.add_argument("--root", type=Path, default=None, help="default MAGVIT2_ROOT, else ./outputs: the default --out "
                    "and the sqlite MLflow store (MLFLOW_TRACKING_URI wins)")
    ap.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers reading images (default 4)")
    ap.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (rFID, FID, IS); "
                    "default: torch hub's cache, else a download")
    ap.add_argument("--protocol", default=protocol.DEFAULT, choices=tuple(protocol.PROTOCOLS),
                    help="how images become numbers: reference (default: the original's evaluation arithmetic: "
                         "uint8-truncated PSNR / SSIM and samples, pytorch-fid's rFID input, LPIPS Alex + VGG) or "
                         "precise (the floats, torch-fidelity's uint8 rFID input, rounding); metrics/protocol.py")
    ap.add_argument("--no-download", action="store_true", help="never download weights: a missing file makes its "
                    "metric missing (reported, never a number from random weights)")


def check_weight_files(a) -> None:
    from magvit2.errors import ConfigError
    for flag in ("inception_weights", "vgg16_weights", "alexnet_weights"):
        path = getattr(a, flag, None)
        if path is not None and not Path(path).expanduser().is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file; point it at the downloaded weights "
                              f"or leave it out (torch hub's cache, else a download)")


def root_of(a) -> Path:
    return Path(a.root or os.environ.get("MAGVIT2_ROOT") or "outputs").expanduser().resolve()


def out_dir(a, kind: str, name: str, settings: dict) -> Path:
    if a.out is not None:
        return a.out.expanduser().resolve()
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return root_of(a) / "evaluate" / kind / f"{name}-{h}"


def split_missing(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """({key: value}, {key: why missing})."""
    vals = {k: float(v) for k, v in metrics.items() if not isinstance(v, Missing)}
    return vals, {k: v.reason for k, v in metrics.items() if isinstance(v, Missing)}


_FLAGS = {"metrics.inception_weights": "--inception-weights", "metrics.vgg16_weights": "--vgg16-weights",
          "metrics.alexnet_weights": "--alexnet-weights", "metrics.download=false": "--no-download"}  # the reasons name the config settings these flags set


def print_table(metrics: dict, keys: tuple[str, ...]) -> None:
    """The `keys` of `metrics` (value or Missing) with their N, as magvit2.metrics.registry names and formats them;
    under the table what a label alone does not say, and why a metric is missing."""
    from tabulate import tabulate
    rows = [(registry.get(k, evaluate=True), metrics[k]) for k in keys if k in metrics]
    print(tabulate([(r.label, "missing" if isinstance(v, Missing) else r.number(v),
                     registry.n_text(r.key, metrics, evaluate=True)) for r, v in rows],
                   headers=("metric", "value", "N"), tablefmt="simple", disable_numparse=True))
    for r, v in rows:
        if r.note:
            print(f"{r.label}: {r.note}")
    for r, v in rows:
        if isinstance(v, Missing):
            why = v.reason
            for setting, flag in _FLAGS.items():
                why = why.replace(setting, flag)
            print(f"{r.label} missing: {why}")


def log_run(a, stage: str, src, params: dict, metrics: dict, tags: dict, artifacts: list[Path]) -> str:
    """One finished MLflow run (experiment --experiment) for this evaluation; -> its run id."""
    from magvit2 import tracking
    vals, missing = split_missing(metrics)
    tags = {tracking.CHECKPOINT: str(src.path), tracking.REFERENCE: str(src.reference).lower(), **tags}
    with tracking.MemberRun(a.experiment, str(root_of(a)), stage, src.name, f"evaluate-{stage}-{src.name}", tags,
                            sweep_id=None) as run:
        run.log_params(tracking.flatten(params))
        run.log_metrics(vals, step=int(src.step or 0))
        for k, why in missing.items():
            run.log_missing(k, why)
        for p in artifacts:
            run.log_artifact(str(p))
    return run.run_id


def finish(a, stage: str, src, out: Path, params: dict, metrics: dict, tags: dict, artifacts: list[Path],
           shown: tuple[str, ...]) -> dict:
    """results.json in `out`, the MLflow run, the table of the `shown` keys; -> the results."""
    from magvit2.runs import atomic_write_text
    vals, missing = split_missing(metrics)
    run_id = log_run(a, stage, src, params, metrics, tags, artifacts)
    res = {"source": str(src.path), "reference": src.reference, "settings": params, "metrics": vals,
           "missing": missing, "mlflow_run_id": run_id}
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=str))
    print_table(metrics, shown)
    print(f"results: {out / 'results.json'} (MLflow run {run_id}, experiment {a.experiment})")
    return res
