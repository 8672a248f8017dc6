"""Exponential moving average of a module's weights (evaluation uses the EMA weights, decay 0.999).

shadow <- decay * shadow + (1 - decay) * param after every optimizer step; buffers (e.g. BatchNorm statistics)
are copied, not averaged. With `warmup=True` the effective decay is min(decay, (1 + n) / (10 + n)) after n
updates (the LitEma schedule), so early EMAs are not dominated by the random init; off by default.

Pass the unwrapped model (accelerator.unwrap_model(...)): names are matched exactly, and a DDP/compile wrapper
adds prefixes ("module.", "_orig_mod.") that are stripped here so either form works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _clean(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p) :], True
    return name


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {_clean(n): p for n, p in model.named_parameters()}


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {_clean(n): b for n, b in model.named_buffers()}


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = {n: p.detach().clone() for n, p in _params(model).items()}
            self.buffers = {n: b.detach().clone() for n, b in _buffers(model).items()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _match(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params, buffers = _params(model), _buffers(model)
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() ^ params.keys())[:5]
            raise ValueError(f"model's parameters do not match the EMA's (first differing names: {missing}); "
                             "pass the same (unwrapped) model the EMA was built from")
        return params, buffers

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params, buffers = self._match(model)
        d = self.current_decay()
        self.num_updates += 1
        shadows, targets = [], []
        for n, p in params.items():
            s = self.shadow[n]
            if s.is_floating_point():
                shadows.append(s)
                targets.append(p.detach().to(s.dtype))
            else:
                s.copy_(p)
        if shadows:  # one multi-tensor lerp (s + (1-d)(p - s)), bit-identical to a per-tensor lerp_ loop
            torch._foreach_lerp_(shadows, targets, 1.0 - d)
        for n, b in buffers.items():
            if n in self.buffers:
                self.buffers[n].copy_(b)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params, buffers = self._match(model)
        for n, p in params.items():
            p.copy_(self.shadow[n])
        for n, b in buffers.items():
            if n in self.buffers:
                b.copy_(self.buffers[n])

    @contextlib.contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (e.g. for evaluation); the originals come back on exit,
        also on exceptions."""
        params, buffers = self._match(model)
        with torch.no_grad():
            saved_p = {n: p.detach().clone() for n, p in params.items()}
            saved_b = {n: b.detach().clone() for n, b in buffers.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved_p[n])
                for n, b in buffers.items():
                    b.copy_(saved_b[n])

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        self.buffers = {n: t.to(device) for n, t in self.buffers.items()}
        return self

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: t.clone() for n, t in self.shadow.items()},
            "buffers": {n: t.clone() for n, t in self.buffers.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state_dict's parameter names do not match this EMA's model; "
                             "load the checkpoint of the same architecture")
        self.decay = state["decay"]
        self.warmup = state.get("warmup", False)
        self.num_updates = state["num_updates"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
        for n, t in state.get("buffers", {}).items():
            if n in self.buffers:
                self.buffers[n].copy_(t)
