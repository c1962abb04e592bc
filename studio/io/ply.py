"""Standard 3D Gaussian splatting PLY files (the Inria layout every splat viewer opens).

One ``vertex`` element, binary little-endian, float32 properties in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 .. f_rest_{3*(K-1)-1}  opacity  scale_0..2  rot_0..3

* ``f_dc`` are the degree-0 SH coefficients (R, G, B);
* ``f_rest`` hold the higher-order coefficients **channel-major**: all ``K-1`` red coefficients, then
  all green, then all blue (``K = (degree+1)^2``; 0, 9, 24 or 45 values for degrees 0..3);
* ``opacity`` is the pre-sigmoid logit, ``scale_*`` are log-scales, ``rot_*`` the (unnormalised)
  w-x-y-z quaternion, ``n*`` unused normals (written as zeros).

``read_ply`` is lenient: any SH degree 0..3 (inferred from the ``f_rest`` count), extra unknown
properties (returned in ``extra``), other elements before/after the vertices, any scalar property type,
and ``binary_little_endian`` / ``binary_big_endian`` / ``ascii`` formats. It is strict about values: a NaN
or Inf in a Gaussian property is refused with a message naming the file, the property and the first vertex.
Every reading error is a ``studio.errors.UserError`` (a ``ValueError``) naming the file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .atomic import atomic_path

__all__ = ["write_ply", "read_ply", "ply_property_names", "SH_REST_COUNTS"]

# number of f_rest values for SH degree 0..3
SH_REST_COUNTS = {3 * ((d + 1) ** 2 - 1): d for d in range(4)}

_PLY_TYPES = {
    "char": "i1", "int8": "i1",
    "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4",
    "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}
_FORMATS = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": "ascii"}
_EXPECTED = "expected a 3D Gaussian splatting .ply file (Inria layout)"


def _as_numpy(name: str, x: Any, shape_tail: tuple[int, ...]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.shape[1:] != shape_tail and not (shape_tail == () and arr.ndim == 2 and arr.shape[1] == 1):
        want = "[N" + "".join(f", {s}" for s in shape_tail) + "]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
    return arr.reshape((arr.shape[0],) + shape_tail)


def ply_property_names(sh_degree: int) -> list[str]:
    """The Inria-layout property names, in file order, for ``sh_degree`` (0..3)."""
    if sh_degree not in range(4):
        raise ValueError(f"sh_degree must be in 0..3, got {sh_degree!r}")
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def write_ply(path: str | os.PathLike, means, scales_log, quats, opacity_logits, sh) -> Path:
    """Write Gaussians as a standard 3DGS PLY (binary little-endian, Inria layout), atomically.

    ``means [N,3]``, ``scales_log [N,3]`` (log-scales), ``quats [N,4]`` (w-x-y-z, stored as given),
    ``opacity_logits [N]`` (pre-sigmoid), ``sh [N,K,3]`` SH coefficients with ``K`` in {1, 4, 9, 16}.
    Accepts torch tensors or numpy arrays. Returns the path written.
    """
    means = _as_numpy("means", means, (3,))
    n = means.shape[0]
    scales_log = _as_numpy("scales_log", scales_log, (3,))
    quats = _as_numpy("quats", quats, (4,))
    opacity_logits = _as_numpy("opacity_logits", opacity_logits, ())
    if isinstance(sh, torch.Tensor):
        sh = sh.detach().to("cpu", torch.float32).numpy()
    sh = np.asarray(sh, dtype=np.float32)
    if sh.ndim != 3 or sh.shape[2] != 3 or sh.shape[1] not in (1, 4, 9, 16):
        raise ValueError(f"sh must have shape [N, K, 3] with K in (1, 4, 9, 16), got {tuple(sh.shape)}")
    for name, a in (("scales_log", scales_log), ("quats", quats), ("opacity_logits", opacity_logits), ("sh", sh)):
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} rows but means has {n}; pass one row per Gaussian")
    degree = int(round(np.sqrt(sh.shape[1]))) - 1
    names = ply_property_names(degree)
    dtype = np.dtype([(nm, "<f4") for nm in names])
    rec = np.zeros(n, dtype=dtype)
    flat = rec.view("<f4").reshape(n, len(names))  # a plain [N, P] float view of the records
    flat[:, 0:3] = means
    # normals (3:6) stay zero
    flat[:, 6:9] = sh[:, 0, :]
    n_rest = 3 * (sh.shape[1] - 1)
    if n_rest:
        # channel-major: [N, K-1, 3] -> [N, 3, K-1] -> R coeffs, then G, then B
        flat[:, 9:9 + n_rest] = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, n_rest)
    o = 9 + n_rest
    flat[:, o] = opacity_logits
    flat[:, o + 1:o + 4] = scales_log
    flat[:, o + 4:o + 8] = quats
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {n}\n"
    header += "".join(f"property float {nm}\n" for nm in names)
    header += "end_header\n"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(rec.tobytes())
    return Path(path)


def _fail(path, why: str) -> UserError:
    return UserError(f"could not read PLY '{path}': {why}; {_EXPECTED}")


def _check_finite(path, arrays: dict[str, np.ndarray]) -> None:
    """Refuse NaN / Inf in the Gaussian properties, naming the file, the property and the first vertex."""
    for nm, a in arrays.items():
        bad = ~np.isfinite(a)
        if bad.any():
            rows = np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0]
            raise UserError(f"PLY '{path}' has non-finite values (NaN or Inf) in {nm} of {len(rows)} of its "
                            f"{bad.shape[0]} Gaussians (first: vertex {int(rows[0])}); the file is damaged or was "
                            "written by a run that diverged: re-export it from a good checkpoint")


def _parse_header(path, data: bytes) -> tuple[str, list[dict], int]:
    if not data.startswith(b"ply"):
        raise _fail(path, "the file does not start with 'ply'")
    m = re.search(rb"end_header[ \t]*\r?\n", data)
    if m is None:
        raise _fail(path, "no 'end_header' line found")
    lines = data[:m.start()].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[dict] = []
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            if len(tok) < 2 or tok[1] not in _FORMATS:
                raise _fail(path, f"unsupported format line {line!r}")
            fmt = _FORMATS[tok[1]]
        elif tok[0] == "element":
            if len(tok) != 3 or not tok[2].isdigit():
                raise _fail(path, f"malformed element line {line!r}")
            elements.append({"name": tok[1], "count": int(tok[2]), "props": [], "has_list": False})
        elif tok[0] == "property":
            if not elements:
                raise _fail(path, f"property before any element: {line!r}")
            if len(tok) >= 2 and tok[1] == "list":
                elements[-1]["has_list"] = True
                elements[-1]["props"].append((tok[-1], None))
            elif len(tok) == 3 and tok[1] in _PLY_TYPES:
                elements[-1]["props"].append((tok[2], _PLY_TYPES[tok[1]]))
            else:
                raise _fail(path, f"malformed property line {line!r}")
        else:
            raise _fail(path, f"unexpected header line {line!r}")
    if fmt is None:
        raise _fail(path, "no 'format' line in the header")
    return fmt, elements, m.end()


def _read_vertices(path, data: bytes, fmt: str, elements: list[dict], body: int) -> np.ndarray:
    """The vertex element as a structured numpy array (native field types)."""
    if fmt == "ascii":
        lines = data[body:].decode("ascii", errors="replace").splitlines()
        lines = [ln for ln in lines if ln.strip()]
        row = 0
        for el in elements:
            if el["name"] == "vertex":
                if el["has_list"]:
                    raise _fail(path, "list properties in the vertex element are not supported")
                rows = lines[row:row + el["count"]]
                if len(rows) != el["count"]:
                    raise _fail(path, f"expected {el['count']} vertex lines, found {len(rows)}")
                dtype = np.dtype([(nm, t) for nm, t in el["props"]])
                out = np.zeros(el["count"], dtype=dtype)
                try:
                    vals = np.array([ln.split() for ln in rows], dtype=np.float64)
                    vals = vals.reshape(el["count"], len(el["props"]))
                except ValueError as exc:
                    raise _fail(path, f"malformed ascii vertex data ({exc})") from None
                for i, (nm, _) in enumerate(el["props"]):
                    out[nm] = vals[:, i]
                return out
            row += el["count"]
        raise _fail(path, "no 'vertex' element")
    offset = body
    for el in elements:
        if el["has_list"]:
            if el["name"] == "vertex":
                raise _fail(path, "list properties in the vertex element are not supported")
            raise _fail(path, f"element {el['name']!r} with list properties precedes the vertices")
        dtype = np.dtype([(nm, fmt + t) for nm, t in el["props"]])
        nbytes = dtype.itemsize * el["count"]
        if el["name"] == "vertex":
            if offset + nbytes > len(data):
                raise _fail(path, f"file is truncated: {el['count']} vertices need {nbytes} bytes, "
                                  f"found {len(data) - offset}")
            return np.frombuffer(data, dtype=dtype, count=el["count"], offset=offset)
        offset += nbytes
    raise _fail(path, "no 'vertex' element")


def _rest_index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _extra_tensor(a: np.ndarray) -> torch.Tensor:
    # native byte order, and a dtype torch can hold (uint16/uint32 widen to the next signed type)
    widen = {"u2": np.int32, "u4": np.int64}
    kind = a.dtype.kind + str(a.dtype.itemsize)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=widen.get(kind, a.dtype.newbyteorder("="))))


def read_ply(path: str | os.PathLike) -> dict[str, Any]:
    """Read a 3DGS PLY into float32 torch tensors.

    Returns ``{"means" [N,3], "scales" [N,3] (log), "quats" [N,4] (w-x-y-z as stored),
    "opacities" [N] (logits), "sh" [N,K,3], "sh0" [N,1,3], "shN" [N,K-1,3], "sh_degree" int,
    "normals" [N,3] (zeros when absent), "extra" {name: [N] tensor} for unknown properties}``.
    Raises ``UserError`` (a ``ValueError``) naming the file when it is missing, not a PLY, truncated, lacks a
    property or holds a NaN / Inf in a Gaussian property (positions, scales, rotations, opacity, SH).
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(path, "file not found" if not p.exists() else "not a regular file")
    data = p.read_bytes()
    fmt, elements, body = _parse_header(path, data)
    verts = _read_vertices(path, data, fmt, elements, body)
    names = list(verts.dtype.names or ())
    n = verts.shape[0]

    def col(nm: str) -> np.ndarray:
        if nm not in names:
            raise _fail(path, f"the vertex element has no property {nm!r}")
        return np.asarray(verts[nm], dtype=np.float32)

    def stack(nms: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([col(nm) for nm in nms], axis=-1).reshape(n, len(nms)).copy())

    rest_names = sorted((nm for nm in names if re.fullmatch(r"f_rest_\d+", nm)), key=_rest_index)
    if len(rest_names) not in SH_REST_COUNTS:
        raise _fail(path, f"found {len(rest_names)} f_rest properties; expected 0, 9, 24 or 45 (SH degree 0..3)")
    if [_rest_index(nm) for nm in rest_names] != list(range(len(rest_names))):
        raise _fail(path, "f_rest properties are not numbered 0..M-1")
    degree = SH_REST_COUNTS[len(rest_names)]
    k = (degree + 1) ** 2
    sh0 = stack(["f_dc_0", "f_dc_1", "f_dc_2"]).reshape(n, 1, 3)
    if rest_names:
        shn = stack(rest_names).reshape(n, 3, k - 1).transpose(1, 2).contiguous()
    else:
        shn = torch.zeros(n, 0, 3)
    known = {"x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", *rest_names}
    normals = stack(["nx", "ny", "nz"]) if {"nx", "ny", "nz"} <= set(names) else torch.zeros(n, 3)
    means = stack(["x", "y", "z"])
    scales = stack(["scale_0", "scale_1", "scale_2"])
    quats = stack(["rot_0", "rot_1", "rot_2", "rot_3"])
    opacities = torch.from_numpy(col("opacity").copy())
    sh = torch.cat([sh0, shn], dim=1)
    _check_finite(path, {"positions (x, y, z)": means.numpy(), "scales (scale_*)": scales.numpy(),
                         "rotations (rot_*)": quats.numpy(), "opacity": opacities.numpy(),
                         "colours (f_dc_*, f_rest_*)": sh.numpy()})
    return {
        "means": means,
        "scales": scales,
        "quats": quats,
        "opacities": opacities,
        "sh": sh,
        "sh0": sh0,
        "shN": shn,
        "sh_degree": degree,
        "normals": normals,
        "extra": {nm: _extra_tensor(verts[nm]) for nm in names if nm not in known},
    }
