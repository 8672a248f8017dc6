"""`python -m magvit2.train [overrides]` / `-m` sweeps. See conf/config.yaml for what runs by default."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from magvit2 import config as C
from magvit2.resources import conf_dir, experiments_dir  # checkout folders, else the wheel's copies
from magvit2.sweep import launchers, sweeper  # noqa: F401  (config nodes hydra/sweeper=magvit2, hydra/launcher=...)

import hydra_plugins.magvit2 as _plugins

_plugins.register()

log = logging.getLogger("magvit2")

_EXPERIMENTS = experiments_dir()
if not OmegaConf.has_resolver("magvit2_experiments"):
    OmegaConf.register_new_resolver("magvit2_experiments", lambda: str(_EXPERIMENTS))


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    started = None
    try:
        C.absolute_data_path(cfg)  # relative to the launching cwd, before any signature
        C.validate(cfg)
        if cfg.dry_run:
            from magvit2.sweep import state
            print(state.format_members([state.describe_member(cfg, [])], title="dry run: nothing trained"))
            return None
        from magvit2.stages.pipeline import run
        started = True
        result = run(cfg)
    except C.ConfigError as e:  # in a stage (an unreadable image): after its progress bar's line
        print(f"{'' if started is None else chr(10)}error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from magvit2.errors import Diverged
        from magvit2.runs import storage_error
        if isinstance(e, OSError) and storage_error(e, e.filename or cfg.paths.root) is not e:
            print(f"\nerror: {storage_error(e, e.filename or cfg.paths.root)}", file=sys.stderr)  # disk full, ro
            sys.exit(2)
        if not isinstance(e, Diverged):
            raise
        print(f"\nerror: {e}", file=sys.stderr)  # after the progress bar's line
        sys.exit(1)
    from magvit2.stages.summary import print_summary
    print_summary(cfg, result)
    return result


def check_root_writable(argv: list[str]) -> str | None:
    """Before Hydra writes its run dir under paths.root: one line if that root cannot be written (a read-only mount),
    else None. paths.root as the command sets it: the last `paths.root=` override, else MAGVIT2_ROOT, else ./outputs."""
    import os
    from pathlib import Path
    if any(a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--resolve", "--shell-completion")
           or a.startswith(("--cfg=", "--info=")) for a in argv):
        return None
    roots = [a.split("=", 1)[1] for a in argv if a.startswith(("paths.root=", "++paths.root=", "+paths.root="))]
    root = Path(roots[-1] if roots else os.environ.get("MAGVIT2_ROOT") or "outputs").expanduser().absolute()
    d = root
    while not d.exists() and d != d.parent:
        d = d.parent
    if os.access(d, os.W_OK):
        return None
    setting = "paths.root" if roots else ("MAGVIT2_ROOT (paths.root)" if os.environ.get("MAGVIT2_ROOT") else
                                          "paths.root (default ./outputs)")
    return (f"error: {setting}={root} cannot be written ({d} is read-only): training writes run dirs, logs and the "
            f"MLflow store there; set paths.root (or MAGVIT2_ROOT) to a writable folder. Finished runs there can "
            f"still be read (python -m magvit2.sweep status --root {root}, magvit2.runs.RunDir)")


def cli() -> None:
    """Console script `magvit2-train` ([project.scripts]): exactly `python -m magvit2.train` (Hydra reads sys.argv)."""
    msg = check_root_writable(sys.argv[1:])
    if msg:
        print(msg, file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
