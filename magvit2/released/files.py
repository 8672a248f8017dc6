"""Reading and writing the original's (Open-MAGVIT2, PyTorch Lightning) checkpoint files, as data only.

A Lightning .ckpt holds {"state_dict": ..., "epoch", "global_step", "optimizer_states", "hyper_parameters", ...}.
Its tensors load with torch.load(weights_only=True) only when everything else in it is plain data; the released
files may also pickle objects of Lightning, jsonargparse or numpy. Those are read by an unpickler that builds
tensors and plain containers and turns every other object into an inert placeholder: nothing in the file runs.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from magvit2 import checkpoint
from magvit2.errors import ConfigError
from magvit2.runs import atomic_write

# Keys that only the original's files have: a tokenizer (VQModel) or an AR model (Net2NetTransformer).
TOKENIZER_MARK = "encoder.conv_in.weight"
AR_MARK = "transformer.class_emb.embedding_table.weight"


class Opaque:
    """Stands in for any pickled object that is not a tensor or plain data; it keeps nothing and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# torch's tensor rebuilders, by name: none of them calls an argument (unlike _rebuild_from_type*, which would)
_REBUILD = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")


def _allowed(module: str, name: str):
    if module == "torch._utils" and name in _REBUILD:
        return getattr(torch._utils, name)
    if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                          ("builtins", "slice"), ("torch", "device")}:
        return {"OrderedDict": __import__("collections").OrderedDict, "set": set, "frozenset": frozenset,
                "slice": slice, "device": torch.device}[name]
    return None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _allowed(module, name)
        return obj if obj is not None else type(f"Opaque[{module}.{name}]", (Opaque,), {})


class _DataOnly:  # a pickle_module for torch.load: its Unpickler builds no object but tensors and plain data
    Unpickler = _Unpickler
    load = pickle.load  # never used by torch.load's zip path, present for its interface check


def read(path, setting: str) -> dict:
    """The file's state_dict (str -> tensor), or a ConfigError naming `setting` and why the file is unusable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{setting}: {path} not found; give the path of a released Open-MAGVIT2 .ckpt "
                          f"(imagenet_256_L.ckpt, imagenet_128_L.ckpt, AR_256_B.ckpt, ...)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:  # objects besides tensors: read again, building none of them.
                # weights_only=False only hands unpickling to _DataOnly, whose find_class resolves nothing but
                # tensor rebuilders and plain containers: any other global becomes an inert Opaque, so no code runs
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_DataOnly)
    except Exception as e:  # noqa: BLE001 - any reason a file does not read is reported the same way
        raise ConfigError(f"{setting}: {path} is not a readable torch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{setting}: {path} is not an Open-MAGVIT2 Lightning checkpoint (no 'state_dict' of "
                          f"tensors); a magvit2 run's checkpoint.pt or run dir goes to the same setting as is")
    checkpoint.check_finite(sd, f"{setting}: {path}")
    return sd


def kind(sd: dict) -> str | None:
    """'ar', 'tokenizer' or None (not one of the original's files)."""
    if AR_MARK in sd:
        return "ar"
    if TOKENIZER_MARK in sd:
        return "tokenizer"
    return None


def write(path, state_dict: dict, extra: dict | None = None) -> None:
    """Write {"state_dict": ...} (plus Lightning's bookkeeping keys in `extra`) atomically, loadable by the
    original's `torch.load(path)["state_dict"]`."""
    obj = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, **(extra or {})}
    atomic_write(Path(path), lambda f: torch.save(obj, f), mode="wb")
