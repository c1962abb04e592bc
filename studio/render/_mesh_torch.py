"""The dense, obviously-correct torch twin of the mesh rasterizer.

Every pixel centre is tested against every face (faces in chunks of about ``max_elems`` pixel-face
pairs), so there is no binning, bounding box or tile logic to get wrong. The rules are those of
``cuda_ext/cuda/mesh_math.h`` written with the same expressions in the same order, so on the CPU
the native backend reproduces this twin bit for bit:

* pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)``;
* edge functions ``e_k`` and twice the signed area ``A``; a centre is covered when all ``e_k`` have
  the sign of ``A`` (zero included), both orientations are drawn (no back-face culling), ``A == 0``
  covers nothing;
* ``q_k = (e_k / A) / z_k``, ``s = q_0 + q_1 + q_2``, ``depth = 1 / s``, ``b_k = q_k / s``
  (perspective-correct: ``1/z`` is affine in screen space);
* a face with a vertex at ``z <= near`` is dropped whole (no clipping); a pixel needs ``depth < far``;
* the visible face is the covering one of smallest depth; exact ties go to the smallest face index.

Visibility is found under ``no_grad``; the winning faces' barycentrics and depth are then evaluated
again, with autograd, from ``verts_screen`` — so gradients are exactly those of the formulas above
for fixed visibility (what the fast backends implement analytically). Slow by design.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _edge_terms(x0, y0, z0, x1, y1, z1, x2, y2, z2, px, py):
    """``(e0, e1, e2, area)`` in the exact operation order of mesh_math.h (broadcasting)."""
    e0 = (x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)
    e1 = (x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)
    e2 = (x0 - px) * (y1 - py) - (x1 - px) * (y0 - py)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    return e0, e1, e2, area


def _bary_depth(e0, e1, e2, area, z0, z1, z2):
    q0 = (e0 / area) / z0
    q1 = (e1 / area) / z1
    q2 = (e2 / area) / z2
    s = q0 + q1 + q2
    return (q0 / s, q1 / s, q2 / s), 1.0 / s


def pixel_centers(width: int, height: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """Row-major pixel centres ``(px [H*W], py [H*W])``."""
    xs = torch.arange(width, dtype=dtype, device=device) + 0.5
    ys = torch.arange(height, dtype=dtype, device=device) + 0.5
    return xs.repeat(height), ys.repeat_interleave(width)


@torch.no_grad()
def visible_faces_torch(verts_screen: Tensor, faces: Tensor, width: int, height: int, near_plane: float,
                        far_plane: float, *, max_elems: int = 1 << 21) -> Tensor:
    """Face id of every pixel ``[C, H*W]`` (long, -1 = background) by brute force."""
    C = verts_screen.shape[0]
    F = faces.shape[0]
    dt, dev = verts_screen.dtype, verts_screen.device
    px, py = pixel_centers(width, height, dt, dev)
    px, py = px[:, None], py[:, None]
    P = px.shape[0]
    out = torch.full((C, P), -1, dtype=torch.long, device=dev)
    if F == 0:
        return out
    chunk = max(1, max_elems // max(P, 1))
    for c in range(C):
        tri = verts_screen[c].detach()[faces]  # [F,3 verts,3 coords]
        keep = (tri[..., 2] > near_plane).all(-1)  # NaN fails the comparison, as in C++
        best_d = torch.full((P,), float("inf"), dtype=dt, device=dev)
        best_f = out[c]
        for f0 in range(0, F, chunk):
            t = tri[f0:f0 + chunk]
            x0, y0, z0 = (t[None, :, 0, i] for i in range(3))
            x1, y1, z1 = (t[None, :, 1, i] for i in range(3))
            x2, y2, z2 = (t[None, :, 2, i] for i in range(3))
            e0, e1, e2, area = _edge_terms(x0, y0, z0, x1, y1, z1, x2, y2, z2, px, py)
            inside = ((area > 0) & (e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | \
                     ((area < 0) & (e0 <= 0) & (e1 <= 0) & (e2 <= 0))
            _, d = _bary_depth(e0, e1, e2, area, z0, z1, z2)
            ok = inside & (d < far_plane) & keep[None, f0:f0 + chunk]
            d = torch.where(ok, d, torch.full_like(d, float("inf")))
            dmin, amin = d.min(dim=1)  # first index among equal minima
            upd = dmin < best_d
            best_d = torch.where(upd, dmin, best_d)
            best_f.copy_(torch.where(upd, amin + f0, best_f))
    return out


def rasterize_screen_torch(verts_screen: Tensor, faces: Tensor, width: int, height: int, near_plane: float,
                           far_plane: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference rasterization of projected vertices ``[C,V,3]``; returns ``(face_id [C,H,W] long,
    bary [C,H,W,3], depth [C,H,W])`` with zeros on background, differentiable w.r.t. ``verts_screen``."""
    C = verts_screen.shape[0]
    fid = visible_faces_torch(verts_screen, faces, width, height, near_plane, far_plane)  # [C,P]
    dt, dev = verts_screen.dtype, verts_screen.device
    P = width * height
    hit = (fid >= 0).reshape(-1).nonzero()[:, 0]  # flat (c*P + p) of covered pixels
    bary = verts_screen.new_zeros(C * P, 3)
    depth = verts_screen.new_zeros(C * P)
    if hit.numel() > 0:
        cam = hit // P
        f = fid.reshape(-1)[hit]
        px, py = pixel_centers(width, height, dt, dev)
        px, py = px[hit % P], py[hit % P]
        tri = verts_screen[cam[:, None], faces[f]]  # [M,3,3] with autograd
        x0, y0, z0 = tri[:, 0].unbind(-1)
        x1, y1, z1 = tri[:, 1].unbind(-1)
        x2, y2, z2 = tri[:, 2].unbind(-1)
        e0, e1, e2, area = _edge_terms(x0, y0, z0, x1, y1, z1, x2, y2, z2, px, py)
        b, d = _bary_depth(e0, e1, e2, area, z0, z1, z2)
        bary = bary.index_put((hit,), torch.stack(b, dim=-1))
        depth = depth.index_put((hit,), d)
    return fid.reshape(C, height, width), bary.reshape(C, height, width, 3), depth.reshape(C, height, width)
