"""Surface polishing with a monocular normal estimator (DreamPolish stage G4) as pure functions.

Spec ``specs/placiddreamer_dreampolish.md`` 3.3.1 (a reconstruction [INF]; the paper's exact loss is
[TODO-VERIFY]). Per step the mesh is rendered from a camera with a *wide-ranging* field of view (incl.
close-ups), its shaded RGB goes through a frozen normal estimator giving ``n_hat`` (stop-gradient), and the
rendered camera-space normal map ``n_r`` is pulled towards it:

    L = mean_mask (1 - cos(n_r, n_hat)) + beta * mean_mask |n_r - n_hat|_1      (+ mesh regularisers,
                                                                                 added by the stage)

Both maps are renormalised first, so the loss does not depend on the estimator's output scale, and the
estimator's map is detached (no gradient can reach it). Normals follow the studio's camera convention
(``studio.teachers.normals``: OpenCV camera frame, outward, head-on = ``(0, 0, -1)``).

``polish_cameras`` samples the viewpoints: FoV uniform in ``fovy_range``; the distance is re-solved so
the object's bounding sphere (radius ``object_radius``) covers a fraction ``fill`` of the vertical FoV:
``d = r / sin(fill * fovy / 2)`` (``fill`` uniform in ``fill_range``). With probability ``closeup_p`` a
view is a *close-up*: ``fill`` is drawn from ``closeup_fill`` (> 1: the object overfills the frame) and the
look-at target moves to a random point at ``closeup_offset * r`` from the centre, so partial views of the
surface are seen at high resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import OrbitSample, orbit_cameras, sample_azimuths

__all__ = ["PolishCameraConfig", "polish_cameras", "polish_normal_loss"]


def polish_normal_loss(rendered: Tensor, estimated: Tensor, mask: Tensor | None = None, *,
                       beta: float = 0.5) -> tuple[Tensor, dict[str, float]]:
    """``(loss, logs)``: masked ``(1 - cos) + beta * L1`` between normal maps ``[B,3,H,W]`` (module doc).

    ``rendered`` carries the gradient (the mesh's normals), ``estimated`` is detached here; ``mask``
    ``[B,1,H,W]`` (weights or bool; default all pixels) selects the foreground. A zero mask gives a zero
    loss (that still depends on ``rendered``, so backward works). Logs: ``normal_cos``, ``normal_l1``
    (masked means) and ``normal_angle_deg`` (mean angular error)."""
    if rendered.shape != estimated.shape or rendered.dim() != 4 or rendered.shape[1] != 3:
        raise ValueError(f"rendered and estimated must both be [B,3,H,W], got {tuple(rendered.shape)} and "
                         f"{tuple(estimated.shape)}")
    n_r = F.normalize(rendered, dim=1, eps=1e-6)
    n_e = F.normalize(estimated.detach().to(rendered), dim=1, eps=1e-6)
    w = torch.ones_like(rendered[:, :1]) if mask is None else mask.to(rendered).reshape(rendered[:, :1].shape)
    denom = w.sum().clamp_min(1e-8)
    cos = (n_r * n_e).sum(1, keepdim=True)
    l_cos = ((1 - cos) * w).sum() / denom
    l_l1 = ((n_r - n_e).abs().sum(1, keepdim=True) * w).sum() / denom
    loss = l_cos + beta * l_l1
    with torch.no_grad():
        ang = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
        logs = {"normal_cos": float(l_cos), "normal_l1": float(l_l1),
                "normal_angle_deg": float((ang * w).sum() / denom)}
    return loss, logs


@dataclass
class PolishCameraConfig:
    """Viewpoints of the polishing stage (spec 3.3: FoV 15-60 deg, the object filling 60-90% of the frame,
    plus partial close-ups). ``elevation_range`` / ``azimuth_range`` in degrees."""

    fovy_range: tuple[float, float] = (15.0, 60.0)
    fill_range: tuple[float, float] = (0.6, 0.9)
    closeup_p: float = 0.25
    closeup_fill: tuple[float, float] = (1.3, 2.0)
    closeup_offset: float = 0.5
    elevation_range: tuple[float, float] = (-10.0, 60.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    object_radius: float = 0.6
    exclude_azimuth: tuple[float, float] | None = None
    """an azimuth sector ``(start, end)`` (degrees) never sampled (the held-out evaluation region)"""


def polish_cameras(cfg: PolishCameraConfig, n: int, size: int, generator: torch.Generator | None = None
                   ) -> tuple[OrbitSample, Tensor, Tensor]:
    """``(views, fovy_deg [n], closeup [n] bool)``: ``n`` polishing cameras of ``size`` px (module doc)."""
    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    fovy = u(*cfg.fovy_range)
    closeup = torch.rand(n, generator=generator) < cfg.closeup_p
    fill = torch.where(closeup, u(*cfg.closeup_fill), u(*cfg.fill_range))
    half = torch.deg2rad(fovy) / 2
    # the sphere of radius r at distance d subtends a half-angle asin(r / d) = fill * fovy / 2
    dist = cfg.object_radius / torch.sin((fill * half).clamp(max=math.pi / 2 - 1e-3))
    dist = torch.maximum(dist, torch.full_like(dist, cfg.object_radius * 1.05))  # never inside the sphere
    elev = u(*cfg.elevation_range)
    azim = (u(*cfg.azimuth_range) if cfg.exclude_azimuth is None else
            sample_azimuths(n, cfg.azimuth_range, exclude=cfg.exclude_azimuth, stratified=False, generator=generator))
    d = torch.randn(n, 3, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    target = torch.where(closeup[:, None], d * cfg.object_radius * cfg.closeup_offset, torch.zeros(n, 3))
    cameras = orbit_cameras(elev, azim, dist, fovy, size, size, target=target)
    return OrbitSample(cameras, elev, azim, dist, fovy), fovy, closeup
