"""Where the config tree (conf/), the ready experiments (experiments/) and the report notebook
(analysis/ablation_report.py) are. One copy lives in the repository's top-level folders; a wheel ships them inside
the package as magvit2/_conf, magvit2/_experiments, magvit2/_analysis (pyproject.toml: package-dir/package-data).

From a checkout (an editable install, or `python -m` in the repo) the checkout's folders win, so edits to them take
effect at once; otherwise the packaged copies are used.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _find(top: str, packaged: str, probe: str) -> Path:
    here = _CHECKOUT / top
    if (_CHECKOUT / "pyproject.toml").is_file() and (here / probe).exists():
        return here
    # installed from a wheel: a plain folder in site-packages (wheels install unzipped)
    res = resources.files("magvit2") / packaged
    path = Path(str(res))
    if not (path / probe).exists():
        raise FileNotFoundError(f"magvit2: neither {here} nor the packaged {path} holds {probe}: broken install?")
    return path


def conf_dir() -> Path:
    """The Hydra config tree (config.yaml and its groups)."""
    return _find("conf", "_conf", "config.yaml")


def experiments_dir() -> Path:
    """The folder put on Hydra's searchpath: it holds experiment/*.yaml (`+experiment=NAME`)."""
    return _find("experiments", "_experiments", "experiment")


def report_notebook() -> Path:
    """The jupytext notebook magvit2.report executes."""
    return _find("analysis", "_analysis", "ablation_report.py") / "ablation_report.py"
