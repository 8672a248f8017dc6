"""The project's exceptions: a leaf every layer may import (it imports nothing from magvit2).

Each message names the setting or path at fault and what would fix it; the commands print it as one `error:` line
and exit non-zero."""


class ConfigError(ValueError):
    """A bad setting: the message names the setting and what would fix it."""


class StorageError(ConfigError):
    """The run dir cannot be written (disk full, read-only): the message names the path and the setting."""


class TrackingError(ConfigError):
    """The tracking server cannot be used as configured; the message says which setting to change."""


class Diverged(RuntimeError):
    """More non-finite losses than trainer.<stage>.max_nonfinite_steps allows: the run ends `diverged`."""
