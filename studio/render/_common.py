"""Shared pieces of the Gaussian rasterizer: projection, spherical harmonics and the blend rules.

Every backend (``torch``, ``native``, ``cuda``) runs the *same* projection and SH code below (plain
torch, so autograd carries gradients to means, quats, scales, SH and **viewmats**) and differs only in
how it evaluates ``rasterize_to_pixels``: the per-pixel front-to-back blend of projected 2D Gaussians.

Blend rules (identical in every backend, so parity tests are exact up to float rounding):

* pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)`` (gsplat's convention);
* ``sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy`` with ``conic = (a, b, c)`` the inverse 2D covariance and
  ``d = pixel - mean2d``; ``alpha = min(ALPHA_MAX, opacity * exp(-sigma))``;
* a Gaussian whose ``alpha < ALPHA_MIN`` (1/255) or ``sigma < 0`` contributes nothing to that pixel;
* Gaussians are visited in ascending view-space depth (ties: ascending index); before adding one,
  ``next_T = T * (1 - alpha)``; if ``next_T <= T_EPS`` (1e-4) the pixel stops and that Gaussian is not
  added (gsplat's early termination);
* ``color = sum_i c_i alpha_i T_i + T_final * background``, ``alphas = 1 - T_final``.

``radii`` are *opacity-aware* conservative half-extents: outside the box ``|dx| <= rx, |dy| <= ry``
the Gaussian's alpha is provably below ``ALPHA_MIN``, so tile binning in the fast backends is a pure
optimisation that never changes the image. This is a documented deviation from gsplat's fixed 3-sigma
box (gsplat evaluates a Gaussian on every pixel of every tile its 3-sigma box touches, so its image
depends on the tiling); ours does not.
"""
from __future__ import annotations

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_EPS = 1e-4
TILE_SIZE = 16

# Real spherical-harmonics constants (as in the 3DGS / gsplat reference implementations).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Normalised w-x-y-z quaternions ``[..., 4]`` to rotation matrices ``[..., 3, 3]``."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """``R S S^T R^T`` for w-x-y-z quaternions and activated scales: ``[N, 3, 3]``."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return _small_matmul(m, m.transpose(-1, -2))


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate real SH of ``degree`` at unit-normalised ``dirs [..., 3]`` with ``coeffs [..., K, D]``.

    Returns ``[..., D]`` *without* the +0.5 offset (callers add it, as gsplat does).
    """
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = SH_C0 * coeffs[..., 0, :]
    if degree < 1:
        return out
    x, y, z = (d[..., i : i + 1] for i in range(3))
    out = out - SH_C1 * y * coeffs[..., 1, :] + SH_C1 * z * coeffs[..., 2, :] - SH_C1 * x * coeffs[..., 3, :]
    if degree < 2:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (
        out
        + SH_C2[0] * xy * coeffs[..., 4, :]
        + SH_C2[1] * yz * coeffs[..., 5, :]
        + SH_C2[2] * (2 * zz - xx - yy) * coeffs[..., 6, :]
        + SH_C2[3] * xz * coeffs[..., 7, :]
        + SH_C2[4] * (xx - yy) * coeffs[..., 8, :]
    )
    if degree < 3:
        return out
    return (
        out
        + SH_C3[0] * y * (3 * xx - yy) * coeffs[..., 9, :]
        + SH_C3[1] * xy * z * coeffs[..., 10, :]
        + SH_C3[2] * y * (4 * zz - xx - yy) * coeffs[..., 11, :]
        + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[..., 12, :]
        + SH_C3[4] * x * (4 * zz - xx - yy) * coeffs[..., 13, :]
        + SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
        + SH_C3[6] * x * (xx - 3 * yy) * coeffs[..., 15, :]
    )


def _small_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Broadcast product of tiny matrices ``[...,i,k] @ [...,k,j]`` with elementwise ops (much faster than
    batched GEMM on the CPU for 2x3 / 3x3 blocks)."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def camera_centers(viewmats: Tensor) -> Tensor:
    """World-space camera centres ``-R^T t`` of world-to-camera matrices ``[C, 4, 4]`` -> ``[C, 3]``."""
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    return -(R.transpose(-1, -2) @ t[..., None])[..., 0]


def project_gaussians(
    means: Tensor,
    covars: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> dict[str, Tensor]:
    """EWA-project 3D Gaussians into every camera (gsplat's pinhole model, differentiable).

    ``means [N,3]``, ``covars [N,3,3]``, ``opacities [C,N]``, ``viewmats [C,4,4]``, ``Ks [C,3,3]``.
    Returns ``means2d [C,N,2]``, ``conics [C,N,3]``, ``depths [C,N]``, ``radii [C,N,2]`` (int32, 0 =
    culled) and ``covars2d [C,N,3]``. Culled Gaussians carry finite placeholder values and zero radii.
    """
    # Everything below is written per component on [C,N] tensors: tiny 3x3 products as batched GEMMs or
    # reductions over a size-3 axis are an order of magnitude slower on the CPU.
    r = [[viewmats[:, i, j, None] for j in range(3)] for i in range(3)]  # r[i][j]: [C,1]
    tr = [viewmats[:, i, 3, None] for i in range(3)]
    mx_, my_, mz_ = means[None, :, 0], means[None, :, 1], means[None, :, 2]  # [1,N]
    x = r[0][0] * mx_ + r[0][1] * my_ + r[0][2] * mz_ + tr[0]
    y = r[1][0] * mx_ + r[1][1] * my_ + r[1][2] * mz_ + tr[1]
    z = r[2][0] * mx_ + r[2][1] * my_ + r[2][2] * mz_ + tr[2]
    in_depth = (z > near_plane) & (z < far_plane)
    zs = torch.where(in_depth, z, torch.ones_like(z))

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # gsplat clamps the Jacobian's x/z, y/z slightly beyond the frustum for stability off-screen.
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = zs * torch.minimum(lim_xp, torch.maximum(-lim_xn, x / zs))
    ty = zs * torch.minimum(lim_yp, torch.maximum(-lim_yn, y / zs))
    j00, j02 = fx / zs, -fx * tx / (zs * zs)
    j11, j12 = fy / zs, -fy * ty / (zs * zs)
    # M = J R (2x3 per Gaussian and camera)
    m0 = [j00 * r[0][k] + j02 * r[2][k] for k in range(3)]
    m1 = [j11 * r[1][k] + j12 * r[2][k] for k in range(3)]
    S = [[covars[None, :, i, j] for j in range(3)] for i in range(3)]  # [1,N]
    ms0 = [m0[0] * S[0][k] + m0[1] * S[1][k] + m0[2] * S[2][k] for k in range(3)]
    ms1 = [m1[0] * S[0][k] + m1[1] * S[1][k] + m1[2] * S[2][k] for k in range(3)]
    cov_xx = ms0[0] * m0[0] + ms0[1] * m0[1] + ms0[2] * m0[2]
    cov_xy = ms0[0] * m1[0] + ms0[1] * m1[1] + ms0[2] * m1[2]
    cov_yy = ms1[0] * m1[0] + ms1[1] * m1[1] + ms1[2] * m1[2]
    a = cov_xx + eps2d
    b = cov_xy
    c = cov_yy + eps2d
    det = a * c - b * b
    ok_det = det > 0
    dets = torch.where(ok_det, det, torch.ones_like(det))
    conics = torch.stack([c / dets, -b / dets, a / dets], dim=-1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)

    with torch.no_grad():
        # Opacity-aware extent: alpha = o exp(-sigma) < 1/255 outside the ellipse sigma = ln(255 o).
        o = opacities.detach()
        visible = o >= ALPHA_MIN
        k = 2.0 * torch.log(torch.clamp(o / ALPHA_MIN, min=1.0))
        rx = torch.ceil(torch.sqrt(k * a.detach().clamp_min(0)) + 1.0)
        ry = torch.ceil(torch.sqrt(k * c.detach().clamp_min(0)) + 1.0)
        mx, my = means2d.detach().unbind(-1)
        on_screen = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        keep = in_depth & ok_det & visible & on_screen & torch.isfinite(rx) & torch.isfinite(ry)
        # Guard int32 overflow for absurdly large splats; the box is clipped to the image anyway.
        big = float(4 * max(width, height) + 16)
        radii = torch.stack([rx.clamp(max=big), ry.clamp(max=big)], dim=-1).to(torch.int32)
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii))

    return {
        "means2d": means2d,
        "conics": conics,
        "depths": z,
        "radii": radii,
        "covars2d": torch.stack([a, b, c], dim=-1),
    }
