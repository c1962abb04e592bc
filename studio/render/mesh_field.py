"""Meshes coloured by a function evaluated at the rasterized surface points (texture fields, UV textures).

``render_mesh_field`` rasterizes with ``render_mesh`` (no shading), interpolates the world positions (or
any other vertex attribute, e.g. UVs) at every covered pixel with ``interpolate``, calls ``color_fn`` on
those points only, composites over the background and antialiases the silhouettes with ``antialias``.
Gradients reach the colour function's parameters through its outputs and the vertices through the
barycentrics (interior) and the antialiasing (silhouettes). ``sample_uv_texture`` is the colour function
of a baked UV texture image (glTF / OBJ convention: ``v = 0`` is the *bottom* image row).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .mesh import background_colors, interpolate, render_mesh
from .mesh import antialias as antialias_fn

__all__ = ["render_mesh_field", "sample_uv_texture"]


def render_mesh_field(
    verts: Tensor,
    faces: Tensor,
    cameras: Any,
    color_fn: Callable[[Tensor], Tensor],
    width: int | None = None,
    height: int | None = None,
    *,
    attributes: Tensor | None = None,
    background: float | Sequence[float] | Tensor = 1.0,
    antialias: bool = True,
    normals: bool | str = True,
    near: float = 0.01,
    far: float = 100.0,
    backend: str = "auto",
    topology: Tensor | None = None,
) -> dict[str, Any]:
    """Render ``verts [V,3]``, ``faces [F,3]`` with per-pixel colours ``color_fn(points [P,A]) -> [P,D]``.

    ``points`` are the interpolated world positions of the covered pixels (``attributes [V,A]`` replaces
    them, e.g. UVs). ``cameras``, ``width``, ``height``, ``normals``, ``near``, ``far``, ``backend`` and
    ``topology`` as in ``render_mesh``. Returns ``rgb [C,H,W,D]`` (over ``background``, antialiased unless
    ``antialias=False``), ``alpha [C,H,W,1]``, ``depth [C,H,W,1]``, ``normal [C,H,W,3]`` (world frame;
    absent with ``normals=False``), ``position [C,H,W,3]`` (world, 0 on background), ``mask``,
    ``face_id`` and ``rast``.
    """
    if not callable(color_fn):
        raise UserError(f"color_fn must be a callable points [P,3] -> colours [P,D], got {type(color_fn).__name__}")
    ones = verts.new_zeros(verts.shape[:-1] + (1,))  # unlit dummy colour: skips render_mesh's shading
    out = render_mesh(verts, faces, cameras, width, height, vertex_colors=ones, normals=normals, background=0.0,
                      antialias=False, near=near, far=far, backend=backend, topology=topology)
    rast, mask = out["rast"], out["mask"]
    pos = interpolate(verts, rast, faces)
    query = pos if attributes is None else interpolate(attributes.to(verts.dtype), rast, faces)
    vals = color_fn(query[mask])
    if not (isinstance(vals, Tensor) and vals.dim() == 2 and vals.shape[0] == query[mask].shape[0]):
        raise UserError(f"color_fn must return colours [P,D] for its P={int(mask.sum())} points, got "
                        f"{getattr(vals, 'shape', type(vals).__name__)}")
    C, H, W = mask.shape
    D = vals.shape[1]
    color = vals.new_zeros(C, H, W, D).index_put((mask,), vals)
    maskf = mask[..., None].to(color.dtype)
    rgb = color + background_colors(background, C, D, color) * (1 - maskf)
    alpha = maskf
    if antialias:
        both = antialias_fn(torch.cat([rgb, alpha], dim=-1), rast, faces, topology=topology)
        rgb, alpha = both[..., :D], both[..., D:]
    res = {"rgb": rgb, "alpha": alpha, "depth": out["depth"], "position": pos, "mask": mask,
           "face_id": out["face_id"], "rast": rast}
    if "normal" in out:
        res["normal"] = out["normal"]
    return res


def sample_uv_texture(image: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of ``image [H,W,D]`` at ``uv [P,2]`` in [0,1] (``u`` right, ``v`` up: glTF/OBJ
    texture coordinates, ``v = 1`` is the top row): ``[P,D]``. Clamped at the borders."""
    if not (isinstance(image, Tensor) and image.dim() == 3):
        raise UserError(f"texture image must be a tensor [H,W,D], got {getattr(image, 'shape', type(image).__name__)}")
    img = image.permute(2, 0, 1)[None].to(uv.dtype)
    grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], dim=-1)[None, None]
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T
