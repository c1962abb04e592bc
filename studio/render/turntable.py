"""Turntable renders of Gaussian sets and meshes (frames for MP4 / PNG grids)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..cameras import Cameras, ring_cameras
from .gaussians import rasterize_gaussians


@torch.no_grad()
def render_turntable(gaussians: dict[str, Tensor], *, n_frames: int = 36, size: int = 256, elevation_deg: float = 15.0,
                     radius: float = 3.2, fovy_deg: float = 35.0, background=(1.0, 1.0, 1.0), sh_degree: int | None = None,
                     backend: str = "auto", batch: int = 4) -> Tensor:
    """Render ``n_frames`` views on an orbit: float frames ``[T,H,W,3]`` in [0,1].

    ``gaussians`` holds activated ``means, quats, scales, opacities, colors`` (colors [N,3] or SH [N,K,3]
    with ``sh_degree``)."""
    cams = ring_cameras(n_frames, elevation_deg=elevation_deg, radius=radius, fovy_deg=fovy_deg, width=size, height=size)
    return render_views(gaussians, cams, background=background, sh_degree=sh_degree, backend=backend, batch=batch)


@torch.no_grad()
def render_views(gaussians: dict[str, Tensor], cams: Cameras, *, background=(1.0, 1.0, 1.0), sh_degree: int | None = None,
                 backend: str = "auto", batch: int = 4) -> Tensor:
    g = gaussians
    dev = g["means"].device
    cams = cams.to(dev)
    out = []
    for s in range(0, len(cams), batch):
        c = cams[s : s + batch]
        bg = torch.tensor(background, dtype=g["means"].dtype, device=dev).expand(len(c), 3).contiguous()
        img, _, _ = rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], c.viewmats,
                                        c.Ks, c.width, c.height, sh_degree=sh_degree, backgrounds=bg, backend=backend)
        out.append(img.clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def render_mesh_turntable(verts: Tensor, faces: Tensor, colors_or_texture=None, *, n_frames: int = 36, size: int = 256,
                          elevation_deg: float = 15.0, radius: float = 3.2, fovy_deg: float = 35.0,
                          background=(1.0, 1.0, 1.0), uvs: Tensor | None = None, backend: str = "auto",
                          batch: int = 4) -> Tensor:
    """Render a mesh on the same orbit as ``render_turntable``: float frames ``[T,H,W,3]`` in [0,1].

    ``colors_or_texture``: ``None`` (grey headlight shading, ``render_mesh``'s preview look), vertex colours
    ``[V,3]``, a colour field ``points [P,3] -> rgb [P,3]`` (``TextureField``; queried per pixel at the
    surface points) or, with ``uvs [V,2]``, a UV texture image ``[H,W,3]`` (``v`` up). Write the frames with
    ``studio.io.write_mp4``."""
    from .mesh import render_mesh
    from .mesh_field import render_mesh_field, sample_uv_texture

    cams = ring_cameras(n_frames, elevation_deg=elevation_deg, radius=radius, fovy_deg=fovy_deg, width=size,
                        height=size).to(verts.device, verts.dtype)
    bg = torch.as_tensor(background, dtype=verts.dtype, device=verts.device)
    c = colors_or_texture
    if isinstance(c, Tensor) and uvs is None and not c.is_floating_point():
        c = c.float() / 255.0
    topo = None
    out = []
    for s in range(0, len(cams), batch):
        cb = cams[s: s + batch]
        if c is None or (isinstance(c, Tensor) and uvs is None):
            r = render_mesh(verts, faces, cb, vertex_colors=c, background=bg, backend=backend)
        elif isinstance(c, Tensor):
            if topo is None:
                topo = _welded_topology(verts, faces)
            r = render_mesh_field(verts, faces, cb, lambda uv: sample_uv_texture(c, uv), attributes=uvs,
                                  background=bg, normals=False, backend=backend, topology=topo)
        else:
            r = render_mesh_field(verts, faces, cb, c, background=bg, normals=False, backend=backend)
        out.append(r["rgb"][..., :3].clamp(0, 1))
    return torch.cat(out)


def _welded_topology(verts: Tensor, faces: Tensor) -> Tensor:
    """``mesh_edge_topology`` of the mesh with coincident vertices merged: a UV-unwrapped mesh duplicates
    the vertices on its seams, which would otherwise count as boundary (silhouette) edges and be
    antialiased against each other."""
    from .mesh import mesh_edge_topology

    _, inv = torch.unique(verts.detach(), dim=0, return_inverse=True)
    return mesh_edge_topology(inv[faces.long()])
