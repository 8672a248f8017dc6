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
    try:
        C.validate(cfg)
        if cfg.dry_run:
            from magvit2.sweep import state
            print(state.format_members([state.describe_member(cfg, [])], title="dry run: nothing trained"))
            return None
        from magvit2.stages.pipeline import run
        result = run(cfg)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from magvit2.runtime.context import Diverged
        if not isinstance(e, Diverged):
            raise
        print(f"\nerror: {e}", file=sys.stderr)  # after the progress bar's line
        sys.exit(1)
    from magvit2.stages.summary import print_summary
    print_summary(cfg, result)
    return result


if __name__ == "__main__":
    main()
