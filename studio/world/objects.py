"""Built-in procedural objects of ShapeWorld: name, prompt and an exact surface.

``get_object(name).gaussians(n, seed)`` gives a Gaussian set ready for ``rasterize_gaussians``;
``.surface(n, seed)`` the exact oriented surface sample (ground truth for metrics). Objects whose
front (+z) and back differ (``front_back_differ``: snowman, house, two_tone_box, clock, penguin) make
the Janus problem measurable. ``list_objects()`` lists them all; ``find_object_for_prompt`` maps a
prompt (also with a view phrase such as ", back view") or a name to its object.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from . import primitives as P
from .primitives import Surface

RED, GREEN, BLUE = (0.85, 0.12, 0.1), (0.15, 0.7, 0.2), (0.12, 0.3, 0.85)
YELLOW, WHITE, ORANGE, BLACK = (0.95, 0.8, 0.1), (0.93, 0.93, 0.93), (0.98, 0.5, 0.1), (0.08, 0.08, 0.08)
PURPLE, BROWN, CREAM, GREY = (0.55, 0.2, 0.75), (0.5, 0.3, 0.13), (0.95, 0.9, 0.78), (0.35, 0.35, 0.38)


@dataclass(frozen=True)
class ShapeObject:
    name: str
    prompt: str
    build: Callable[[int, torch.Generator], Surface]
    front_back_differ: bool = False
    #: colour words of the object (all appear in ``prompt``), e.g. ``("red", "blue")``
    colors: tuple[str, ...] = ()
    #: the whole surface bounds one convex solid (every normal points away from its interior)
    convex: bool = False

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


def _mushroom(n: int, g: torch.Generator) -> Surface:
    k = _split(n, [0.65, 0.35])
    cap = P.hemisphere(k[0], 0.55, RED, g, base_color=CREAM).transformed((0, -0.05, 0))
    stem = P.cylinder(k[1], 0.15, 0.25, CREAM, g).transformed((0, -0.3, 0))
    return Surface.cat([cap, stem])


def _tree(n: int, g: torch.Generator) -> Surface:
    k = _split(n, [0.5, 0.35, 0.15])
    low = P.cone(k[0], 0.55, 0.7, GREEN, g).transformed((0, -0.4, 0))
    high = P.cone(k[1], 0.42, 0.6, GREEN, g).transformed((0, 0.0, 0))
    trunk = P.cylinder(k[2], 0.12, 0.2, BROWN, g).transformed((0, -0.6, 0))
    return Surface.cat([low, high, trunk])


def _table(n: int, g: torch.Generator) -> Surface:
    k = _split(n, [2.6, 0.26, 0.26, 0.26, 0.26])
    top = P.box(k[0], (0.65, 0.05, 0.42), BROWN, g).transformed((0, 0.15, 0))
    legs = [P.box(k[i + 1], (0.05, 0.3, 0.05), BROWN, g).transformed((sx * 0.55, -0.2, sz * 0.32))
            for i, (sx, sz) in enumerate([(-1, -1), (1, -1), (-1, 1), (1, 1)])]
    return Surface.cat([top, *legs])


def _two_tone_box(n: int, g: torch.Generator) -> Surface:
    return P.box(n, (0.45, 0.45, 0.45), WHITE, g, face_colors={"+z": RED, "-z": BLUE})


def _clock(n: int, g: torch.Generator) -> Surface:
    """A thick disc facing +z: white dial with black hands on the front, black rim, dark grey back."""
    k = _split(n, [0.4, 0.4, 0.14, 0.03, 0.03])
    R, hz = 0.6, 0.1
    rim = P.cylinder(k[2], R, hz, BLACK, g, caps=False).rotated("x", 90)  # axis along z
    face = P.disk(k[0], R, WHITE, g).rotated("x", 90).transformed((0, 0, hz))  # normal +y -> +z
    back = P.disk(k[1], R, GREY, g).rotated("x", -90).transformed((0, 0, -hz))  # normal -z
    hour = P.box(k[3], (0.035, 0.17, 0.012), BLACK, g).transformed((0, 0.15, hz + 0.012))
    minute = P.box(k[4], (0.24, 0.025, 0.012), BLACK, g).transformed((0.21, 0, hz + 0.012))
    return Surface.cat([face, back, rim, hour, minute])


def _penguin(n: int, g: torch.Generator) -> Surface:
    """Black penguin facing +z: white belly, white eyes and an orange beak and feet on the front."""
    k = _split(n, [0.55, 0.27, 0.05, 0.05, 0.08])
    body = P.sphere(k[0], 0.45, BLACK, g)
    body = body.recolored((body.normals[:, 2] > 0.45) & (body.normals[:, 1] < 0.6), WHITE).transformed((0, -0.2, 0))
    head = P.sphere(k[1], 0.3, BLACK, g).transformed((0, 0.38, 0))
    beak = P.cone(k[2], 0.07, 0.22, ORANGE, g).rotated("x", 90).transformed((0, 0.36, 0.27))
    eyes = Surface.cat([P.sphere(k[3] // 2, 0.05, WHITE, g).transformed((-0.11, 0.46, 0.24)),
                        P.sphere(k[3] - k[3] // 2, 0.05, WHITE, g).transformed((0.11, 0.46, 0.24))])
    kf = _split(k[4], [1, 1])
    feet = Surface.cat([P.box(kf[i], (0.1, 0.03, 0.13), ORANGE, g).transformed((sx * 0.17, -0.66, 0.12))
                        for i, sx in enumerate((-1, 1))])
    return Surface.cat([body, head, beak, eyes, feet])


OBJECTS: dict[str, ShapeObject] = {
    o.name: o
    for o in [
        ShapeObject("red_cube", "a red cube", lambda n, g: P.box(n, (0.5, 0.5, 0.5), RED, g),
                    colors=("red",), convex=True),
        ShapeObject("blue_ball", "a blue ball", lambda n, g: P.sphere(n, 0.6, BLUE, g), colors=("blue",), convex=True),
        ShapeObject("green_torus", "a green torus", lambda n, g: P.torus(n, 0.5, 0.18, GREEN, g), colors=("green",)),
        ShapeObject("yellow_cone", "a yellow cone",
                    lambda n, g: P.cone(n, 0.5, 1.0, YELLOW, g).transformed((0, -0.5, 0)),
                    colors=("yellow",), convex=True),
        ShapeObject("snowman", "a snowman with an orange carrot nose", _snowman, front_back_differ=True,
                    colors=("orange",)),
        ShapeObject("house", "a yellow house with a red front door wall and a blue roof", _house,
                    front_back_differ=True, colors=("yellow", "red", "blue")),
        ShapeObject("purple_cylinder", "a purple cylinder",
                    lambda n, g: P.cylinder(n, 0.42, 0.6, PURPLE, g), colors=("purple",), convex=True),
        ShapeObject("orange_pyramid", "an orange pyramid",
                    lambda n, g: P.pyramid(n, 0.55, 1.0, ORANGE, g).transformed((0, -0.45, 0)),
                    colors=("orange",), convex=True),
        ShapeObject("mushroom", "a mushroom with a red cap and a white stem", _mushroom, colors=("red", "white")),
        ShapeObject("tree", "a green tree with a brown trunk", _tree, colors=("green", "brown")),
        ShapeObject("table", "a brown wooden table", _table, colors=("brown",)),
        ShapeObject("two_tone_box", "a white box with a red front and a blue back", _two_tone_box,
                    front_back_differ=True, colors=("white", "red", "blue"), convex=True),
        ShapeObject("clock", "a black clock with a white face on the front", _clock, front_back_differ=True,
                    colors=("black", "white")),
        ShapeObject("penguin", "a black penguin with a white belly and an orange beak", _penguin,
                    front_back_differ=True, colors=("black", "white", "orange")),
    ]
}


def list_objects(*, front_back_differ: bool | None = None) -> list[ShapeObject]:
    """All built-in objects in a fixed order (optionally only those whose front/back differ or not)."""
    return [o for o in OBJECTS.values() if front_back_differ is None or o.front_back_differ == front_back_differ]


def _norm_text(text: str) -> str:
    return " ".join(str(text).strip().lower().replace("_", " ").replace("-", " ").split()).rstrip(".!").strip()


# View suffixes / prefixes that view-dependent prompting adds ("a red cube, front view",
# "a red cube from the back", "front view of a red cube"). Only forms naming a *view* are stripped, so
# prompts that end in "front" or "back" themselves ("... a blue back") still match exactly first.
_VIEW = r"(?:front|back|rear|side|left|right|top|bottom|overhead|above|below|behind|side on)"
_SUFFIXES = [
    re.compile(rf"\s*,?\s*(?:the\s+|a\s+)?(?:{_VIEW}\s+)?(?:{_VIEW}\s+)?view$"),
    re.compile(rf"\s*,?\s*(?:seen|viewed)?\s*from\s+(?:the\s+)?{_VIEW}(?:\s+side)?$"),
    re.compile(rf"\s*,\s*{_VIEW}(?:\s+side)?$"),
]
_PREFIXES = [re.compile(rf"^(?:an?\s+|the\s+)?(?:{_VIEW}\s+)?(?:{_VIEW}\s+)?view\s+of\s+")]


def _lookup(text: str) -> ShapeObject | None:
    for o in OBJECTS.values():
        if text == _norm_text(o.prompt) or text == _norm_text(o.name):
            return o
    return None


def find_object_for_prompt(prompt: str) -> ShapeObject | None:
    """The object whose prompt or name matches ``prompt`` (case, space, ``_``/``-`` insensitive), also
    after stripping a view phrase ("a red cube, front view", "front view of a red cube",
    "a red cube from the back"); ``None`` if nothing matches."""
    text = _norm_text(prompt)
    hit = _lookup(text)
    if hit is not None:
        return hit
    stripped = text
    for _ in range(2):
        for rx in _SUFFIXES:
            stripped = rx.sub("", stripped).strip(" ,")
        for rx in _PREFIXES:
            stripped = rx.sub("", stripped).strip(" ,")
        hit = _lookup(stripped)
        if hit is not None:
            return hit
    # "front view of red cube" -> "red cube": allow a missing article
    for art in ("a ", "an ", "the "):
        hit = _lookup(art + stripped)
        if hit is not None:
            return hit
    return None


def get_object(name: str) -> ShapeObject:
    """Object by name or prompt (see ``find_object_for_prompt``); ``ValueError`` listing the choices."""
    if isinstance(name, ShapeObject):
        return name
    obj = find_object_for_prompt(name)
    if obj is None:
        raise ValueError(f"unknown ShapeWorld object {name!r}; choose one of: {', '.join(OBJECTS)}")
    return obj
