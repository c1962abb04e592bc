"""Native C++/OpenMP tile rasterizer (``cuda_ext/cpu``).

Contract (same for ``_cuda``):
    available() -> bool                 builds/loads the extension on first call, never raises
    load_error() -> str | None
    rasterize_to_pixels(means2d [C,N,2], conics [C,N,3], colors [C,N,D], opacities [C,N],
                        radii [C,N,2] int32, depths [C,N], width, height, backgrounds [C,D] | None,
                        *, tile_size=16) -> (render [C,H,W,D], alphas [C,H,W,1], extra: dict)
    differentiable w.r.t. means2d, conics, colors, opacities, backgrounds; blend rules in _common.

Implementation (``cuda_ext/cpu/rasterize.cpp``, one C++ call per stage for all cameras):

* ``bin_gaussians``: per camera, the visible Gaussians (both radii > 0) are stably sorted by depth
  and appended to the lists of every tile their radii box touches. The radii are conservative
  (outside the box alpha < ALPHA_MIN), so binning never changes the image.
* ``rasterize_forward``: OpenMP over (camera, tile), front-to-back blend with early termination;
  keeps the per-pixel final transmittance and the number of list entries consumed.
* ``rasterize_backward``: analytic, back-to-front per pixel (``T_i = T_{i+1} / (1 - alpha_i)``);
  per-intersection gradient records (race free) reduced per Gaussian deterministically.

``extra`` holds the binning: ``isect_offsets [C,th,tw]`` (int32 start of each tile's list in
``flatten_ids``), ``flatten_ids [M]`` (int32 ``c*N + n``, depth ordered within a tile) and
``tiles_per_gauss [C,N]`` (int32).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from studio.ext import Extension

from ._common import TILE_SIZE

EXT_NAME = "studio_native_raster"
EXT_SOURCES = ["cpu/rasterize.cpp"]
EXT_CFLAGS = ["-O3", "-fopenmp"]
EXT_LDFLAGS = ["-fopenmp"]

_EXT = Extension(EXT_NAME, EXT_SOURCES, extra_cflags=EXT_CFLAGS, extra_ldflags=EXT_LDFLAGS)
_load = _EXT.load
available = _EXT.available  #: whether the extension builds and loads (tried once per process; never raises)
load_error = _EXT.load_error  #: why it is unavailable (None if it loaded or was not tried yet)


class _RasterizeToPixels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, width, height,
                tile_size):
        ext = _load()
        bg = backgrounds if backgrounds is not None else means2d.new_empty((0,))
        render, alphas, t_final, last = ext.rasterize_forward(
            means2d, conics, colors, opacities, bg, isect_offsets, flatten_ids, width, height, tile_size
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, bg, isect_offsets, flatten_ids, t_final, last)
        ctx.has_bg = backgrounds is not None
        ctx.dims = (width, height, tile_size)
        return render, alphas

    @staticmethod
    @once_differentiable
    def backward(ctx, g_render, g_alphas):
        means2d, conics, colors, opacities, bg, offsets, flat, t_final, last = ctx.saved_tensors
        width, height, tile_size = ctx.dims
        dt = means2d.dtype
        if g_render is None:
            g_render = t_final.new_zeros(*t_final.shape, colors.shape[-1])
        g_render = g_render.to(dt).contiguous()
        g_alphas = torch.zeros_like(t_final) if g_alphas is None else g_alphas.to(dt).contiguous()
        gm, gq, gc, go, gb = _load().rasterize_backward(
            means2d, conics, colors, opacities, bg, offsets, flat, t_final, last, g_render, g_alphas,
            width, height, tile_size,
        )
        return gm, gq, gc, go, (gb if ctx.has_bg else None), None, None, None, None, None


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    *,
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Tile-based blend of projected Gaussians (see module docstring for shapes and ``extra``)."""
    ext = _load()
    if means2d.dim() != 3 or means2d.shape[-1] != 2:
        raise ValueError(f"means2d must have shape [C, N, 2], got {tuple(means2d.shape)}")
    C, N = means2d.shape[:2]
    if colors.dim() != 3 or tuple(colors.shape[:2]) != (C, N):
        raise ValueError(f"colors must have shape [C, N, D] with C={C}, N={N}, got {tuple(colors.shape)}")
    if tuple(conics.shape) != (C, N, 3):
        raise ValueError(f"conics must have shape [C, N, 3] with C={C}, N={N}, got {tuple(conics.shape)}")
    if tuple(opacities.shape) != (C, N) or tuple(depths.shape) != (C, N) or tuple(radii.shape) != (C, N, 2):
        raise ValueError("opacities and depths must be [C, N] and radii [C, N, 2] matching means2d")
    D = colors.shape[-1]
    if backgrounds is not None and tuple(backgrounds.shape) != (C, D):
        raise ValueError(f"backgrounds must have shape [C, D] with C={C}, D={D}, got {tuple(backgrounds.shape)}")
    if int(tile_size) <= 0 or int(width) <= 0 or int(height) <= 0:
        raise ValueError("width, height and tile_size must be positive")
    for name, t in (("means2d", means2d), ("conics", conics), ("colors", colors), ("opacities", opacities),
                    ("radii", radii), ("depths", depths)) + ((("backgrounds", backgrounds),) if backgrounds is not None else ()):
        if t.device.type != "cpu":
            raise ValueError(f"the native rasterizer runs on CPU tensors; {name} is on {t.device}")
    dt = means2d.dtype if means2d.dtype in (torch.float32, torch.float64) else torch.float32
    means2d, conics, colors, opacities = (t.to(dt).contiguous() for t in (means2d, conics, colors, opacities))
    if backgrounds is not None:
        backgrounds = backgrounds.to(dt).contiguous()
    width, height, tile_size = int(width), int(height), int(tile_size)
    with torch.no_grad():
        isect_offsets, flatten_ids, tiles_per_gauss = ext.bin_gaussians(
            means2d.detach(), radii.to(torch.int32).contiguous(), depths.detach().to(dt).contiguous(),
            width, height, tile_size,
        )
    render, alphas = _RasterizeToPixels.apply(
        means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, width, height, tile_size
    )
    extra = {"isect_offsets": isect_offsets, "flatten_ids": flatten_ids, "tiles_per_gauss": tiles_per_gauss}
    return render, alphas, extra
