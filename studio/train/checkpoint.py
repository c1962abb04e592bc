"""Checkpoints as one safetensors file: tensors by flattened key, everything else as JSON metadata.

Nested dicts/lists (model parameters, optimizer states, RNG states, counters) are flattened to keys
like ``stage.optim.means.state.0.exp_avg``; non-tensor leaves go to the ``__state__`` JSON in the
file's metadata. Writes are atomic (temp file + rename) and loading never unpickles.

A file that is not a complete studio checkpoint (truncated by a full disk or an interrupted copy, zeroed,
another format) raises :class:`CorruptCheckpoint` (a ``UserError``) naming the file and the fix, never the
safetensors parser's bare message. :func:`checkpoint_ok` is the cheap test (header and size only) used
before a good checkpoint is rotated to ``previous.safetensors``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io.atomic import atomic_path

_T = "__tensor__"


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be read back (truncated, zeroed, not a studio checkpoint)."""

    def __init__(self, path: str | os.PathLike, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{self.reason_text()}; it was probably cut short by a crash, a full disk or an interrupted "
                         "copy. Delete it (on --resume a previous good checkpoint next to it, if any, is used) or "
                         "start the run again without --resume")

    def reason_text(self) -> str:
        return f"checkpoint '{self.path}' is corrupt or incomplete ({self.why})"


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


def _header(p: Path) -> dict:
    """The safetensors JSON header of ``p``, checked against the file size (raises ``CorruptCheckpoint``)."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint(p, f"only {size} bytes")
        n = struct.unpack("<Q", head)[0]
        if n == 0 or 8 + n > size:
            raise CorruptCheckpoint(p, f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise CorruptCheckpoint(p, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(p, "the header is not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CorruptCheckpoint(p, f"tensor entry {k!r} of the header is malformed") from None
    if 8 + n + end != size:
        raise CorruptCheckpoint(p, f"the tensors need {8 + n + end} bytes but the file has {size}")
    return header


def checkpoint_ok(path: str | Path) -> bool:
    """Whether ``path`` is a complete studio checkpoint, judged from its header and size (no tensor is read)."""
    p = Path(path)
    try:
        return p.is_file() and "__state__" in (_header(p).get("__metadata__") or {})
    except (OSError, CorruptCheckpoint):
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`. Raises ``FileNotFoundError`` when it is missing and
    :class:`CorruptCheckpoint` (naming the file and the fix) when it is truncated or not a studio checkpoint."""
    from safetensors import SafetensorError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint '{p}' not found; start without --resume or point to a run folder")
    meta = _header(p).get("__metadata__") or {}
    if "__state__" not in meta:
        raise CorruptCheckpoint(p, "no __state__ metadata: not a studio checkpoint")
    try:
        tree = json.loads(meta["__state__"])
        tensors = load_file(str(p), device=str(map_location))
        return _unflatten(tree, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(p, f"{type(e).__name__}: {e}") from None
