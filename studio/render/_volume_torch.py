"""The slow, obviously-correct twin of ``volume``: one ray at a time, one sample at a time.

Nothing is vectorised across samples: transmittance is a running product updated after each sample,
exactly the textbook front-to-back compositing loop, and the NeuS alpha is evaluated from its
definition with Python floats. ``render_rays_torch`` evaluates the field on one ray's samples at a time
(no chunking, no occupancy skipping). The tests compare ``volume`` against these functions.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def composite_torch(sigmas: Tensor | None, rgbs: Tensor, t_vals: Tensor, deltas: Tensor | None = None, *,
                    alphas: Tensor | None = None, background: Any = None) -> dict[str, Tensor]:
    """Per-ray loop of ``volume.composite`` for ``[R,S]`` inputs (float64 accumulation)."""
    R, S = rgbs.shape[:2]
    D = rgbs.shape[-1]
    rgb = torch.zeros(R, D, dtype=torch.float64)
    opacity = torch.zeros(R, 1, dtype=torch.float64)
    depth_sum = torch.zeros(R, 1, dtype=torch.float64)
    weights = torch.zeros(R, S, dtype=torch.float64)
    for r in range(R):
        T = 1.0
        for i in range(S):
            if alphas is None:
                a = 1.0 - math.exp(-float(sigmas[r, i]) * float(deltas[r, i]))
            else:
                a = float(alphas[r, i])
            w = T * a
            weights[r, i] = w
            rgb[r] += w * rgbs[r, i].double()
            opacity[r, 0] += w
            depth_sum[r, 0] += w * float(t_vals[r, i])
            T *= 1.0 - a
    if background is not None:
        bg = torch.as_tensor(background, dtype=torch.float64)
        rgb = rgb + (1.0 - opacity) * bg
    depth = torch.where(opacity > 1e-4, depth_sum / opacity.clamp_min(1e-4), torch.zeros_like(depth_sum))
    return {"rgb": rgb, "opacity": opacity, "depth": depth, "depth_sum": depth_sum, "weights": weights}


def neus_alpha_torch(sdf: float, cos: float, inv_s: float, delta: float, cos_anneal_ratio: float = 1.0) -> float:
    """NeuS alpha of one interval from the definition (see ``volume.neus_alpha``)."""

    def phi(x: float) -> float:  # logistic CDF with sharpness inv_s
        return 1.0 / (1.0 + math.exp(-inv_s * x))

    r = cos_anneal_ratio
    slope = -(max(-cos * 0.5 + 0.5, 0.0) * (1.0 - r) + max(-cos, 0.0) * r)
    sdf_prev = sdf - slope * delta * 0.5
    sdf_next = sdf + slope * delta * 0.5
    a = (phi(sdf_prev) - phi(sdf_next) + 1e-5) / (phi(sdf_prev) + 1e-5)
    return min(max(a, 0.0), 1.0)


@torch.no_grad()
def render_rays_torch(field: Callable[..., dict[str, Tensor]], rays_o: Tensor, rays_d: Tensor, near: Tensor,
                      far: Tensor, n_samples: int, kind: str, *, background: Any = 1.0,
                      cos_anneal_ratio: float = 1.0) -> dict[str, Tensor]:
    """Render ``R`` rays ``[R,3]`` (unit directions) one at a time with ``n_samples`` bin-centred samples
    in ``[near_r, far_r]``. Depth is the distance along the ray (expected, 0 where transparent)."""
    R = rays_o.shape[0]
    rgb = torch.zeros(R, 3, dtype=torch.float64)
    opacity = torch.zeros(R, 1, dtype=torch.float64)
    depth = torch.zeros(R, 1, dtype=torch.float64)
    bg = torch.as_tensor(background, dtype=torch.float64).expand(3)
    for r in range(R):
        n, f = float(near[r]), float(far[r])
        step = (f - n) / n_samples
        ts = [n + (i + 0.5) * step for i in range(n_samples)]
        pts = torch.stack([rays_o[r] + rays_d[r] * t for t in ts])
        dirs = rays_d[r].expand(n_samples, 3)
        out = field(pts, dirs, with_normals=kind == "neus")
        T, acc, dsum = 1.0, 0.0, 0.0
        col = torch.zeros(3, dtype=torch.float64)
        for i in range(n_samples):
            if step <= 0:
                a = 0.0
            elif kind == "nerf":
                a = 1.0 - math.exp(-float(out["density"][i]) * step)
            else:
                cos = float((dirs[i] * out["normal"][i]).sum())
                a = neus_alpha_torch(float(out["sdf"][i]), cos, float(out["inv_s"]), step, cos_anneal_ratio)
            w = T * a
            col += w * out["rgb"][i].double()
            acc += w
            dsum += w * ts[i]
            T *= 1.0 - a
        rgb[r] = col + (1.0 - acc) * bg
        opacity[r, 0] = acc
        depth[r, 0] = dsum / acc if acc > 1e-4 else 0.0
    return {"rgb": rgb, "opacity": opacity, "depth": depth}
