"""Checkpoints as one safetensors file: tensors by flattened key, everything else as JSON metadata.

Nested dicts/lists (model parameters, optimizer states, RNG states, counters) are flattened to keys
like ``stage.optim.means.state.0.exp_avg``; non-tensor leaves go to the ``__state__`` JSON in the
file's metadata. Writes are atomic (temp file + rename) and loading never unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io.atomic import atomic_path

_T = "__tensor__"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_T: key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}" if prefix else str(i), tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _T in obj:
            return tensors[obj[_T]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Atomically write ``state`` (nested dict of tensors / JSON-able values) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    # safetensors refuses tensors that share memory; clone views.
    tensors = {k: v.clone() if v.storage_offset() or not v.is_contiguous() else v for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"__state__": json.dumps(tree)})
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint '{p}' not found; start without --resume or point to a run folder")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if "__state__" not in meta:
        raise ValueError(f"'{p}' is not a studio checkpoint (no __state__ metadata)")
    tensors = load_file(str(p), device=str(map_location))
    return _unflatten(json.loads(meta["__state__"]), tensors)
