"""CUDA tile rasterizer (``cuda_ext/cuda``): the fast GPU backend of ``rasterize_to_pixels``.

Contract (same for ``_native``):
    available() -> bool                 builds/loads the extension on first call, never raises
    load_error() -> str | None
    rasterize_to_pixels(means2d [C,N,2], conics [C,N,3], colors [C,N,D], opacities [C,N],
                        radii [C,N,2] int32, depths [C,N], width, height, backgrounds [C,D] | None,
                        *, tile_size=16) -> (render [C,H,W,D], alphas [C,H,W,1], extra: dict)
    differentiable w.r.t. means2d, conics, colors, opacities, backgrounds; blend rules in _common.

Algorithm (all cameras in one launch, tile ids offset by camera): per-Gaussian tile counts from the
opacity-aware radii, an inclusive scan, ``tile << 32 | depth`` keys emitted in Gaussian-index order
and sorted with CUB's stable radix sort (so depth ties keep ascending index, as in the torch twin),
per-tile ranges, then one 16x16-thread block per tile blending front to back through shared memory
with early termination. The backward pass walks each tile back to front, recovers the transmittance
per pixel and accumulates per-Gaussian gradients with warp reductions and atomics. float32 and
float64; any channel count D (1..4 register-resident, others through a generic kernel).

``extra`` holds ``n_isects`` (number of Gaussian-tile intersections).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

EXT_NAME = "studio_cuda_raster"
SOURCES = ["cuda/binning.cu", "cuda/raster_fwd.cu", "cuda/raster_bwd.cu", "cuda/binding.cpp"]
EXTRA_CUDA_CFLAGS = ["-O3"]  # torch adds -std and the -gencode of the visible GPUs

_ext = None
_error: str | None = None


def _load():
    """The compiled extension module; raises RuntimeError with the reason when unavailable."""
    global _ext, _error
    if _ext is not None:
        return _ext
    if _error is not None:
        raise RuntimeError(_error)
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")
        from studio import ext

        if ext.nvcc_path() is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH) to build the CUDA rasterizer")
        _ext = ext.load(EXT_NAME, SOURCES, cuda=True, extra_cuda_cflags=EXTRA_CUDA_CFLAGS)
    except Exception as e:  # noqa: BLE001 - available() must never raise
        _error = str(e) or repr(e)
        raise RuntimeError(_error) from e
    return _ext


def available() -> bool:
    """True when the CUDA extension is built and loadable (builds it on first call; never raises)."""
    try:
        _load()
    except Exception:
        return False
    return True


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    return _error


def _tile_size_ok(tile_size: int) -> bool:
    return isinstance(tile_size, int) and 0 < tile_size <= 32 and (tile_size * tile_size) % 32 == 0


class _RasterizeToPixels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, tile_ranges, gauss_ids, width, height,
                tile_size):
        ext = _load()
        bg = backgrounds if backgrounds is not None else means2d.new_empty((0,))
        render, alphas, final_t, last_idx = ext.rasterize_forward(
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
        v_means2d, v_conics, v_colors, v_opacities = _load().rasterize_backward(
            means2d, conics, colors, opacities, bg, tile_ranges, gauss_ids, final_t, last_idx, v_render, v_alphas,
            width, height, tile_size,
        )
        v_bg = None
        if ctx.has_bg and ctx.needs_input_grad[4]:
            v_bg = (v_render * final_t[..., None]).sum(dim=(1, 2))
        return v_means2d, v_conics, v_colors, v_opacities, v_bg, None, None, None, None, None


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
    ext = _load()
    # Binning is not differentiable: it only depends on the (detached) centres, radii and depths.
    tile_ranges, gauss_ids, n_isects = ext.bin_gaussians(
        means2d_c.detach(), radii.detach().to(torch.int32).contiguous(), depths.detach().to(dtype).contiguous(),
        width, height, tile_size,
    )
    bg = prep(backgrounds) if backgrounds is not None else None
    render, alphas = _RasterizeToPixels.apply(
        means2d_c, prep(conics), prep(colors), prep(opacities), bg, tile_ranges, gauss_ids, width, height, tile_size
    )
    return render, alphas, {"n_isects": int(n_isects)}
