"""A colour field on a mesh surface (texture stage on fixed geometry), its renderer and its export.

``TextureField`` maps world points to RGB in [0, 1]: the point is normalised into the box
(``[-1, 1]^3``), encoded with NeRF Fourier features ``[x, sin(2^k pi x), cos(2^k pi x)]`` for
``k < n_frequencies`` (default) or with the studio's multi-resolution hash grid
(``encoding="hashgrid"``, ``studio.students.fields.HashGridEncoding``, as threestudio's texture stage),
and fed to a small ReLU MLP with a sigmoid output. It is evaluated only at the rasterized surface points
(``render_textured``), like threestudio's texture stage (a volumetric colour field queried on the DMTet
surface). [Our choice: the Fourier default keeps the student light on a CPU; any callable
``points [P,3] -> rgb [P,3]`` works in every function here.]

Export: ``bake_vertex_colors`` evaluates the field at the vertices; ``bake_texture`` rasterizes the mesh
in UV space (vertices at ``(u, 1 - v)`` on the texture, so ``v`` points up as in glTF / OBJ) with the
studio's mesh rasterizer, evaluates the field at every covered texel's 3D point and pads the charts by a
few texels (so bilinear filtering and mip-maps do not pull the background in at seams).
``export_textured_mesh`` writes OBJ (+ MTL + PNG) or GLB: a UV atlas from ``xatlas`` when installed,
vertex colours (with a warning) otherwise.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..render.mesh import interpolate, rasterize_mesh
from ..render.mesh_field import render_mesh_field
from ..render.volume import normalize_bbox

__all__ = [
    "TextureField",
    "as_mesh",
    "bake_texture",
    "bake_vertex_colors",
    "export_textured_mesh",
    "render_textured",
]

ColorFn = Callable[[Tensor], Tensor]


class TextureField(nn.Module):
    """RGB field ``points [P,3] -> [P,3]`` in [0, 1] (module doc).

    ``bbox`` (float half-extent or ``(min, max)``) is the region the encoding resolves. ``encoding``:

    * ``"fourier"`` (default): ``n_frequencies`` octaves starting at one period per box (frequency ``pi``
      on ``[-1, 1]``); points outside the box still evaluate (the encoding is periodic there).
    * ``"hashgrid"``: ``studio.students.fields.HashGridEncoding(**hash_grid)`` on the box mapped to
      ``[0, 1]^3`` (points outside are clamped to the box faces), as threestudio's texture stage.

    Then a ``hidden`` x ``layers`` ReLU MLP with a sigmoid output whose bias starts at 0, so an untrained
    field is mid-grey. ``param_groups`` gives the encoding and MLP learning rates separately."""

    def __init__(self, bbox: float | Sequence | Tensor = 1.0, *, encoding: str = "fourier", n_frequencies: int = 6,
                 hash_grid: dict[str, Any] | None = None, hidden: int = 64, layers: int = 2,
                 out_dim: int = 3) -> None:
        super().__init__()
        if encoding not in ("fourier", "hashgrid"):
            raise UserError(f"encoding must be 'fourier' or 'hashgrid', got {encoding!r}")
        if n_frequencies < 0 or hidden < 1 or layers < 1 or out_dim < 1:
            raise UserError(f"TextureField needs n_frequencies >= 0, hidden >= 1, layers >= 1, out_dim >= 1; got "
                            f"{n_frequencies}, {hidden}, {layers}, {out_dim}")
        box = normalize_bbox(bbox)
        self.encoding = encoding
        self.register_buffer("center", box.mean(0))
        self.register_buffer("half_extent", (box[1] - box[0]) / 2)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32))
        self.grid: nn.Module | None = None
        if encoding == "hashgrid":
            from .fields import HashGridEncoding

            self.grid = HashGridEncoding(**(hash_grid or {}))
            n_in = int(self.grid.n_output_dims)
        else:
            n_in = 3 + 6 * n_frequencies
        dims = [n_in] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        last = nn.Linear(dims[-1], out_dim)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*mods, last)

    def encode(self, points: Tensor) -> Tensor:
        """Features of the points: Fourier ``[P, 3 + 6 n_frequencies]`` or the hash grid's."""
        x = (points - self.center) / self.half_extent
        if self.grid is not None:
            return self.grid((x + 1) / 2)
        xf = (x[..., None] * self.freqs).flatten(-2)
        return torch.cat([x, torch.sin(xf), torch.cos(xf)], dim=-1)

    def forward(self, points: Tensor) -> Tensor:
        if not (isinstance(points, Tensor) and points.dim() == 2 and points.shape[1] == 3):
            raise UserError(f"points must be a tensor [P,3], got {getattr(points, 'shape', type(points).__name__)}")
        return torch.sigmoid(self.mlp(self.encode(points.to(self.freqs.dtype))))

    def param_groups(self, lr_encoding: float = 0.01, lr_mlp: float = 1e-3) -> list[dict[str, Any]]:
        """``[{"name": "encoding", ...}, {"name": "mlp", ...}]`` (threestudio: hash grid 0.01, MLPs 1e-3);
        the Fourier encoding has no parameters, so its group is then omitted."""
        groups = [{"params": list(self.grid.parameters()), "lr": lr_encoding, "name": "encoding"}] if self.grid else []
        return groups + [{"params": list(self.mlp.parameters()), "lr": lr_mlp, "name": "mlp"}]


def as_mesh(mesh: Any) -> tuple[Tensor, Tensor]:
    """``(verts, faces)`` from a pair, an object with ``.mesh()`` (``DMTet``) or ``.vertices``/``.faces``."""
    if hasattr(mesh, "mesh") and callable(mesh.mesh):
        return mesh.mesh()
    if isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        return mesh[0], mesh[1]
    if hasattr(mesh, "vertices") and hasattr(mesh, "faces"):  # trimesh.Trimesh
        return (torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces, dtype=torch.long))
    raise UserError("mesh must be (verts [V,3], faces [F,3]), a DMTet or a trimesh.Trimesh, got "
                    f"{type(mesh).__name__}")


def render_textured(mesh: Any, texture: ColorFn, cameras: Any, width: int | None = None, height: int | None = None,
                    **kw) -> dict[str, Any]:
    """Render ``mesh`` (see ``as_mesh``) coloured by ``texture`` (``TextureField`` or any callable
    ``points [P,3] -> rgb [P,3]``) queried at the rasterized surface points: ``rgb``, ``alpha``,
    ``normal`` (world frame), ``depth``, ``position``, ``mask`` (see ``render_mesh_field``; keyword
    arguments ``background``, ``antialias``, ``normals``, ``backend``, ``topology``... pass through)."""
    verts, faces = as_mesh(mesh)
    return render_mesh_field(verts, faces, cameras, texture, width, height, **kw)


@torch.no_grad()
def bake_vertex_colors(verts: Tensor, texture: ColorFn, *, chunk: int = 65536) -> Tensor:
    """``texture`` evaluated at every vertex, clamped to [0, 1]: ``[V,3]`` (for vertex-colour export)."""
    out = [texture(verts[s:s + chunk]) for s in range(0, verts.shape[0], chunk)]
    return (torch.cat(out) if out else verts.new_zeros((0, 3))).clamp(0, 1)


def _dilate(image: Tensor, mask: Tensor, iters: int) -> Tensor:
    """Grow the painted texels (``mask``) outward by ``iters`` texels, each new texel the mean of its
    painted 3x3 neighbours."""
    img = image.permute(2, 0, 1)[None]
    m = mask[None, None].to(img.dtype)
    k = torch.ones(1, 1, 3, 3, dtype=img.dtype, device=img.device)
    for _ in range(iters):
        cnt = F.conv2d(m, k, padding=1)
        acc = F.conv2d(img * m, k.expand(img.shape[1], 1, 3, 3), padding=1, groups=img.shape[1])
        grow = (cnt > 0) & (m == 0)
        img = torch.where(grow, acc / cnt.clamp_min(1), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0)


@torch.no_grad()
def bake_texture(verts: Tensor, faces: Tensor, uvs: Tensor, texture: ColorFn, size: int = 1024, *,
                 padding: int = 4, background: float = 0.0, backend: str = "auto",
                 chunk: int = 262144) -> tuple[Tensor, Tensor]:
    """Bake ``texture`` into a ``size x size`` UV image: ``(image [size,size,3] in [0,1], covered [size,size])``.

    ``verts [V,3]``, ``faces [F,3]`` and per-vertex ``uvs [V,2]`` in [0, 1] (an unwrapped mesh: see
    ``studio.io.uv_unwrap``). Texel ``(row, col)`` centre ``(col + 0.5, row + 0.5) / size`` holds
    ``u = x``, ``v = 1 - y``; the UV triangles are rasterized by ``rasterize_mesh`` with an identity camera
    and unit depth (then the barycentrics are plain affine ones), the 3D point of each covered texel is
    interpolated and the field evaluated there. Charts are padded by ``padding`` texels; other texels get
    ``background``."""
    if not (isinstance(size, int) and size > 0):
        raise UserError(f"texture size must be a positive int, got {size!r}")
    if not (isinstance(uvs, Tensor) and uvs.dim() == 2 and uvs.shape == (verts.shape[0], 2)):
        raise UserError(f"uvs must be [V,2] with V={verts.shape[0]} (one per vertex), got "
                        f"{getattr(uvs, 'shape', type(uvs).__name__)}")
    dev, dt = verts.device, torch.float32
    uv3 = torch.cat([uvs[:, :1], 1 - uvs[:, 1:2], torch.ones_like(uvs[:, :1])], dim=-1).to(dev, dt)
    viewmat = torch.eye(4, dtype=dt, device=dev)[None]
    K = torch.tensor([[[size, 0.0, 0.0], [0.0, size, 0.0], [0.0, 0.0, 1.0]]], dtype=dt, device=dev)
    rast = rasterize_mesh(uv3, faces, viewmat, K, size, size, near=0.5, far=2.0, backend=backend)
    mask = rast["mask"][0]
    pos = interpolate(verts.to(dt), rast, faces)[0]
    pts = pos[mask]
    cols = torch.cat([texture(pts[s:s + chunk]) for s in range(0, pts.shape[0], chunk)]) if pts.shape[0] else \
        pts.new_zeros((0, 3))
    img = torch.full((size, size, cols.shape[-1] if cols.dim() == 2 else 3), float(background), dtype=dt, device=dev)
    img[mask] = cols.to(dt).clamp(0, 1)
    if padding > 0:
        img = _dilate(img, mask, padding)
    return img, mask


def export_textured_mesh(path: str | Path, verts: Tensor, faces: Tensor, texture: ColorFn | None = None, *,
                         vertex_colors: Tensor | None = None, uv: bool = True, texture_size: int = 1024,
                         backend: str = "auto") -> dict[str, Any]:
    """Write a mesh with its colours as ``.obj`` (+ ``.mtl`` + ``.png``) or ``.glb`` (by suffix).

    With a ``texture`` field and ``uv=True`` the mesh is unwrapped with xatlas (``studio.io.uv_unwrap``),
    the field baked into a ``texture_size`` image and written as a UV texture (GLB: PBR
    ``baseColorTexture``; OBJ: ``map_Kd``). Without xatlas, or with ``uv=False``, the field is baked to
    vertex colours (a ``UserWarning`` says so when UVs were asked for). ``vertex_colors [V,3]`` may be
    given directly instead of a field. Returns ``{"path", "mode": "uv" | "vertex_colors" | "plain",
    "n_verts", "n_faces"}``."""
    from ..io.mesh import uv_unwrap, write_glb, write_obj, xatlas_available

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".obj", ".glb"):
        raise UserError(f"mesh export path must end in .obj or .glb, got '{path}'")
    writer = write_obj if suffix == ".obj" else write_glb
    verts, faces = verts.detach().float(), faces.detach().long()
    if texture is not None and uv and not xatlas_available():
        warnings.warn("xatlas is not installed (pip install xatlas): exporting vertex colours instead of a "
                      "UV texture", UserWarning, stacklevel=2)
        uv = False
    if texture is not None and uv:
        v2, f2, uvs, _ = uv_unwrap(verts, faces)
        img, _ = bake_texture(v2, f2, uvs, texture, texture_size, backend=backend)
        writer(p, v2, f2, uvs=uvs, texture=img)
        return {"path": p, "mode": "uv", "n_verts": v2.shape[0], "n_faces": f2.shape[0]}
    if texture is not None:
        vertex_colors = bake_vertex_colors(verts, texture)
    writer(p, verts, faces, vertex_colors=vertex_colors)
    return {"path": p, "mode": "plain" if vertex_colors is None else "vertex_colors", "n_verts": verts.shape[0],
            "n_faces": faces.shape[0]}
