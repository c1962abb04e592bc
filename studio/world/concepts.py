"""Personal concepts of ShapeWorld: an object in a colour pattern the base model never saw (DreamSteerer, issue 21).

A personal concept is a built-in object's exact surface re-coloured with a pattern that no ShapeWorld prompt
describes (``shapeworld-unet`` was trained on the 14 objects in their own colours only), e.g. ``striped_cube``:
the red cube's shape with magenta / cyan horizontal stripes. Its ground truth is exact, so a personalised edit
of a source render of the base object ("a red cube" -> "a <v*> cube") has an exact answer: the concept rendered
from the **same** camera (same shape, so the same silhouette, pose and background).

* :func:`concept_gaussians` -- the concept's Gaussian set (the base object's baked Lambertian shading);
* :func:`concept_views` -- reference renders (3-8 views for personalisation) on orbit cameras;
* :func:`edit_pair` -- source render of the base object, the ground-truth edit (the concept at the same camera)
  and the silhouette, for the benchmark's exact metrics.

Reconstructed choice (not from the paper): the concept keeps the base object's geometry, so concept fidelity
and source preservation separate cleanly (colour inside vs everything outside the silhouette).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .objects import get_object
from .primitives import Surface, surfels_to_gaussians
from ..cameras import orbit_cameras
from .references import DEFAULT_FOVY, DEFAULT_RADIUS, render_gaussian_views

#: renders use the torch reference rasterizer [S]: a few thousand Gaussians at 32 px take about a second, the
#: result does not depend on a native build, and edits are judged against the same renderer everywhere
RENDER_BACKEND = "torch"

MAGENTA, CYAN = (0.9, 0.15, 0.75), (0.1, 0.85, 0.85)
LIME, NAVY = (0.6, 0.95, 0.1), (0.1, 0.1, 0.45)


def _stripes(points: Tensor, a, b, period: float = 0.25) -> Tensor:
    k = torch.floor(points[:, 1] / period).to(torch.long) % 2
    return torch.where(k[:, None] == 0, torch.tensor(a), torch.tensor(b))


def _checker(points: Tensor, a, b, period: float = 0.3) -> Tensor:
    k = torch.floor(points / period).to(torch.long).sum(1) % 2
    return torch.where(k[:, None] == 0, torch.tensor(a), torch.tensor(b))


@dataclass(frozen=True)
class PersonalConcept:
    name: str
    base: str  # the ShapeWorld object whose geometry it keeps
    noun: str  # the class noun in prompts ("cube")
    source_prompt: str  # the base object's prompt ("a red cube")
    color: Callable[[Tensor], Tensor]  # points [P,3] -> colours [P,3]


CONCEPTS: dict[str, PersonalConcept] = {
    c.name: c for c in [
        PersonalConcept("striped_cube", "red_cube", "cube", "a red cube", lambda p: _stripes(p, MAGENTA, CYAN)),
        PersonalConcept("checker_ball", "blue_ball", "ball", "a blue ball", lambda p: _checker(p, LIME, NAVY)),
    ]
}


def get_concept(name: str) -> PersonalConcept:
    if name not in CONCEPTS:
        raise KeyError(f"unknown ShapeWorld concept {name!r}; choose one of {sorted(CONCEPTS)}")
    return CONCEPTS[name]


def concept_gaussians(name: str, n: int = 6000, seed: int = 0, shading: float = 0.35) -> dict[str, Tensor]:
    """The concept's Gaussians: the base object's surface, re-coloured, with the same baked shading as
    :meth:`ShapeObject.gaussians`."""
    c = get_concept(name)
    surf = get_object(c.base).surface(n, seed)
    colors = c.color(surf.points).to(surf.colors)
    if shading > 0:
        light = torch.tensor([0.4, 0.8, 0.6])
        lam = (surf.normals @ (light / light.norm())).clamp_min(0)
        colors = colors * ((1 - shading) + shading * lam)[:, None]
    return surfels_to_gaussians(Surface(surf.points, surf.normals, colors))


def _cams(azimuths, elevations, size: int):
    az = torch.as_tensor(azimuths, dtype=torch.float32).reshape(-1)
    el = torch.as_tensor(elevations, dtype=torch.float32).reshape(-1).expand(az.numel())
    return orbit_cameras(el.contiguous(), az, DEFAULT_RADIUS, DEFAULT_FOVY, size, size)


def concept_views(name: str, n: int = 6, size: int = 32, elevation: float = 15.0, n_gaussians: int = 6000,
                  backend: str = RENDER_BACKEND) -> Tensor:
    """``n`` reference renders ``[n,3,size,size]`` in [0,1] of the concept on white, azimuths ``k * 360 / n``."""
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    out = render_gaussian_views(concept_gaussians(name, n_gaussians), _cams(az, elevation, size), backend=backend)
    return out["images"].permute(0, 3, 1, 2).contiguous()


def edit_pair(name: str, azimuth: float, elevation: float = 10.0, size: int = 32, n_gaussians: int = 6000,
              backend: str = RENDER_BACKEND) -> dict[str, Tensor]:
    """``source`` (the base object), ``target`` (the concept at the same camera, the exact edit) ``[1,3,s,s]``
    and ``mask`` ``[1,1,s,s]`` (the shared silhouette, alpha > 0.5)."""
    c = get_concept(name)
    cams = _cams([azimuth], elevation, size)
    src = render_gaussian_views(get_object(c.base).gaussians(n_gaussians), cams, backend=backend)
    tgt = render_gaussian_views(concept_gaussians(name, n_gaussians), cams, backend=backend)
    return {"source": src["images"].permute(0, 3, 1, 2).contiguous(),
            "target": tgt["images"].permute(0, 3, 1, 2).contiguous(),
            "mask": (src["alphas"].permute(0, 3, 1, 2) > 0.5).float()}
