"""Native (C++/OpenMP) and CUDA backends of the mesh rasterizer, built on first use by ``studio.ext``.

Both extensions expose the same two functions on *projected* vertices (``mesh.py`` projects in torch,
so autograd carries the gradients on to vertices, viewmats and Ks):

    rasterize_forward(verts_screen [C,V,3], faces [F,3] int32, width, height, near, far)
        -> face_id [C,H,W] int32 (-1 background), bary [C,H,W,3], depth [C,H,W] (0 background)
    rasterize_backward(verts_screen, faces, face_id, g_bary [C,H,W,3], g_depth [C,H,W], width, height)
        -> d verts_screen [C,V,3]

``verts_screen[..., :2]`` are pixel coordinates (centres at +0.5), ``verts_screen[..., 2]`` is the
view-space depth. The per-pixel math is ``cuda_ext/cuda/mesh_math.h`` (shared by both), the dense
reference is ``_mesh_torch.rasterize_screen_torch``.

* native: ``cuda_ext/cpu/mesh_raster.cpp`` (tile-binned z-buffer, OpenMP over tiles; deterministic
  backward with a pixel-ordered scatter).
* cuda: ``cuda_ext/cuda/mesh_raster.cu`` + ``mesh_binding.cpp``. Every (face, pixel-of-its-box) pair
  is one thread: pass 1 ``atomicMin`` of the depth's bit pattern (order-preserving for positive
  floats), pass 2 ``atomicMin`` of the face index among the pairs that hit that depth, so the winner is
  exactly the CPU's (smallest depth, then smallest index). The backward scatters with ``atomicAdd``
  (summation order, hence the last float bits of vertex gradients, may vary run to run).
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

NATIVE_NAME = "studio_native_mesh"
NATIVE_SOURCES = ["cpu/mesh_raster.cpp"]
# -ffp-contract=off: no fused multiply-adds, so the edge functions round exactly like the torch twin.
NATIVE_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
NATIVE_LDFLAGS = ["-fopenmp"]

CUDA_NAME = "studio_cuda_mesh"
CUDA_SOURCES = ["cuda/mesh_raster.cu", "cuda/mesh_binding.cpp"]
# --fmad=false: same rounding as the CPU backends (IEEE division is nvcc's default).
CUDA_CFLAGS = ["-O3", "--fmad=false"]

_state: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(kind: str) -> ModuleType:
    """The compiled extension ``kind`` ("native" or "cuda"); raises RuntimeError with the reason."""
    mod, err = _state.get(kind, (None, None))
    if mod is not None:
        return mod
    if err is not None:
        raise RuntimeError(err)
    try:
        from studio import ext

        if kind == "native":
            mod = ext.load(NATIVE_NAME, NATIVE_SOURCES, extra_cflags=NATIVE_CFLAGS, extra_ldflags=NATIVE_LDFLAGS)
        else:
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
            if ext.nvcc_path() is None:
                raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH) to build the CUDA mesh rasterizer")
            mod = ext.load(CUDA_NAME, CUDA_SOURCES, cuda=True, extra_cuda_cflags=CUDA_CFLAGS)
    except Exception as e:  # compiler missing, build failure, no GPU, ...
        msg = str(e) or repr(e)
        _state[kind] = (None, msg)
        raise RuntimeError(msg) from e
    _state[kind] = (mod, None)
    return mod


def available(kind: str) -> bool:
    """Whether extension ``kind`` builds and loads (attempted once per process; never raises)."""
    try:
        _load(kind)
        return True
    except Exception:  # noqa: BLE001 - available() must never raise
        return False


def load_error(kind: str) -> str | None:
    """Why extension ``kind`` is unavailable (``None`` if it loaded or was not tried yet)."""
    return _state.get(kind, (None, None))[1]


class _RasterizeScreen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, verts_screen, faces, width, height, near_plane, far_plane, kind):
        ext = _load(kind)
        fid, bary, depth = ext.rasterize_forward(verts_screen, faces, width, height, near_plane, far_plane)
        ctx.save_for_backward(verts_screen, faces, fid)
        ctx.dims = (width, height, kind)
        ctx.mark_non_differentiable(fid)
        return fid, bary, depth

    @staticmethod
    @once_differentiable
    def backward(ctx, g_fid, g_bary, g_depth):
        verts_screen, faces, fid = ctx.saved_tensors
        width, height, kind = ctx.dims
        dt = verts_screen.dtype
        g_bary = verts_screen.new_zeros(fid.shape + (3,)) if g_bary is None else g_bary
        g_depth = verts_screen.new_zeros(fid.shape) if g_depth is None else g_depth
        g_vs = _load(kind).rasterize_backward(verts_screen, faces, fid, g_bary.to(dt).contiguous(),
                                              g_depth.to(dt).contiguous(), width, height)
        return g_vs, None, None, None, None, None, None


def rasterize_screen(verts_screen: Tensor, faces: Tensor, width: int, height: int, near_plane: float,
                     far_plane: float, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterize projected vertices with extension ``kind``; returns (face_id int32, bary, depth).

    Differentiable w.r.t. ``verts_screen`` (analytic backward in the extension)."""
    dt = verts_screen.dtype if verts_screen.dtype in (torch.float32, torch.float64) else torch.float32
    vs = verts_screen.to(dt).contiguous()
    f32 = faces.to(torch.int32).contiguous()
    return _RasterizeScreen.apply(vs, f32, int(width), int(height), float(near_plane), float(far_plane), kind)
