"""The compiled backends of ``rasterize_to_pixels``: the native C++/OpenMP tile rasterizer (``cuda_ext/cpu``)
and the CUDA one (``cuda_ext/cuda``), built on first use by :mod:`studio.ext`.

Each backend is a :class:`Backend` handle, :data:`native` and :data:`cuda`, with one contract:

    available() -> bool                 builds/loads the extension on first call, never raises
    load_error() -> str | None
    sources                             its source files, relative to ``cuda_ext/``
    rasterize_to_pixels(means2d [C,N,2], conics [C,N,3], colors [C,N,D], opacities [C,N],
                        radii [C,N,2] int32, depths [C,N], width, height, backgrounds [C,D] | None,
                        *, tile_size=16) -> (render [C,H,W,D], alphas [C,H,W,1], extra: dict)
    differentiable w.r.t. means2d, conics, colors, opacities, backgrounds; blend rules in ``_common``; the
    dense reference is ``_gaussians_torch.rasterize_to_pixels_torch``.

**native** (``cuda_ext/cpu/rasterize.cpp``, one C++ call per stage for all cameras; CPU tensors):

* ``bin_gaussians``: per camera, the visible Gaussians (both radii > 0) are stably sorted by depth
  and appended to the lists of every tile their radii box touches. The radii are conservative
  (outside the box alpha < ALPHA_MIN), so binning never changes the image.
* ``rasterize_forward``: OpenMP over (camera, tile), front-to-back blend with early termination;
  keeps the per-pixel final transmittance and the number of list entries consumed.
* ``rasterize_backward``: analytic, back-to-front per pixel (``T_i = T_{i+1} / (1 - alpha_i)``);
  per-intersection gradient records (race free) reduced per Gaussian deterministically.

Its ``extra`` holds the binning: ``isect_offsets [C,th,tw]`` (int32 start of each tile's list in
``flatten_ids``), ``flatten_ids [M]`` (int32 ``c*N + n``, depth ordered within a tile) and
``tiles_per_gauss [C,N]`` (int32).

**native, fused** (what ``rasterize_gaussians(..., backend="native")`` runs; ``cuda_ext/cpu/project.h``,
``blend_simd.h``): one autograd Function from Gaussians to the image. ``render_forward`` projects every
(camera, Gaussian) and evaluates its SH colour in C++ (the formulas of ``_common``), bins, and blends;
``render_backward`` runs the blend backward and then the projection and SH backward, returning gradients for means,
quats, scales, opacities, colours / SH, viewmats and backgrounds (Ks get none). The float32 blend for 1, 3 or 4
channels is vectorised over pixels: per tile, groups of 8 pixels of a row each walk the tile-list entries whose box
touches them, with their state in registers (transmittance in double, as the reference kernels) and early
termination per group; the backward sums each entry's terms over a group's lanes into a per-entry accumulator and
writes the entry's record once (no atomics, deterministic). It runs where the CPU has AVX2 and FMA (checked at run time);
elsewhere, and for float64 and other channel counts, the fused path blends with the reference kernels above
(``$STUDIO_NATIVE_SIMD``: ``scalar`` forces them, ``generic`` runs the baseline-ISA build of the vector kernels). ``$STUDIO_NATIVE_FUSED=0`` switches ``backend="native"`` back
to the reference path (torch projection + SH, then ``rasterize_to_pixels`` above), kept for comparisons
(``benchmarks/render.py --native-vs-ref``).

**cuda** (``cuda_ext/cuda``; CUDA tensors): all cameras in one launch, tile ids offset by camera: per-Gaussian
tile counts from the opacity-aware radii, an inclusive scan, ``tile << 32 | depth`` keys emitted in
Gaussian-index order and sorted with CUB's stable radix sort (so depth ties keep ascending index, as in the
torch twin), per-tile ranges, then one 16x16-thread block per tile blending front to back through shared
memory with early termination. The backward pass walks each tile back to front, recovers the transmittance
per pixel and accumulates per-Gaussian gradients with warp reductions and atomics. float32 and float64; any
channel count D (1..4 register-resident, others through a generic kernel). Its ``extra`` holds ``n_isects``
(number of Gaussian-tile intersections).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from studio import ext

from ._common import TILE_SIZE

NATIVE_NAME = "studio_native_raster"
NATIVE_SOURCES = ["cpu/rasterize.cpp"]
NATIVE_CFLAGS = ["-O3", "-fopenmp"]
NATIVE_LDFLAGS = ["-fopenmp"]

CUDA_NAME = "studio_cuda_raster"
CUDA_SOURCES = ["cuda/binning.cu", "cuda/raster_fwd.cu", "cuda/raster_bwd.cu", "cuda/project.cu", "cuda/binding.cpp"]
CUDA_CFLAGS = ["-O3"]  # torch adds -std and the -gencode of the visible GPUs


@dataclass
class Backend:
    """One compiled backend of ``rasterize_to_pixels`` (see the module doc)."""

    name: str
    sources: list[str]
    available: Callable[[], bool]
    load_error: Callable[[], str | None]
    rasterize_to_pixels: Callable[..., tuple[Tensor, Tensor, dict[str, Any]]]


# ------------------------------------------------------------------------------------------------ native
_NATIVE = ext.Extension(NATIVE_NAME, NATIVE_SOURCES, extra_cflags=NATIVE_CFLAGS, extra_ldflags=NATIVE_LDFLAGS)


class _NativeRasterizeToPixels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, width, height,
                tile_size):
        lib = _NATIVE.load()
        bg = backgrounds if backgrounds is not None else means2d.new_empty((0,))
        render, alphas, t_final, last = lib.rasterize_forward(
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
        gm, gq, gc, go, gb = _NATIVE.load().rasterize_backward(
            means2d, conics, colors, opacities, bg, offsets, flat, t_final, last, g_render, g_alphas,
            width, height, tile_size,
        )
        return gm, gq, gc, go, (gb if ctx.has_bg else None), None, None, None, None, None


def _native_rasterize_to_pixels(
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
    lib = _NATIVE.load()
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
        isect_offsets, flatten_ids, tiles_per_gauss = lib.bin_gaussians(
            means2d.detach(), radii.to(torch.int32).contiguous(), depths.detach().to(dt).contiguous(),
            width, height, tile_size,
        )
    render, alphas = _NativeRasterizeToPixels.apply(
        means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids, width, height, tile_size
    )
    extra = {"isect_offsets": isect_offsets, "flatten_ids": flatten_ids, "tiles_per_gauss": tiles_per_gauss}
    return render, alphas, extra


# ------------------------------------------------------------------------------------------ native, fused
DEPTH_MODES = {"RGB": 0, "RGB+D": 1, "RGB+ED": 1, "D": 2, "ED": 2}


def native_fused_enabled() -> bool:
    """The fused native path is on unless ``$STUDIO_NATIVE_FUSED`` is ``0`` (read on every call); off, backend
    ``native`` runs the reference path: torch projection + SH, then the native blend above."""
    return os.environ.get("STUDIO_NATIVE_FUSED", "1") != "0"


def native_simd_isa() -> str:
    """Which blend the fused path runs now: ``avx2`` (the default where the CPU has AVX2 and FMA), ``scalar`` (the
    reference kernels: the default elsewhere, or ``$STUDIO_NATIVE_SIMD=scalar``) or ``generic`` (the baseline build of
    the vector kernels, ``$STUDIO_NATIVE_SIMD=generic``, for tests: ~3x slower than the scalar kernels)."""
    return _NATIVE.load().simd_isa()


class _NativeRender(torch.autograd.Function):
    """Gaussians -> image in one C++ call (projection, SH, binning, blend) and back in one."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, tap, settings, keep):
        lib = _NATIVE.load()
        bg = backgrounds if backgrounds is not None else means.new_empty((0,))
        out = lib.render_forward(means, quats, scales, opacities, colors, viewmats, Ks, bg, *settings, keep)
        (render, alphas, means2d, conics, depths, radii, feats, opac, offsets, flat, tpg, t_final, last, *kept) = out
        ctx.save_for_backward(means, quats, scales, opacities, colors, viewmats, Ks, bg, means2d, conics, feats,
                              opac, radii, offsets, flat, t_final, last, *kept)
        ctx.settings = settings
        ctx.has_bg = backgrounds is not None
        ctx.mark_non_differentiable(means2d, conics, depths, radii, opac, offsets, flat, tpg)
        return render, alphas, means2d, conics, depths, radii, opac, offsets, flat, tpg

    @staticmethod
    @once_differentiable
    def backward(ctx, g_render, g_alphas, *_unused):
        (means, quats, scales, opacities, colors, viewmats, Ks, bg, means2d, conics, feats, opac, radii, offsets,
         flat, t_final, last, *kept) = ctx.saved_tensors
        dt = means.dtype
        if g_render is None:
            g_render = t_final.new_zeros(*t_final.shape, feats.shape[-1])
        g_render = g_render.to(dt).contiguous()
        g_alphas = torch.zeros_like(t_final) if g_alphas is None else g_alphas.to(dt).contiguous()
        width, height, tile_size, sh_degree, depth_mode, near, far, eps2d = ctx.settings
        gm, gq, gs, go, gc, gv, gb, gm2 = _NATIVE.load().render_backward(
            means, quats, scales, opacities, colors, viewmats, Ks, bg, means2d, conics, feats, opac, radii, offsets,
            flat, t_final, last, *kept, g_render, g_alphas, width, height, tile_size, sh_degree, depth_mode, near, far, eps2d,
        )
        return gm, gq, gs, go, gc, gv, None, (gb if ctx.has_bg else None), gm2, None, None


def native_render(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor,
                  Ks: Tensor, width: int, height: int, *, sh_degree: int | None, backgrounds: Tensor | None,
                  render_mode: str, near_plane: float, far_plane: float, eps2d: float, tile_size: int):
    """The fused native path of ``rasterize_gaussians`` (inputs already validated there; CPU tensors of one float
    dtype). Returns ``(render [C,H,W,Dt], alphas [C,H,W,1], proj, extra)``: for ``ED`` modes the last channel is
    still accumulated depth (the caller divides). ``proj`` holds ``means2d`` (see below), ``conics``, ``depths``,
    ``radii``, ``opacities`` as values (no graph: their gradients flow inside the fused backward).

    ``proj["means2d"]``, when gradients are on, is a *gradient tap*: a leaf holding the projected centres whose
    ``.grad`` receives d loss / d means2d (what densification reads), exactly as ``retain_grad()`` on the torch
    path's ``means2d``; using it in another loss term does not carry gradients back to ``means``.
    """
    dt = means.dtype if means.dtype in (torch.float32, torch.float64) else torch.float32
    C, N = viewmats.shape[0], means.shape[0]
    depth_mode = DEPTH_MODES[render_mode]
    if depth_mode == 2:
        backgrounds = None
    elif depth_mode == 1 and backgrounds is not None:
        backgrounds = torch.cat([backgrounds, torch.zeros_like(backgrounds[:, :1])], dim=-1)
    inputs = [t.to(dt).contiguous() for t in (means, quats, scales, opacities, colors, viewmats, Ks)]
    if backgrounds is not None:
        backgrounds = backgrounds.to(dt).contiguous()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means, quats, scales, opacities, colors, viewmats)
                                           + ((backgrounds,) if backgrounds is not None else ()))
    tap = torch.zeros(C, N, 2, dtype=dt, requires_grad=True) if grad else None
    settings = (int(width), int(height), int(tile_size), -1 if sh_degree is None else int(sh_degree), depth_mode,
                float(near_plane), float(far_plane), float(eps2d))
    render, alphas, means2d, conics, depths, radii, opac, offsets, flat, tpg = _NativeRender.apply(
        *inputs, backgrounds, tap, settings, grad)
    if tap is not None:
        with torch.no_grad():
            tap.copy_(means2d)
        means2d = tap
    proj = {"means2d": means2d, "conics": conics, "depths": depths, "radii": radii, "opacities": opac}
    extra = {"isect_offsets": offsets, "flatten_ids": flat, "tiles_per_gauss": tpg}
    return render, alphas, proj, extra


# -------------------------------------------------------------------------------------------------- cuda
_cuda_ext = None
_cuda_error: str | None = None


def _cuda_load():
    """The compiled CUDA extension module; raises RuntimeError with the reason when unavailable."""
    global _cuda_ext, _cuda_error
    if _cuda_ext is not None:
        return _cuda_ext
    if _cuda_error is not None:
        raise RuntimeError(_cuda_error)
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")

        if ext.nvcc_path() is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH) to build the CUDA rasterizer")
        _cuda_ext = ext.load(CUDA_NAME, CUDA_SOURCES, cuda=True, extra_cuda_cflags=CUDA_CFLAGS)
    except Exception as e:  # noqa: BLE001 - available() must never raise
        _cuda_error = str(e) or repr(e)
        raise RuntimeError(_cuda_error) from e
    return _cuda_ext


def _cuda_available() -> bool:
    """True when the CUDA extension is built and loadable (builds it on first call; never raises)."""
    try:
        _cuda_load()
    except Exception:
        return False
    return True


def _cuda_load_error() -> str | None:
    """Why the CUDA extension is unavailable (None when it loaded or was not tried yet)."""
    return _cuda_error


def _tile_size_ok(tile_size: int) -> bool:
    return isinstance(tile_size, int) and 0 < tile_size <= 32 and (tile_size * tile_size) % 32 == 0


class _CudaRasterizeToPixels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids, width, height,
                tile_size):
        lib = _cuda_load()
        bg = backgrounds if backgrounds is not None else means2d.new_empty((0,))
        render, alphas, final_t, last_idx = lib.rasterize_forward(
            means2d, conics, colors, opacities, bg, tile_ranges, gauss_ids, width, height, tile_size
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, bg, tile_ranges, gauss_ids, final_t, last_idx)
        ctx.geometry = (width, height, tile_size)
        ctx.has_bg = backgrounds is not None
        return render, alphas

    @staticmethod
    def backward(ctx, v_render, v_alphas):
        means2d, conics, colors, opacities, bg, tile_ranges, gauss_ids, final_t, last_idx = ctx.saved_tensors
        width, height, tile_size = ctx.geometry
        if v_render is None:
            v_render = torch.zeros(final_t.shape + (colors.shape[-1],), device=final_t.device, dtype=final_t.dtype)
        v_render = v_render.to(final_t.dtype).contiguous()
        v_alphas = v_alphas.to(final_t.dtype).contiguous() if v_alphas is not None else means2d.new_empty((0,))
        v_means2d, v_conics, v_colors, v_opacities = _cuda_load().rasterize_backward(
            means2d, conics, colors, opacities, bg, tile_ranges, gauss_ids, final_t, last_idx, v_render, v_alphas,
            width, height, tile_size,
        )
        v_bg = None
        if ctx.has_bg and ctx.needs_input_grad[4]:
            v_bg = (v_render * final_t[..., None]).sum(dim=(1, 2))
        return v_means2d, v_conics, v_colors, v_opacities, v_bg, None, None, None, None, None


def _cuda_rasterize_to_pixels(
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
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Blend projected Gaussians on the GPU (see module docstring); same outputs as the torch twin."""
    if not _tile_size_ok(tile_size):
        raise ValueError(f"cuda backend: tile_size must be <= 32 with tile_size**2 a multiple of 32 (8, 16, ...), "
                         f"got {tile_size!r}")
    if means2d.device.type != "cuda":
        raise ValueError(f"cuda backend needs CUDA tensors, got {means2d.device}")
    dtype = means2d.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cuda backend supports float32 and float64, got {dtype}")
    C, N = means2d.shape[0], means2d.shape[1]
    if colors.dim() != 3 or tuple(colors.shape[:2]) != (C, N):
        raise ValueError(f"colors must be [C,N,D] with C={C}, N={N}, got {tuple(colors.shape)}")
    width, height, tile_size = int(width), int(height), int(tile_size)

    def prep(t: Tensor) -> Tensor:
        return t.to(dtype=dtype).contiguous()

    means2d_c = prep(means2d)
    lib = _cuda_load()
    # Binning is not differentiable: it only depends on the (detached) centres, radii and depths.
    tile_ranges, gauss_ids, n_isects = lib.bin_gaussians(
        means2d_c.detach(), radii.detach().to(torch.int32).contiguous(), depths.detach().to(dtype).contiguous(),
        width, height, tile_size,
    )
    bg = prep(backgrounds) if backgrounds is not None else None
    render, alphas = _CudaRasterizeToPixels.apply(
        means2d_c, prep(conics), prep(colors), prep(opacities), bg, tile_ranges, gauss_ids, width, height, tile_size
    )
    return render, alphas, {"n_isects": int(n_isects)}


# ----------------------------------------------------------------------- cuda: projection + SH (project.cu)


def cuda_fused_projection_enabled() -> bool:
    """Backend ``cuda`` projects and evaluates SH with the CUDA kernels (cuda_ext/cuda/project_kernels.cuh, the
    maths of the CPU fused path) instead of torch only when ``$STUDIO_CUDA_FUSED_PROJECTION`` is ``1`` (read on
    every call). Off by default: the kernels are tested under CPU emulation but have not yet run on a GPU."""
    return os.environ.get("STUDIO_CUDA_FUSED_PROJECTION", "0") == "1"


class _CudaProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, settings):
        lib = _cuda_load()
        means2d, conics, depths, radii, feats, opac = lib.project_forward(means, quats, scales, opacities, colors,
                                                                          viewmats, Ks, *settings)
        ctx.save_for_backward(means, quats, scales, opacities, colors, viewmats, Ks, radii)
        ctx.settings = settings
        ctx.mark_non_differentiable(radii)
        return means2d, conics, depths, radii, feats, opac

    @staticmethod
    @once_differentiable
    def backward(ctx, v_means2d, v_conics, v_depths, _v_radii, v_feats, v_opac):
        means, quats, scales, opacities, colors, viewmats, Ks, radii = ctx.saved_tensors
        C, N = radii.shape[0], radii.shape[1]
        dm = ctx.settings[3]
        Dt = 1 if dm == 2 else colors.shape[-1] + int(dm == 1)

        def grad(t, shape):
            return means.new_zeros(shape) if t is None else t.to(means.dtype).contiguous()

        v_depths = means.new_empty((0,)) if v_depths is None else v_depths.to(means.dtype).contiguous()
        v = _cuda_load().project_backward(means, quats, scales, opacities, colors, viewmats, Ks, radii,
                                          grad(v_means2d, (C, N, 2)), grad(v_conics, (C, N, 3)),
                                          grad(v_feats, (C, N, Dt)), grad(v_opac, (C, N)), v_depths,
                                          *ctx.settings)
        return (*v, None, None)


def cuda_project(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor,
                 Ks: Tensor, width: int, height: int, *, sh_degree: int | None, depth_mode: int, near_plane: float,
                 far_plane: float, eps2d: float) -> tuple[dict[str, Tensor], Tensor]:
    """Projection + SH on the GPU (differentiable; Ks get no gradient): ``({means2d, conics, depths, radii,
    opacities [C,N]}, feats [C,N,Dt])`` with the depth channel per ``depth_mode`` (0 none, 1 appended, 2 only),
    the same values as ``project_gaussians`` + ``eval_sh`` (gaussians.py's torch path)."""
    if means.device.type != "cuda":
        raise ValueError(f"cuda projection needs CUDA tensors, got {means.device}")
    dtype = means.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cuda projection supports float32 and float64, got {dtype}")
    prep = [t.to(dtype).contiguous() for t in (means, quats, scales, opacities, colors, viewmats, Ks)]
    settings = (int(width), int(height), -1 if sh_degree is None else int(sh_degree), int(depth_mode),
                float(near_plane), float(far_plane), float(eps2d))
    means2d, conics, depths, radii, feats, opac = _CudaProject.apply(*prep, settings)
    return dict(means2d=means2d, conics=conics, depths=depths, radii=radii, opacities=opac), feats


native = Backend("native", NATIVE_SOURCES, _NATIVE.available, _NATIVE.load_error, _native_rasterize_to_pixels)
cuda = Backend("cuda", CUDA_SOURCES, _cuda_available, _cuda_load_error, _cuda_rasterize_to_pixels)
