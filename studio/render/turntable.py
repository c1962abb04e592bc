"""Turntable renders of Gaussian sets (frames for MP4 / PNG grids)."""
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
