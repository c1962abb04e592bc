"""antimatter15 ``.splat`` files: the compact format of the popular WebGL splat viewer.

Each splat is 32 bytes, no header::

    position  3 x float32 (little-endian)
    scale     3 x float32 (linear, i.e. exp of the log-scales)
    RGBA      4 x uint8   rgb = clamp(0.5 + SH_C0 * f_dc, 0, 1) * 255, a = sigmoid(opacity) * 255
    rotation  4 x uint8   clamp(q / |q| * 128 + 128, 0, 255), w-x-y-z

Splats are sorted by descending ``prod(scale) * sigmoid(opacity)`` (viewers stream the biggest first).
Only the degree-0 SH (base colour) survives the conversion; byte values are truncated, not rounded,
matching the reference converter so files are byte-compatible.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .atomic import atomic_write_bytes

__all__ = ["write_splat", "read_splat", "SPLAT_DTYPE", "SH_C0"]

SH_C0 = 0.28209479177387814
SPLAT_DTYPE = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)), ("rgba", "u1", (4,)), ("rot", "u1", (4,))])
assert SPLAT_DTYPE.itemsize == 32


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def splat_records(means, scales_log, quats, opacity_logits, sh) -> np.ndarray:
    """The sorted ``SPLAT_DTYPE`` records for the Gaussians (see ``write_splat`` for the arguments)."""
    means = _np(means).reshape(-1, 3)
    n = means.shape[0]
    scales_log = _np(scales_log).reshape(n, 3)
    quats = _np(quats).reshape(n, 4)
    opacity_logits = _np(opacity_logits).reshape(n)
    sh = _np(sh)
    if sh.ndim == 3:
        dc = sh[:, 0, :]
    elif sh.ndim == 2 and sh.shape[1] == 3:
        dc = sh
    else:
        raise ValueError(f"sh must have shape [N, K, 3] or [N, 3] (degree-0 coefficients), got {tuple(sh.shape)}")
    if dc.shape[0] != n:
        raise ValueError(f"sh has {dc.shape[0]} rows but means has {n}; pass one row per Gaussian")
    scales = np.exp(scales_log)
    alpha = 1.0 / (1.0 + np.exp(-opacity_logits))
    order = np.argsort(-(np.prod(scales, axis=1) * alpha), kind="stable")
    rec = np.zeros(n, dtype=SPLAT_DTYPE)
    rec["position"] = means[order]
    rec["scale"] = scales[order]
    rgb = np.clip(0.5 + SH_C0 * dc[order], 0.0, 1.0) * 255.0
    a = np.clip(alpha[order], 0.0, 1.0) * 255.0
    rec["rgba"] = np.concatenate([rgb, a[:, None]], axis=1).astype(np.uint8)
    q = quats[order]
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    rec["rot"] = np.clip(q * 128.0 + 128.0, 0.0, 255.0).astype(np.uint8)
    return rec


def write_splat(path: str | os.PathLike, means, scales_log, quats, opacity_logits, sh) -> Path:
    """Write a ``.splat`` file atomically.

    Arguments use the PLY conventions: ``means [N,3]``, ``scales_log [N,3]``, ``quats [N,4]`` (w-x-y-z,
    any norm), ``opacity_logits [N]``, ``sh [N,K,3]`` (or the DC coefficients ``[N,3]``).
    """
    return atomic_write_bytes(path, splat_records(means, scales_log, quats, opacity_logits, sh).tobytes())


def read_splat(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.splat`` file: ``{"means" [N,3], "scales" [N,3] (linear), "rgba" uint8 [N,4],
    "colors" [N,3] float in [0,1], "opacities" [N] in [0,1], "quats" [N,4] (decoded, unnormalised)}``.

    Raises ``UserError`` (a ``ValueError``) naming the file when it is missing, not a whole number of 32-byte
    records, or holds a NaN / Inf position or scale."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"could not read splat file '{path}': file not found; expected an antimatter15 .splat file")
    data = p.read_bytes()
    if len(data) % SPLAT_DTYPE.itemsize:
        raise UserError(f"could not read splat file '{path}': size {len(data)} is not a multiple of 32 bytes; "
                        "expected an antimatter15 .splat file")
    rec = np.frombuffer(data, dtype=SPLAT_DTYPE)
    for field, what in (("position", "positions"), ("scale", "scales")):
        bad = ~np.isfinite(rec[field]).all(axis=1)
        if bad.any():
            raise UserError(f"splat file '{path}' has non-finite values (NaN or Inf) in the {what} of {int(bad.sum())} "
                            f"of its {len(rec)} splats (first: splat {int(np.argmax(bad))}); the file is damaged or was "
                            "written by a run that diverged: re-export it from a good checkpoint")
    rgba = torch.from_numpy(rec["rgba"].copy())
    return {
        "means": torch.from_numpy(rec["position"].copy()),
        "scales": torch.from_numpy(rec["scale"].copy()),
        "rgba": rgba,
        "colors": rgba[:, :3].float() / 255.0,
        "opacities": rgba[:, 3].float() / 255.0,
        "quats": (torch.from_numpy(rec["rot"].astype(np.float32)) - 128.0) / 128.0,
    }
