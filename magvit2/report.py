"""`python -m magvit2.report --sweep ID | --experiment NAME [--out DIR] [--tracking-uri URI]`

Runs the jupytext notebook analysis/ablation_report.py headless (papermill, on a kernel of this very Python) and
writes report.ipynb, report.html, report.md (tables + plot links) and the PNGs into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from magvit2.resources import report_notebook

NOTEBOOK = report_notebook()  # analysis/ablation_report.py in a checkout, else the copy inside the wheel
KERNEL = "magvit2-report"


def _private_kernel(tmp: Path) -> str:
    """A kernelspec that starts ipykernel with sys.executable, found through JUPYTER_PATH: no global Jupyter
    install is needed, and a user's own `python3` kernel (maybe another interpreter) cannot be picked up."""
    d = tmp / "kernels" / KERNEL
    d.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"magvit2 ({sys.executable})", "language": "python"}
    (d / "kernel.json").write_text(json.dumps(spec))
    return KERNEL


def _known_sweeps(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    from magvit2 import tracking

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, f"tags.`{tracking.KIND}` = 'sweep'", max_results=50) if ids else []
    return sorted({r.data.tags.get(tracking.SWEEP_ID, "") for r in runs})


def _root() -> Path:
    """The folder train and `sweep status` use: MAGVIT2_ROOT, else ./outputs."""
    return Path(os.environ.get("MAGVIT2_ROOT") or "outputs")


def store_uri(tracking_uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<MAGVIT2_ROOT or ./outputs>/mlflow.db (train's
    store). A sqlite store must exist already: reading one never creates an empty database. Raises LookupError."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        how = "--tracking-uri"
    elif uri:
        how = "MLFLOW_TRACKING_URI"
    else:
        root = _root()
        how = (f"MAGVIT2_ROOT={os.environ['MAGVIT2_ROOT']}" if os.environ.get("MAGVIT2_ROOT")
               else "./outputs (MAGVIT2_ROOT is not set)")
        uri = "sqlite:///" + str(root.expanduser().resolve() / "mlflow.db")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
        if not db.is_file():
            raise LookupError(f"no MLflow store at {db} (from {how}): set MAGVIT2_ROOT to the paths.root of your "
                              f"runs, or pass --tracking-uri (or MLFLOW_TRACKING_URI) naming the store")
    return uri


def build(sweep: str | None, experiment: str | None, out: Path, tracking_uri: str | None = None,
          notebook: Path = NOTEBOOK) -> Path:
    """Execute the notebook into `out`; returns the path of report.md. Raises LookupError if no runs match."""
    uri = store_uri(tracking_uri)  # before the heavy imports
    try:  # the `report` extra: a training node installs magvit2 without it
        import jupytext
        import nbformat
        import papermill
        from nbconvert import HTMLExporter
    except ImportError as e:
        raise LookupError(f"the report needs the notebook stack ({e.name} is not installed): "
                          f"pip install 'magvit2[report]'") from e

    from magvit2.results import load_runs

    try:  # fail fast, before starting a kernel
        df = load_runs(sweep=sweep, experiment=experiment, tracking_uri=uri)
    except ValueError as exc:
        raise LookupError(str(exc)) from exc
    if df.empty:
        raise LookupError(f"no member runs match sweep={sweep!r} experiment={experiment!r} in {uri} "
                          f"(sweeps there: {_known_sweeps(uri) or 'none'})")
    if not notebook.exists():
        raise FileNotFoundError(f"notebook {notebook} not found: run from a checkout of the repository, or --notebook")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    old_path = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="magvit2-report-") as tmp:
        src = Path(tmp) / "ablation_report.ipynb"
        nb = jupytext.read(notebook)
        kernel = _private_kernel(Path(tmp))
        nb.metadata["kernelspec"] = {"name": kernel, "language": "python", "display_name": "magvit2"}
        jupytext.write(nb, src)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (tmp, old_path) if p)  # our spec is found first
        try:
            papermill.execute_notebook(
                str(src), str(out / "report.ipynb"), kernel_name=kernel, language="python", cwd=str(out),
                parameters={"sweep": sweep, "experiment": experiment, "tracking_uri": uri, "out_dir": str(out)},
                progress_bar=False, execution_timeout=1200)
        finally:
            if old_path is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old_path
    nb = nbformat.read(out / "report.ipynb", as_version=4)
    html, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    (out / "report.html").write_text(html)
    title = f"sweep {sweep}" if sweep else f"experiment {experiment}"
    pngs = sorted(out.glob("*.png"))
    tables = (out / "tables.md").read_text() if (out / "tables.md").exists() else "(no tables)\n"
    notes = (out / "notes.md").read_text() if (out / "notes.md").exists() else ""  # metrics no run logged
    md = [f"# magvit2 ablation report: {title}", "",
          f"{len(df)} runs from `{uri}`, generated {time.strftime('%Y-%m-%d %H:%M:%S')}. "
          "Full notebook: [report.html](report.html), [report.ipynb](report.ipynb).", "",
          "## Tables", "", tables, "## Plots", ""] + (["Not plotted:", "", notes] if notes else [])
    md += [f"![{p.stem}]({p.name})\n" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magvit2.report", description=__doc__.split("\n\n")[1])
    ap.add_argument("--sweep", help="sweep id (tag magvit2.sweep_id of the runs)")
    ap.add_argument("--experiment", help="MLflow experiment name, e.g. magvit2-ar (all its member runs)")
    ap.add_argument("--out", type=Path, help="output folder (default <root>/reports/<sweep or experiment>; root: "
                                              "$MAGVIT2_ROOT, else ./outputs)")
    ap.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)")
    ap.add_argument("--notebook", type=Path, default=NOTEBOOK, help="jupytext notebook to execute")
    args = ap.parse_args(argv)
    if not args.sweep and not args.experiment:
        ap.error("pass --sweep ID or --experiment NAME")
    out = args.out or _root() / "reports" / (args.sweep or args.experiment)
    t0 = time.monotonic()
    try:
        md = build(args.sweep, args.experiment, out, args.tracking_uri, args.notebook)
    except (LookupError, FileNotFoundError) as exc:
        print(f"magvit2.report: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # papermill: a cell failed; the partial notebook is in --out
        if type(exc).__name__ != "PapermillExecutionError":
            raise
        print(f"magvit2.report: error: the notebook failed: {exc.ename}: {exc.evalue}\n"
              f"  see {out / 'report.ipynb'}", file=sys.stderr)
        return 1
    print(f"magvit2.report: wrote {md} (+ report.html, report.ipynb, PNGs) in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
