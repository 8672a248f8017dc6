"""The commands as a user meets them: `python -m magvit2.train --help` (the app's own help), `--info` (each launcher
once), the console scripts magvit2-{train,sweep,report,sample,bench,convert,evaluate} with bash tab completion, and the ablation
report notebook executed through nbclient as Jupyter would run it (`pip install -e .[notebook]`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent
SCRIPTS = {"magvit2-train": "magvit2.train", "magvit2-sweep": "magvit2.sweep", "magvit2-report": "magvit2.report",
           "magvit2-sample": "magvit2.sample", "magvit2-bench": "magvit2.bench",
           "magvit2-convert": "magvit2.convert", "magvit2-evaluate": "magvit2.evaluate"}


def _run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    e.pop("MAGVIT2_ROOT", None)
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=180)


def test_train_help_names_stages_groups_commands_and_outputs(tmp_path):
    p = _run([sys.executable, "-m", "magvit2.train", "--help"], tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "Powered by Hydra" not in out and "is powered by Hydra" not in out  # not the stock text
    assert "Stages (stage=...)" in out and re.search(r"^\s+ar\s+\(default\)", out, re.M)
    assert re.search(r"^\s+tokenizer\s+train the tokenizer only", out, re.M)
    groups = dict(line.split(": ", 1) for line in out.split("== Config groups (group=option) ==")[1]
                  .split("== Commands ==")[0].strip().splitlines())
    for group in ("tokenizer", "quantizer", "factorization", "model", "data", "tokens", "trainer", "sampling"):
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert groups[group].split(", ") == options, (group, groups.get(group))
    assert "hydra/launcher" not in groups  # Hydra's own groups: --hydra-help
    for cmd in ("python -m magvit2.train -m factorization=k6_12,k9_9 model=B,L,XL dry_run=true",
                "python -m magvit2.sweep status <sweep id>", "python -m magvit2.report --sweep <sweep id>"):
        assert cmd in out
    ablations = out.split("== Ready ablations")[1].split("== Where results go ==")[0]
    for f in (REPO / "experiments" / "experiment").glob("*.yaml"):  # every experiment is listed, with a line
        assert re.search(rf"^\s+{f.stem}\s+\S", ablations, re.M), f.stem
    for name in ("scale=tiny", "scale=full", "stand_B", "stand_L", "stand_XL", "debug=quick"):
        assert name in ablations, name
    assert "<paths.root>/runs/<stage>/<signature>" in out and "$MLFLOW_TRACKING_URI" in out
    assert "default ./outputs (or $MAGVIT2_ROOT)" in out
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_info_lists_each_launcher_and_sweeper_once(tmp_path):
    p = _run([sys.executable, "-m", "magvit2.train", "--info", "plugins"], tmp_path)
    assert p.returncode == 0, p.stderr
    sections = re.findall(r"^\t(\w+):\n\t-+\n((?:\t\t\w+\n)+)", p.stdout, re.M)
    names = {kind: body.split() for kind, body in sections}
    assert {"Launcher", "Sweeper"} <= names.keys(), p.stdout
    for kind in ("Launcher", "Sweeper"):
        assert len(names[kind]) == len(set(names[kind])), (kind, names[kind])
    assert {"Magvit2SlurmLauncher", "Magvit2LocalLauncher"} <= set(names["Launcher"])
    assert "Magvit2Sweeper" in names["Sweeper"]


def test_console_scripts_are_declared_and_installed():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(meta["scripts"]) == set(SCRIPTS)
    assert "jupyterlab>=4" in meta["optional-dependencies"]["notebook"]
    assert "magvit2[report]" in meta["optional-dependencies"]["notebook"]
    assert "jupytext" in " ".join(meta["optional-dependencies"]["report"])  # the notebook stack: an extra
    ci = (REPO / ".ci" / "requirements.txt").read_text().lower()
    assert "jupyterlab" not in ci and not re.search(r"^notebook\b", ci, re.M)  # CI runs offline, headless
    for name in SCRIPTS:
        assert (BIN / name).exists(), f"{name} not installed: run .venv/bin/pip install -q --no-deps -e ."


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help(script, tmp_path):
    p = _run([str(BIN / script), "--help"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    if script == "magvit2-train":
        assert "Stages (stage=...)" in p.stdout
    else:
        assert p.stdout.startswith("usage: ") and "--help" in p.stdout
    if script == "magvit2-sweep":
        assert "status" in p.stdout


def test_train_script_composes_like_the_module(tmp_path):
    a = _run([str(BIN / "magvit2-train"), "--cfg", "job", "model=B"], tmp_path)
    b = _run([sys.executable, "-m", "magvit2.train", "--cfg", "job", "model=B"], tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "stage: ar" in a.stdout and "dim: 1024" in a.stdout
    bad = _run([str(BIN / "magvit2-train"), "factorization=k9_9", "tokenizer.bits=16"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr[-2000:]


def test_bash_tab_completion_of_the_train_script(tmp_path):
    """The README's `eval "$(magvit2-train --shell-completion install=bash)"`, then what bash asks on <TAB>."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    script = ('eval "$(magvit2-train --shell-completion install=bash)" && complete -p magvit2-train && '
              'COMP_LINE="magvit2-train factoriz" COMP_POINT=22 COMP_WORDS=(magvit2-train factoriz) COMP_CWORD=1 '
              'hydra_bash_completion && printf "%s\\n" "${COMPREPLY[@]}"')
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "-F hydra_bash_completion magvit2-train" in p.stdout
    assert "factorization=" in p.stdout.split()
    q = subprocess.run(["bash", "-c", "COMP_LINE='magvit2-train factorization=k' magvit2-train -sc query=bash"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert {"factorization=k6_12", "factorization=k9_9"} <= set(q.stdout.split()), q.stdout + q.stderr


@pytest.mark.slow
def test_report_notebook_opens_and_runs_through_nbclient(tmp_path, monkeypatch):
    """analysis/ablation_report.py as Jupyter + jupytext opens it, run cell by cell by nbclient on a kernel of this
    Python, with its parameters cell filled as papermill would (a synthetic 2-tokenizer store; no papermill)."""
    import jupytext
    import nbformat
    from mlflow_server import fresh_sqlite
    from nbclient import NotebookClient

    from magvit2 import tracking

    root = tmp_path / "outputs"
    uri = fresh_sqlite(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for q, psnr in (("lfq", 21.5), ("vq", 19.25)):
        m = tracking.MemberRun("magvit2-tokenizer", str(root), "tokenizer", f"tok-{q}", f"tiny-{q}", {}, "nb")
        m.log_params(tracking.flatten({"choice": {"tokenizer": "tiny", "quantizer": q}, "quantizer": {"K": 18}}))
        for s in range(3):
            m.log_metrics({"eval/utilization": 1.0 / (s + 1), "train/loss": 1.0 / (s + 1)}, step=10 * s)
        m.log_metrics({"eval/psnr": psnr, "eval/ssim_skimage": 0.5, "eval/n_images": 8.0}, step=20)
        m.log_missing("eval/rfid", "no Inception weights (test)")
        m.end()

    nb = jupytext.read(REPO / "analysis" / "ablation_report.py")
    (i,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    out = tmp_path / "report"
    params = f"sweep = 'nb'\nexperiment = None\ntracking_uri = {uri!r}\nout_dir = {str(out)!r}\n"
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(params, metadata={"tags": ["injected-parameters"]}))
    kernels = tmp_path / "jupyter" / "kernels" / "magvit2-test"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "magvit2 test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    NotebookClient(nb, kernel_name="magvit2-test", timeout=600,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "2 runs from " in text and sys.executable in text  # the kernel is this very Python
    assert (out / "tables.md").exists() and "21.5" in (out / "tables.md").read_text()
    assert list(out.glob("*.png"))
