"""Built-in procedural objects of ShapeWorld: name, prompt and an exact surface.

``get_object(name).gaussians(n, seed)`` gives a Gaussian set ready for ``rasterize_gaussians``;
``.surface(n, seed)`` the exact oriented surface sample (ground truth for metrics). Objects whose
front (+z) and back differ make the Janus problem measurable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import primitives as P
from .primitives import Surface

RED, GREEN, BLUE = (0.85, 0.12, 0.1), (0.15, 0.7, 0.2), (0.12, 0.3, 0.85)
YELLOW, WHITE, ORANGE, BLACK = (0.95, 0.8, 0.1), (0.93, 0.93, 0.93), (0.98, 0.5, 0.1), (0.08, 0.08, 0.08)


@dataclass(frozen=True)
class ShapeObject:
    name: str
    prompt: str
    build: Callable[[int, torch.Generator], Surface]
    front_back_differ: bool = False

    def surface(self, n: int = 20000, seed: int = 0) -> Surface:
        g = torch.Generator().manual_seed(seed)
        return self.build(n, g)

    def gaussians(self, n: int = 20000, seed: int = 0, shading: float = 0.35, **kw) -> dict[str, torch.Tensor]:
        """Gaussian set of the object. ``shading`` bakes a fixed Lambertian light into the colours
        (0 = flat albedo) so shapes read as 3D in renders; the albedo stays in ``surface().colors``."""
        surf = self.surface(n, seed)
        if shading > 0:
            light = torch.tensor([0.4, 0.8, 0.6])
            lam = (surf.normals @ (light / light.norm())).clamp_min(0)
            surf = Surface(surf.points, surf.normals, surf.colors * ((1 - shading) + shading * lam)[:, None])
        return P.surfels_to_gaussians(surf, **kw)


def _split(n: int, weights: list[float]) -> list[int]:
    tot = sum(weights)
    ks = [int(n * w / tot) for w in weights]
    ks[0] += n - sum(ks)
    return ks


def _snowman(n: int, g: torch.Generator) -> Surface:
    k = _split(n, [0.45, 0.3, 0.12, 0.06, 0.07])
    body = P.sphere(k[0], 0.5, WHITE, g).transformed((0, -0.35, 0))
    head = P.sphere(k[1], 0.33, WHITE, g).transformed((0, 0.42, 0))
    nose = P.cone(k[2], 0.07, 0.35, ORANGE, g)
    # The nose points forward (+z): rotate the cone's +y axis onto +z.
    nose = Surface(nose.points[:, [0, 2, 1]] * torch.tensor([1.0, -1.0, 1.0]) + torch.tensor([0.0, 0.42, 0.3]),
                   nose.normals[:, [0, 2, 1]] * torch.tensor([1.0, -1.0, 1.0]), nose.colors)
    eyes = Surface.cat([P.sphere(k[3] // 2, 0.05, BLACK, g).transformed((-0.12, 0.52, 0.29)),
                        P.sphere(k[3] - k[3] // 2, 0.05, BLACK, g).transformed((0.12, 0.52, 0.29))])
    kb = _split(k[4], [1, 1, 1])
    buttons = Surface.cat([P.sphere(kb[i], 0.05, BLACK, g).transformed((0, y, (0.25 - (y + 0.35) ** 2) ** 0.5))
                           for i, y in enumerate((-0.15, -0.35, -0.55))])
    return Surface.cat([body, head, nose, eyes, buttons])


def _house(n: int, g: torch.Generator) -> Surface:
    k = _split(n, [0.6, 0.4])
    walls = P.box(k[0], (0.5, 0.35, 0.45), YELLOW, g, face_colors={"+z": RED}).transformed((0, -0.2, 0))
    roof = P.cone(k[1], 0.7, 0.5, BLUE, g).transformed((0, 0.15, 0))
    return Surface.cat([walls, roof])


OBJECTS: dict[str, ShapeObject] = {
    o.name: o
    for o in [
        ShapeObject("red_cube", "a red cube", lambda n, g: P.box(n, (0.5, 0.5, 0.5), RED, g)),
        ShapeObject("blue_ball", "a blue ball", lambda n, g: P.sphere(n, 0.6, BLUE, g)),
        ShapeObject("green_torus", "a green torus", lambda n, g: P.torus(n, 0.5, 0.18, GREEN, g)),
        ShapeObject("yellow_cone", "a yellow cone", lambda n, g: P.cone(n, 0.5, 1.0, YELLOW, g).transformed((0, -0.5, 0))),
        ShapeObject("snowman", "a snowman with an orange carrot nose", _snowman, front_back_differ=True),
        ShapeObject("house", "a yellow house with a red front door wall and a blue roof", _house, front_back_differ=True),
    ]
}


def get_object(name: str) -> ShapeObject:
    key = name.strip().lower().replace(" ", "_")
    if key in OBJECTS:
        return OBJECTS[key]
    for o in OBJECTS.values():
        if o.prompt == name.strip().lower():
            return o
    raise ValueError(f"unknown ShapeWorld object {name!r}; choose one of: {', '.join(OBJECTS)}")
