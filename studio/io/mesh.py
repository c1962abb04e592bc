"""Triangle meshes: OBJ (+ MTL + PNG texture) and GLB writers, a reader, and UV unwrapping.

* Axes are written as they are: the studio's world is y-up with the front on +z, which is glTF's
  convention too (and what Blender's OBJ / glTF importers expect by default).
* ``vertex_colors [V,3]`` are floats in [0, 1] (or uint8). OBJ stores them as the widely read
  ``v x y z r g b`` extension (trimesh, MeshLab, Blender); GLB as ``COLOR_0``.
* ``uvs [V,2]`` are per-vertex texture coordinates (``u`` right, ``v`` up; an unwrapped mesh gives one UV
  per vertex, see ``uv_unwrap``); ``texture [H,W,3]`` the image (row 0 = top, ``v = 1``). OBJ writes
  ``<stem>.png`` and ``<stem>.mtl`` (``map_Kd``) next to the ``.obj``; GLB embeds the image as the PBR
  ``baseColorTexture`` (metallic 0, roughness 1).
* Every file is written atomically (``studio.io.atomic``); an OBJ's PNG and MTL are written before the
  OBJ, so a complete ``.obj`` never points at a missing file.
* ``uv_unwrap`` needs the optional ``xatlas`` package (``pip install xatlas``); ``xatlas_available()``
  tells whether it is importable.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .atomic import atomic_write_bytes, atomic_write_text
from .video import to_uint8, write_png

__all__ = ["read_mesh", "uv_unwrap", "write_glb", "write_obj", "xatlas_available"]


def _array(x: Any, name: str, cols: int, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an array [N,{cols}], got {type(x).__name__}") from None
    if arr.ndim != 2 or arr.shape[1] != cols:
        raise UserError(f"{name} must have shape [N,{cols}], got {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise UserError(f"{name} contains NaN or Inf values")
    return arr.astype(dtype, copy=False)


def _check_mesh(verts: Any, faces: Any) -> tuple[np.ndarray, np.ndarray]:
    v = _array(verts, "verts", 3, np.float64)
    f = _array(faces, "faces", 3, np.int64)
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise UserError(f"faces index vertices {int(f.min())}..{int(f.max())} but verts has {v.shape[0]} rows")
    return v, f


def _colors(vertex_colors: Any, n: int) -> np.ndarray | None:
    if vertex_colors is None:
        return None
    c = vertex_colors.detach().cpu().numpy() if isinstance(vertex_colors, torch.Tensor) else np.asarray(vertex_colors)
    if c.ndim != 2 or c.shape != (n, c.shape[1]) or c.shape[1] not in (3, 4):
        raise UserError(f"vertex_colors must have shape [V,3] (or [V,4]) with V={n}, got {tuple(c.shape)}")
    c = c[:, :3]
    return c.astype(np.float64) / 255.0 if c.dtype == np.uint8 else np.clip(c.astype(np.float64), 0.0, 1.0)


def _uvs_texture(uvs: Any, texture: Any, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    uv = None if uvs is None else _array(uvs, "uvs", 2, np.float64)
    if uv is not None and uv.shape[0] != n:
        raise UserError(f"uvs must hold one UV per vertex ({n}), got {uv.shape[0]}; unwrap with uv_unwrap")
    tex = None
    if texture is not None:
        if uv is None:
            raise UserError("a texture image needs per-vertex uvs [V,2]; pass uvs= (see studio.io.uv_unwrap)")
        tex = to_uint8(texture, name="texture")
        if tex.ndim == 2:
            tex = tex[..., None]
        if tex.ndim != 3 or tex.shape[-1] not in (1, 3, 4):
            raise UserError(f"texture must be an image [H,W,3], got {tuple(tex.shape)}")
        if tex.shape[-1] == 1:
            tex = np.repeat(tex, 3, axis=-1)
    return uv, tex


def write_obj(path: str | os.PathLike, verts: Any, faces: Any, *, vertex_colors: Any = None, uvs: Any = None,
              texture: Any = None) -> Path:
    """Write a Wavefront OBJ (module doc). With ``texture`` also ``<stem>.png`` and ``<stem>.mtl``.
    Returns the OBJ path."""
    p = Path(path)
    if p.suffix.lower() != ".obj":
        raise UserError(f"write_obj path must end in .obj, got '{path}'")
    v, f = _check_mesh(verts, faces)
    col = _colors(vertex_colors, v.shape[0])
    uv, tex = _uvs_texture(uvs, texture, v.shape[0])
    buf = io.StringIO()
    buf.write("# written by distill-studio\n")
    if tex is not None:
        mtl_name, png_name = f"{p.stem}.mtl", f"{p.stem}.png"
        write_png(p.with_name(png_name), tex)
        atomic_write_text(p.with_name(mtl_name),
                          "# written by distill-studio\nnewmtl material0\nKa 1.000 1.000 1.000\n"
                          "Kd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\nd 1.0\nillum 1\n"
                          f"map_Kd {png_name}\n")
        buf.write(f"mtllib {mtl_name}\nusemtl material0\n")
    if col is None:
        np.savetxt(buf, v, fmt="v %.7g %.7g %.7g")
    else:
        np.savetxt(buf, np.concatenate([v, col], axis=1), fmt="v %.7g %.7g %.7g %.5f %.5f %.5f")
    if uv is not None:
        np.savetxt(buf, uv, fmt="vt %.7g %.7g")
    f1 = f + 1
    if uv is not None:
        np.savetxt(buf, np.repeat(f1, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    else:
        np.savetxt(buf, f1, fmt="f %d %d %d")
    atomic_write_text(p, buf.getvalue())
    return p


def write_glb(path: str | os.PathLike, verts: Any, faces: Any, *, vertex_colors: Any = None, uvs: Any = None,
              texture: Any = None) -> Path:
    """Write a binary glTF (``.glb``) via trimesh: vertex colours (``COLOR_0``) or a UV texture (PBR
    ``baseColorTexture``), or a plain mesh. Returns the path."""
    import trimesh
    from trimesh.visual import ColorVisuals, TextureVisuals
    from trimesh.visual.material import PBRMaterial

    p = Path(path)
    if p.suffix.lower() != ".glb":
        raise UserError(f"write_glb path must end in .glb, got '{path}'")
    v, f = _check_mesh(verts, faces)
    col = _colors(vertex_colors, v.shape[0])
    uv, tex = _uvs_texture(uvs, texture, v.shape[0])
    visual = None
    if tex is not None:
        from PIL import Image

        mat = PBRMaterial(baseColorTexture=Image.fromarray(tex), metallicFactor=0.0, roughnessFactor=1.0)
        visual = TextureVisuals(uv=uv, material=mat)
    elif uv is not None:
        visual = TextureVisuals(uv=uv)
    elif col is not None:
        rgba = np.concatenate([np.round(col * 255).astype(np.uint8), np.full((v.shape[0], 1), 255, np.uint8)], 1)
        visual = ColorVisuals(vertex_colors=rgba)
    mesh = trimesh.Trimesh(vertices=v, faces=f, visual=visual, process=False)
    data = mesh.export(file_type="glb")
    atomic_write_bytes(p, data)
    return p


def read_mesh(path: str | os.PathLike) -> dict[str, Any]:
    """Read any mesh trimesh opens (OBJ, GLB, PLY, STL...) as one mesh, without merging or reordering
    vertices: ``verts [V,3] float32``, ``faces [F,3] long`` and, when present, ``vertex_colors [V,3]``
    (float in [0,1]), ``uvs [V,2]`` and ``texture [H,W,3]`` (float in [0,1])."""
    import trimesh

    p = Path(path)
    if not p.is_file():
        raise UserError(f"mesh file '{path}' not found; pass the path of an .obj/.glb/.ply file")
    try:
        mesh = trimesh.load(str(p), force="mesh", process=False, maintain_order=True)
    except Exception as exc:  # noqa: BLE001 - trimesh raises assorted types for unreadable files
        raise UserError(f"could not read mesh '{path}': {exc}; expected an .obj/.glb/.ply mesh file") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise UserError(f"'{path}' holds no triangle mesh; expected an .obj/.glb/.ply mesh file")
    out: dict[str, Any] = {
        "verts": torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32),
        "faces": torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long),
    }
    vis = mesh.visual
    if getattr(vis, "kind", None) == "vertex":
        out["vertex_colors"] = torch.as_tensor(np.asarray(vis.vertex_colors)[:, :3], dtype=torch.float32) / 255.0
    elif getattr(vis, "kind", None) == "texture":
        if getattr(vis, "uv", None) is not None:
            out["uvs"] = torch.as_tensor(np.asarray(vis.uv), dtype=torch.float32)
        mat = getattr(vis, "material", None)
        img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
        if img is not None:
            out["texture"] = torch.as_tensor(np.array(img.convert("RGB")), dtype=torch.float32) / 255.0
    return out


def xatlas_available() -> bool:
    """Whether the optional ``xatlas`` package (UV unwrapping) is importable."""
    try:
        import xatlas  # noqa: F401
    except ImportError:
        return False
    return True


def uv_unwrap(verts: Any, faces: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """UV-unwrap a mesh with xatlas: ``(verts [V',3], faces [F,3], uvs [V',2], vmapping [V'])``.

    xatlas cuts seams, so vertices on them are duplicated: ``verts = old_verts[vmapping]`` and the new
    faces index the new vertices (same face order). UVs lie in [0, 1] (``v`` up). Returns tensors on the
    input's device (CPU for numpy input). Raises ``UserError`` when xatlas is not installed."""
    try:
        import xatlas
    except ImportError:
        raise UserError("uv_unwrap needs the optional xatlas package: pip install xatlas "
                        "(or export vertex colours instead)") from None
    device = verts.device if isinstance(verts, torch.Tensor) else torch.device("cpu")
    v, f = _check_mesh(verts, faces)
    if f.shape[0] == 0:
        raise UserError("uv_unwrap needs a mesh with at least one face")
    vmapping, indices, uvs = xatlas.parametrize(v.astype(np.float32), f.astype(np.uint32))
    vm = torch.as_tensor(vmapping.astype(np.int64), device=device)
    new_v = torch.as_tensor(v, dtype=torch.float32, device=device)[vm]
    return (new_v, torch.as_tensor(indices.astype(np.int64), device=device),
            torch.as_tensor(uvs, dtype=torch.float32, device=device), vm)
