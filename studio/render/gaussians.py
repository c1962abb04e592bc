"""``rasterize_gaussians``: a gsplat-compatible, differentiable 3D Gaussian splatting renderer.

Conventions follow ``gsplat.rasterization``: quaternions w-x-y-z (need not be normalised), *activated*
scales and opacities, world-to-camera ``viewmats [C,4,4]``, intrinsics ``Ks [C,3,3]``, output
``(colors [C,H,W,D], alphas [C,H,W,1], meta)``. Gradients flow to means, quats, scales, opacities,
colors / SH coefficients, backgrounds **and viewmats** in every backend. For ``torch`` and ``cuda``
projection and SH run in torch (see ``_common``) and only the pixel blend differs; ``native`` runs projection, SH,
binning and blend in C++, forward and backward (``_gaussians_ext.native_render``; its ``meta["means2d"]`` is a
gradient tap whose ``.grad`` is d loss / d means2d, and its meta tensors carry no graph).

Backends
    ``torch``   dense reference twin (slow, chunked, obviously correct)
    ``native``  our C++/OpenMP tile rasterizer with analytic backward (``cuda_ext/``)
    ``cuda``    our CUDA kernels of the same algorithm (``cuda_ext/``)
    ``gsplat``  delegate to gsplat when it and CUDA are available (3-sigma tiling; see ``_common``)
    ``auto``    CUDA tensors -> cuda (then gsplat), CPU -> native, else torch
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _common
from ..errors import warn_once
from ._common import TILE_SIZE, camera_centers, covariance_3d, eval_sh, project_gaussians
from ._common import SH_C0, num_sh_bases, quat_to_rotmat  # noqa: F401 - the SH / quaternion conventions, for students
from ._gaussians_torch import rasterize_to_pixels_torch

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
BACKENDS = ("auto", "torch", "native", "cuda", "gsplat")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(name: str, x: Any, shape_desc: str, ndim: tuple[int, ...], last: tuple[int | None, ...] = ()):
    _check(isinstance(x, Tensor), f"{name} must be a torch.Tensor of shape {shape_desc}, got {type(x).__name__}")
    _check(x.dim() in ndim, f"{name} must have shape {shape_desc}, got {tuple(x.shape)}")
    for i, want in enumerate(last):
        if want is not None:
            _check(
                x.shape[x.dim() - len(last) + i] == want,
                f"{name} must have shape {shape_desc}, got {tuple(x.shape)}",
            )
    _check(x.is_floating_point(), f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _validate(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
              render_mode, backend, near_plane, far_plane, eps2d):
    _check_tensor("means", means, "[N, 3]", (2,), (None, 3))
    N = means.shape[0]
    _check_tensor("quats", quats, f"[N, 4] with N={N}", (2,), (N, 4))
    _check_tensor("scales", scales, f"[N, 3] with N={N}", (2,), (N, 3))
    _check_tensor("opacities", opacities, f"[N] with N={N}", (1,), (N,))
    _check_tensor("viewmats", viewmats, "[C, 4, 4]", (3,), (None, 4, 4))
    C = viewmats.shape[0]
    _check(C >= 1, "viewmats must hold at least one camera: shape [C, 4, 4] with C >= 1")
    _check_tensor("Ks", Ks, f"[C, 3, 3] with C={C}", (3,), (C, 3, 3))
    _check(isinstance(width, int) and width > 0, f"width must be a positive int, got {width!r}")
    _check(isinstance(height, int) and height > 0, f"height must be a positive int, got {height!r}")
    _check(render_mode in RENDER_MODES, f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(0 <= near_plane < far_plane, f"need 0 <= near_plane < far_plane, got {near_plane}, {far_plane}")
    _check(eps2d >= 0, f"eps2d must be >= 0, got {eps2d}")
    if sh_degree is None:
        _check_tensor("colors", colors, f"[N, D] or [C, N, D] with C={C}, N={N}", (2, 3))
        _check(colors.shape[-2] == N and (colors.dim() == 2 or colors.shape[0] == C),
               f"colors must have shape [N, D] or [C, N, D] with C={C}, N={N}, got {tuple(colors.shape)}")
        D = colors.shape[-1]
    else:
        _check(isinstance(sh_degree, int) and 0 <= sh_degree <= 3, f"sh_degree must be an int in 0..3, got {sh_degree!r}")
        K = _common.num_sh_bases(sh_degree)
        _check_tensor("colors", colors, f"SH coefficients [N, K, 3] or [C, N, K, 3] with K >= {K}", (3, 4))
        _check(colors.shape[-3] == N and colors.shape[-2] >= K and (colors.dim() == 3 or colors.shape[0] == C),
               f"colors must be SH coefficients [N, K, D] or [C, N, K, D] with N={N}, K >= {K} for sh_degree="
               f"{sh_degree}, got {tuple(colors.shape)}")
        D = colors.shape[-1]
    if backgrounds is not None:
        _check_tensor("backgrounds", backgrounds, f"[C, D] with C={C}, D={D}", (2,), (C, D))
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
               "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        _check(t.device == means.device, f"{name} is on {t.device} but means is on {means.device}; move all inputs to one device")
        _check(t.dtype == means.dtype, f"{name} has dtype {t.dtype} but means has {means.dtype}; use one float dtype")
    return N, C, D


def _check_finite(**tensors) -> None:
    """The input check for NaN / Inf (the fused native path makes the same check, with the same message, inside its
    projection loop: ``render_forward`` in ``cuda_ext/cpu/rasterize.cpp``, one pass less over the inputs)."""
    for name, t in tensors.items():
        if t is not None:
            _check(bool(torch.isfinite(t).all()), f"{name} contains NaN or Inf values; check the values you pass")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the blend backend for ``device`` (see module docstring); warns once on fallbacks."""
    from ._gaussians_ext import cuda, native

    if backend == "auto":
        if device.type == "cuda":
            if cuda.available():
                return "cuda"
            if _gsplat_available():
                return "gsplat"
            warn_once("auto-cuda", "CUDA extension unavailable; falling back to the slow torch rasterizer")
            return "torch"
        if device.type == "cpu" and native.available():
            return "native"
        return "torch"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got tensors on {device}; use backend='cuda' or 'auto'")
        if not native.available():
            warn_once("native", f"native C++ rasterizer unavailable ({native.load_error()}); using the torch backend")
            return "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}; use backend='native' or 'auto'")
        if not cuda.available():
            raise RuntimeError(f"CUDA rasterizer unavailable: {cuda.load_error()}; run `studio doctor`")
    if backend == "gsplat" and not (_gsplat_available() and device.type == "cuda"):
        raise ValueError("backend='gsplat' needs `pip install gsplat` and CUDA tensors; use backend='auto'")
    return backend


def _gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    render_mode: str = "RGB",
    eps2d: float = 0.3,
    backend: str = "auto",
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render 3D Gaussians into ``C`` cameras.

    Args mirror ``gsplat.rasterization``. ``colors`` is ``[N,D]`` / ``[C,N,D]`` features of any width
    (RGB, latents, normals) or, with ``sh_degree``, SH coefficients ``[N,K,3]`` / ``[C,N,K,3]``
    (view-dependent colour ``max(SH(dir) + 0.5, 0)`` as in gsplat). ``render_mode`` "D" renders
    accumulated depth, "ED" expected depth (``D / alpha``), "RGB+D"/"RGB+ED" append it as the last
    channel (backgrounds apply to the colour channels only).

    Returns ``(colors [C,H,W,D'], alphas [C,H,W,1], meta)`` with meta keys ``means2d`` ``[C,N,2]`` (a
    tensor in the graph: call ``retain_grad()`` to read screen-space gradients), ``radii [C,N,2]``,
    ``depths``, ``conics``, ``opacities``, ``width``, ``height``, ``tile_size``, ``n_cameras``,
    ``backend``. Bad inputs raise ``ValueError`` naming the argument and the expected shape.
    """
    N, C, D = _validate(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                        backgrounds, render_mode, backend, near_plane, far_plane, eps2d)
    backend = resolve_backend(backend, means.device)
    from ._gaussians_ext import native_fused_enabled, native_render

    fused = backend == "native" and N > 0 and native_fused_enabled()
    if not fused:  # the fused native path checks inside its projection loop
        _check_finite(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats,
                      Ks=Ks, backgrounds=backgrounds)
    elif render_mode in ("D", "ED"):  # depth only: the fused call does not take the backgrounds
        _check_finite(backgrounds=backgrounds)
    if backend == "gsplat":
        import gsplat

        return gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=sh_degree,
            backgrounds=backgrounds, near_plane=near_plane, far_plane=far_plane, render_mode=render_mode,
            eps2d=eps2d, tile_size=tile_size,
        )

    if fused:
        render, alphas, proj, extra = native_render(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=sh_degree,
            backgrounds=backgrounds, render_mode=render_mode, near_plane=near_plane, far_plane=far_plane,
            eps2d=eps2d, tile_size=tile_size)
        if render_mode in ("ED", "RGB+ED"):
            render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp_min(1e-10)], dim=-1)
        return render, alphas, _meta(proj, proj["opacities"], width, height, tile_size, C, "native", extra)

    from ._gaussians_ext import cuda_fused_projection_enabled

    if backend == "cuda" and N > 0 and cuda_fused_projection_enabled():
        return _render_cuda_fused_projection(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                             sh_degree, backgrounds, near_plane, far_plane, render_mode, eps2d,
                                             tile_size, C)

    covars = covariance_3d(quats, scales)
    opac_c = opacities[None].expand(C, N)
    proj = project_gaussians(means, covars, opac_c, viewmats, Ks, width, height,
                             near_plane=near_plane, far_plane=far_plane, eps2d=eps2d)

    if sh_degree is not None:
        K = _common.num_sh_bases(sh_degree)
        coeffs = colors[..., :K, :]
        dirs = means[None] - camera_centers(viewmats)[:, None]  # [C,N,3]
        feats = torch.clamp_min(eval_sh(sh_degree, dirs, coeffs if coeffs.dim() == 4 else coeffs[None]) + 0.5, 0.0)
        feats = feats.expand(C, N, D)
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(C, N, D)

    bgs = backgrounds
    depth_feat = proj["depths"][..., None]
    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depth_feat], dim=-1)
        if bgs is not None:
            bgs = torch.cat([bgs, torch.zeros_like(bgs[:, :1])], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depth_feat
        bgs = None

    blend_args = (proj["means2d"], proj["conics"], feats.contiguous(), opac_c, proj["radii"], proj["depths"],
                  width, height, bgs)
    if N == 0:
        backend = "torch"  # nothing to tile; the dense twin handles the empty set exactly
    if backend == "torch":
        render, alphas = rasterize_to_pixels_torch(*blend_args)
        extra: dict[str, Any] = {}
    elif backend == "native":
        from ._gaussians_ext import native

        render, alphas, extra = native.rasterize_to_pixels(*blend_args, tile_size=tile_size)
    else:
        from ._gaussians_ext import cuda

        render, alphas, extra = cuda.rasterize_to_pixels(*blend_args, tile_size=tile_size)

    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp_min(1e-10)], dim=-1)

    return render, alphas, _meta(proj, opac_c, width, height, tile_size, C, backend, extra)


def _render_cuda_fused_projection(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                                  backgrounds, near_plane, far_plane, render_mode, eps2d, tile_size, C):
    """Backend "cuda" with ``$STUDIO_CUDA_FUSED_PROJECTION=1``: projection + SH in CUDA kernels (cuda_project),
    then the CUDA blend; the same outputs as the torch projection path below it."""
    from ._gaussians_ext import cuda, cuda_project

    depth_mode = 2 if render_mode in ("D", "ED") else 1 if render_mode in ("RGB+D", "RGB+ED") else 0
    proj, feats = cuda_project(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                               sh_degree=sh_degree, depth_mode=depth_mode, near_plane=near_plane,
                               far_plane=far_plane, eps2d=eps2d)
    bgs = backgrounds
    if depth_mode == 1 and bgs is not None:
        bgs = torch.cat([bgs, torch.zeros_like(bgs[:, :1])], dim=-1)
    elif depth_mode == 2:
        bgs = None
    render, alphas, extra = cuda.rasterize_to_pixels(proj["means2d"], proj["conics"], feats, proj["opacities"],
                                                     proj["radii"], proj["depths"], width, height, bgs,
                                                     tile_size=tile_size)
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp_min(1e-10)], dim=-1)
    return render, alphas, _meta(proj, proj["opacities"], width, height, tile_size, C, "cuda", extra)


def _meta(proj: dict[str, Any], opac_c: Tensor, width: int, height: int, tile_size: int, C: int, backend: str,
          extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "means2d": proj["means2d"],
        "radii": proj["radii"],
        "depths": proj["depths"],
        "conics": proj["conics"],
        "opacities": opac_c,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "tile_width": math.ceil(width / tile_size),
        "tile_height": math.ceil(height / tile_size),
        "n_cameras": C,
        "backend": backend,
        **extra,
    }
