"""The OmegaConf resolvers conf/ uses (`${eval_pow2:...}`, `${epochs_to_steps:...}`); registered on import."""
from __future__ import annotations

from omegaconf import ListConfig, OmegaConf


def _pow2(k) -> int:
    return 2 ** int(k)


def _epochs_to_steps(epochs, images, batch):
    """Optimizer steps of `epochs` (a number or a list) with ceil(images / batch) steps per epoch (Lightning's count
    with a padding DistributedSampler and drop_last off, as in the original's runs)."""
    per_epoch = -(-int(images) // int(batch))
    if isinstance(epochs, (list, tuple, ListConfig)):
        return ListConfig([int(round(float(e) * per_epoch)) for e in epochs])
    return int(round(float(epochs) * per_epoch))


for _name, _fn in (("eval_pow2", _pow2), ("epochs_to_steps", _epochs_to_steps)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
