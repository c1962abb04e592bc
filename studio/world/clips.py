"""ShapeWorld video: procedural 2-D clips with exact ground truth (the default video dataset).

One object per clip, rendered analytically in torch with antialiasing: every pixel's object coverage is
``alpha = clamp(0.5 - d, 0, 1)`` where ``d`` is the shape's signed distance (in pixels) at the pixel
centre, so edges are soft and sub-pixel motion is visible. Everything is vectorised over the batch (about
2000 clips of 8 x 32 x 32 per second on one CPU core), and a seed fixes every clip.

**Vocabulary** (module constants):

* :data:`SHAPES` -- ``ball`` (a disc with a darker stripe through its centre, so its spin is visible),
  ``cube`` (a square), ``triangle`` (equilateral). The three have the same area.
* :data:`COLORS` -- ``red``, ``green``, ``blue``, ``yellow`` (the palette of :mod:`studio.world.objects`).
* :data:`MOTIONS` -- ``moving left``, ``moving right``, ``moving up``, ``moving down`` (constant velocity),
  ``bouncing`` (vertical ballistic bounce off a floor: parabolic arcs, instant reversal at the floor),
  ``rotating`` (spin in place, either sense), ``speeding up`` (moving right with constant acceleration).
* :data:`CAMERAS` -- ``static``, ``panning left``, ``panning right``. The background is white-ish with soft
  grey vertical stripes (a world texture), so a panning camera is visible; the object's screen motion is
  its world motion minus the camera's.

**Prompt grammar** (:data:`PROMPT_GRAMMAR`)::

    a <colour> <shape> <motion>[, camera panning <left|right>]

e.g. ``"a red ball moving left"``, ``"a blue cube bouncing"``, ``"a green triangle rotating, camera panning
right"``. :func:`parse_video_prompt` is case / space / punctuation tolerant, accepts ``an`` / ``the`` or no
article, a few synonyms (``disc``/``circle``/``sphere`` = ball, ``square``/``box`` = cube, ``spinning`` =
rotating, ``accelerating`` = speeding up, ``, static camera`` = static) and returns the canonical words;
:func:`video_prompt` writes the canonical prompt back.

**Coordinates.** Positions are in units of the frame: ``x`` to the right and ``y`` *down*, ``0`` = left /
top edge, ``1`` = right / bottom edge (pixel ``j`` has its centre at ``(j + 0.5) / W``). Angles are in
radians, counter-clockwise as seen on screen, unwrapped (not reduced modulo the shape's symmetry). The
camera offset ``camera_x`` is the world x seen at the left edge minus its value at frame 0: a camera
panning right has increasing ``camera_x``, and ``screen x = world x - camera_x``.

**Time.** Translations are defined over the whole clip (``tau = t / (F - 1)`` runs 0..1), so a spec keeps
its object in frame at any clip length; spin is per frame (so frame-to-frame rotation stays below the
shape's symmetry angle and remains measurable).

**Domains** for methods that separate appearance from motion: :func:`degrade` maps clips to a
low-quality domain (blur, sensor noise, blocky compression, colour quantisation and a fixed
semi-transparent watermark); :func:`hq_images` gives a high-quality image domain (single sharp frames of
the same objects with shading and a specular highlight). ``video_metrics.domain_quality`` scores
where frames lie between the two.
"""
from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .objects import BLUE, GREEN, RED, YELLOW

__all__ = [
    "BACKGROUND_DEPTH",
    "CAMERAS",
    "COLORS",
    "MOTIONS",
    "OBJECT_DEPTH",
    "ORIENTATION_ORDER",
    "PROMPT_GRAMMAR",
    "SHAPES",
    "Clip",
    "ClipSpec",
    "background",
    "block_size",
    "degrade",
    "gaussian_blur",
    "hq_images",
    "parse_video_prompt",
    "reference_clips",
    "render_clip",
    "render_clips",
    "sample_clip_specs",
    "sample_clips",
    "video_prompt",
    "video_prompts",
    "watermark_pattern",
]

SHAPES: tuple[str, ...] = ("ball", "cube", "triangle")
COLORS: dict[str, tuple[float, float, float]] = {"red": RED, "green": GREEN, "blue": BLUE, "yellow": YELLOW}
MOTIONS: tuple[str, ...] = ("moving left", "moving right", "moving up", "moving down", "bouncing", "rotating",
                            "speeding up")
CAMERAS: tuple[str, ...] = ("static", "panning left", "panning right")
PROMPT_GRAMMAR = "a <colour> <shape> <motion>[, camera panning <left|right>]"

#: order ``k`` of the rotational pattern used to read the orientation from pixels (the ball's stripe is
#: 2-fold, the square 4-fold, the triangle 3-fold): the orientation is known modulo ``2 pi / k``.
ORIENTATION_ORDER: dict[str, int] = {"ball": 2, "cube": 4, "triangle": 3}
#: depth of the object layer and of the background plane (arbitrary units, camera at 0)
OBJECT_DEPTH, BACKGROUND_DEPTH = 1.0, 2.0

# Nuisance ranges (frame units unless noted). Chosen so that every object stays inside the frame for the
# whole clip with a margin, whatever the motion and camera (asserted in ``sample_clip_specs``).
_RADIUS = (0.10, 0.14)          # equal-area disc radius of the object
_TRAVEL = (0.20, 0.30)          # distance travelled over the clip by linear motions / speeding up
_BETA = (0.0, 0.2)              # speeding up: initial velocity as a fraction of the mean velocity
_BOUNCE_H = (0.20, 0.32)        # bounce height
_BOUNCE_PERIOD = (0.55, 0.90)   # bounce period as a fraction of the clip (so >= 1 full bounce is seen)
_SPIN = (0.20, 0.38)            # rotating: |radians per frame|, random sense
_CAM_TRAVEL = (0.08, 0.16)      # camera pan over the clip
_MARGIN = 0.035                 # >= 1 px at 32 px: the border pixels stay background
# Background: luminance of the world texture (vertical stripes; frequencies in cycles per frame width)
_BG_MEAN, _BG_AMPS, _BG_FREQS = 0.88, (0.035, 0.025), (3.3, 5.7)
_STRIPE_HALF, _STRIPE_DARK = 0.3, 0.45   # ball stripe: half-width (x radius) and darkening
# shape geometry relative to the equal-area radius r
_SQUARE_HALF = math.sqrt(math.pi) / 2                            # square half side a = 0.886 r
_TRI_CIRCUM = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))        # triangle circumradius R = 1.555 r
_BOUND = {"ball": 1.0, "cube": _SQUARE_HALF * math.sqrt(2), "triangle": _TRI_CIRCUM}

_SYNONYMS = {
    "disc": "ball", "disk": "ball", "circle": "ball", "sphere": "ball", "square": "cube", "box": "cube",
    "spinning": "rotating", "turning": "rotating", "accelerating": "speeding up",
    "moving faster": "speeding up", "going left": "moving left", "going right": "moving right",
    "going up": "moving up", "going down": "moving down", "bouncing up and down": "bouncing",
}


# ------------------------------------------------------------------------------------- the video convention
def check_video(video: Tensor, what: str = "video") -> Tensor:
    """Validate a pixel video ``[B,F,3,H,W]`` (a single clip ``[F,3,H,W]`` gets a batch axis)."""
    if not isinstance(video, Tensor):
        raise TypeError(f"{what} must be a tensor [B,F,3,H,W] in [0,1], got {type(video).__name__}")
    if video.dim() == 4:
        video = video[None]
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"{what} must have shape [B,F,3,H,W] (frames, then RGB channels), got {tuple(video.shape)}")
    return video


# ------------------------------------------------------------------------------------------------ prompts

def video_prompt(shape: str, color: str, motion: str, camera: str = "static") -> str:
    """The canonical prompt of a (shape, colour, motion, camera) tuple (see :data:`PROMPT_GRAMMAR`)."""
    for what, val, allowed in (("shape", shape, SHAPES), ("colour", color, tuple(COLORS)),
                               ("motion", motion, MOTIONS), ("camera", camera, CAMERAS)):
        if val not in allowed:
            raise UserError(f"unknown {what} {val!r}; choose one of: {', '.join(allowed)}")
    text = f"a {color} {shape} {motion}"
    return text if camera == "static" else f"{text}, camera {camera}"


def _bad_prompt(prompt: str, why: str) -> UserError:
    return UserError(
        f"cannot read the ShapeWorld video prompt {prompt!r}: {why}. Write {PROMPT_GRAMMAR!r} with colour in "
        f"{{{', '.join(COLORS)}}}, shape in {{{', '.join(SHAPES)}}}, motion in {{{', '.join(MOTIONS)}}} "
        f"(e.g. 'a red ball moving left', 'a green triangle rotating, camera panning right')")


@lru_cache(maxsize=4096)
def parse_video_prompt(prompt: str) -> tuple[str, str, str, str]:
    """``(shape, colour, motion, camera)`` of a prompt; ``UserError`` listing the valid words otherwise."""
    if not isinstance(prompt, str):
        raise UserError(f"a ShapeWorld video prompt must be a string, got {type(prompt).__name__}")
    text = " ".join(re.sub(r"[^a-z ,]", " ", prompt.lower().replace("-", " ")).split()).strip(" ,")
    camera = "static"
    m = re.search(r"\s*,?\s*(?:with (?:the |a )?)?camera (?:is )?(panning|pans|moving) (left|right)$", text)
    if m:
        camera, text = f"panning {m.group(2)}", text[: m.start()]
    else:
        m = re.search(r"\s*,?\s*(?:with )?(?:a |the )?(?:static|still|fixed) camera$", text)
        if m:
            text = text[: m.start()]
    text = text.strip(" ,")
    text = re.sub(r"^(?:a|an|the) ", "", text)
    words = text.replace(",", " ").split()
    if len(words) < 3:
        raise _bad_prompt(prompt, "it needs a colour, a shape and a motion")
    color, shape, motion = words[0], words[1], " ".join(words[2:])
    shape = _SYNONYMS.get(shape, shape)
    motion = _SYNONYMS.get(motion, motion)
    if color not in COLORS:
        raise _bad_prompt(prompt, f"unknown colour {color!r}")
    if shape not in SHAPES:
        raise _bad_prompt(prompt, f"unknown shape {shape!r}")
    if motion not in MOTIONS:
        raise _bad_prompt(prompt, f"unknown motion {motion!r}")
    return shape, color, motion, camera


def video_prompts(*, full: bool = False, shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                  motions: Sequence[str] | None = None, cameras: Sequence[str] | None = None) -> list[str]:
    """The canonical prompt list, in a fixed order.

    * default: a balanced set of 63 prompts -- every (shape, motion, camera) combination once, its colour
      cycled (``colour index = (shape + motion + camera) mod 4``) so every shape appears in every colour
      and every motion in three colours per camera;
    * ``full=True``: the full product, 3 shapes x 4 colours x 7 motions x 3 cameras = 252 prompts;
    * ``shapes`` / ``colors`` / ``motions`` / ``cameras`` keep only those words (e.g. ``cameras=["static"]``
      gives the 21 static-camera prompts of the default set, 84 with ``full=True``).
    """
    keep = {}
    for what, sel, allowed in (("shapes", shapes, SHAPES), ("colors", colors, tuple(COLORS)),
                               ("motions", motions, MOTIONS), ("cameras", cameras, CAMERAS)):
        if sel is not None:
            sel = [sel] if isinstance(sel, str) else list(sel)
            bad = [s for s in sel if s not in allowed]
            if bad:
                raise UserError(f"video_prompts: unknown {what} {bad}; choose from: {', '.join(allowed)}")
        keep[what] = set(allowed if sel is None else sel)
    cols = list(COLORS)
    out = []
    for ci, cam in enumerate(CAMERAS):
        for si, shape in enumerate(SHAPES):
            for mi, motion in enumerate(MOTIONS):
                colours = cols if full else [cols[(si + mi + ci) % len(cols)]]
                for col in colours:
                    if (shape in keep["shapes"] and col in keep["colors"] and motion in keep["motions"]
                            and cam in keep["cameras"]):
                        out.append(video_prompt(shape, col, motion, cam))
    return out


# ------------------------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class ClipSpec:
    """Everything that fixes a clip: the prompt's words and the randomised nuisance parameters.

    Attributes (frame units, ``y`` down; see the module doc):
        shape, color, motion, camera: the prompt's words (canonical).
        x0, y0: screen position of the object's centre (centre of mass) at frame 0.
        radius: equal-area disc radius (square half side ``0.886 r``, triangle circumradius ``1.555 r``).
        angle0: orientation at frame 0 (radians, counter-clockwise on screen).
        travel: linear motions / speeding up: distance covered over the clip; bouncing: bounce height.
        beta: speeding up: initial velocity / mean velocity (``x = x0 + travel (beta tau + (1-beta) tau^2)``).
        bounce_period, bounce_phase: bouncing: period as a fraction of the clip, phase in [0, 1) of a bounce
            (0 = at the floor).
        spin: rotating: radians per frame (signed, + = counter-clockwise); 0 otherwise.
        camera_travel: camera pan over the clip (>= 0; its sign comes from ``camera``).
        bg_phase: phases of the two background stripe waves (radians).
    """

    shape: str
    color: str
    motion: str
    camera: str = "static"
    x0: float = 0.5
    y0: float = 0.5
    radius: float = 0.12
    angle0: float = 0.0
    travel: float = 0.25
    beta: float = 0.1
    bounce_period: float = 0.7
    bounce_phase: float = 0.0
    spin: float = 0.0
    camera_travel: float = 0.0
    bg_phase: tuple[float, float] = (0.0, 0.0)

    @property
    def prompt(self) -> str:
        return video_prompt(self.shape, self.color, self.motion, self.camera)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    """One rendered clip and its ground truth.

    Attributes:
        video: ``[F,3,H,W]`` RGB in [0, 1].
        mask: ``[F,H,W]`` object coverage in [0, 1] (the antialiasing alpha).
        depth: ``[F,H,W]``: :data:`OBJECT_DEPTH` where the pixel centre lies inside the object, else
            :data:`BACKGROUND_DEPTH` (exact two-layer depth).
        centroid: ``[F,2]`` screen ``(x, y)`` of the object's centre of mass, frame units (y down).
        world_centroid: ``[F,2]`` the same in world units (``x + camera_x``).
        angle: ``[F]`` orientation (radians, counter-clockwise on screen, unwrapped).
        camera_x: ``[F]`` camera offset (world x at the left edge minus its value at frame 0).
        prompt: the canonical prompt; spec: the :class:`ClipSpec`.
    """

    video: Tensor
    mask: Tensor
    depth: Tensor
    centroid: Tensor
    world_centroid: Tensor
    angle: Tensor
    camera_x: Tensor
    prompt: str
    spec: ClipSpec = field(repr=False)


def _lerp(lo_hi: tuple[float, float], u: Tensor) -> Tensor:
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u


def _prompt_list(prompt, n: int, gen: torch.Generator) -> list[str]:
    if prompt is None:
        pool = video_prompts()
        idx = torch.randint(len(pool), (n,), generator=gen).tolist()
        return [pool[i] for i in idx]
    if isinstance(prompt, str):
        return [prompt] * n
    prompts = list(prompt)
    if len(prompts) != n:
        raise UserError(f"got {len(prompts)} prompts for {n} clips; pass one prompt, None, or exactly n prompts")
    return prompts


def _trajectories(shape_idx: Tensor, motion_idx: Tensor, cam_sign: Tensor, p: dict[str, Tensor],
                  num_frames: int) -> tuple[Tensor, Tensor, Tensor]:
    """World offsets from frame 0 ``[n,F,2]``, angle offsets ``[n,F]`` and camera offsets ``[n,F]``."""
    n, Fr = shape_idx.shape[0], num_frames
    t = torch.arange(Fr, dtype=torch.float64)
    tau = (t / max(Fr - 1, 1))[None]                                     # [1,F]
    off = torch.zeros(n, Fr, 2, dtype=torch.float64)
    travel = p["travel"][:, None]
    lin = travel * tau
    mi = motion_idx[:, None]
    off[..., 0] = torch.where(mi == 0, -lin, torch.where(mi == 1, lin, off[..., 0]))
    off[..., 1] = torch.where(mi == 2, -lin, torch.where(mi == 3, lin, off[..., 1]))
    beta = p["beta"][:, None]
    acc = travel * (beta * tau + (1 - beta) * tau**2)
    off[..., 0] = torch.where(mi == 6, acc, off[..., 0])
    u = torch.remainder(tau / p["bounce_period"][:, None] + p["bounce_phase"][:, None], 1.0)
    u0 = p["bounce_phase"][:, None]
    height = 4 * u * (1 - u) - 4 * u0 * (1 - u0)                          # parabolic arcs, 0 at the floor
    off[..., 1] = torch.where(mi == 4, -travel * height, off[..., 1])
    ang = torch.where(mi == 5, p["spin"][:, None] * t[None], torch.zeros(n, Fr, dtype=torch.float64))
    cam = cam_sign[:, None].double() * p["camera_travel"][:, None] * tau
    return off, ang, cam


_PARAM_KEYS = ("x0", "y0", "radius", "angle0", "travel", "beta", "bounce_period", "bounce_phase", "spin",
               "camera_travel")


def sample_clip_specs(prompt: str | Sequence[str] | None = None, n: int = 1, seed: int = 0,
                      num_frames: int = 8) -> list[ClipSpec]:
    """``n`` random specs: nuisance parameters drawn uniformly from the module's ranges, seeded.

    ``prompt``: one prompt for all clips, a list of ``n`` prompts, or ``None`` (uniform over
    :func:`video_prompts`). The start position is drawn uniformly among those that keep the object's
    bounding circle (plus a margin of 0.035, over a pixel at 32 px) inside the frame during the whole clip,
    at any clip length (translations are functions of ``t / (F - 1)``; the bounding circle is rotation
    invariant). ``num_frames`` is accepted for symmetry with the renderers and does not change the specs.
    """
    n = int(n)
    if n < 0:
        raise UserError(f"n must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    prompts = _prompt_list(prompt, n, gen)
    words = [parse_video_prompt(pr) for pr in prompts]
    if n == 0:
        return []
    u = torch.rand(n, 14, generator=gen, dtype=torch.float64)   # one row per clip: prefixes agree across n
    shape_idx = torch.tensor([SHAPES.index(w[0]) for w in words])
    motion_idx = torch.tensor([MOTIONS.index(w[2]) for w in words])
    cam_sign = torch.tensor([{"static": 0, "panning left": -1, "panning right": 1}[w[3]] for w in words])
    p = {
        "radius": _lerp(_RADIUS, u[:, 0]),
        "angle0": 2 * math.pi * u[:, 1],
        "travel": torch.where(motion_idx == 4, _lerp(_BOUNCE_H, u[:, 2]), _lerp(_TRAVEL, u[:, 2])),
        "beta": _lerp(_BETA, u[:, 3]),
        "bounce_period": _lerp(_BOUNCE_PERIOD, u[:, 4]),
        "bounce_phase": u[:, 5],
        "spin": torch.where(motion_idx == 5, _lerp(_SPIN, u[:, 6]) * torch.where(u[:, 7] < 0.5, -1.0, 1.0),
                            torch.zeros(n, dtype=torch.float64)),
        "camera_travel": torch.where(cam_sign != 0, _lerp(_CAM_TRAVEL, u[:, 8]), torch.zeros(n, dtype=torch.float64)),
    }
    # translations depend on tau = t / (F - 1) only: a dense grid bounds them for every clip length
    off, _, cam = _trajectories(shape_idx, motion_idx, cam_sign, p, 129)
    screen = off.clone()
    screen[..., 0] -= cam
    bound = torch.tensor([_BOUND[s] for s in SHAPES], dtype=torch.float64)[shape_idx] * p["radius"] + _MARGIN
    lo = bound[:, None] - screen.amin(1)                                  # [n,2]
    hi = 1 - bound[:, None] - screen.amax(1)
    assert bool((hi >= lo).all()), "nuisance ranges do not fit the frame"  # guaranteed by the ranges above
    start = lo + (hi - lo) * u[:, 9:11]
    p["x0"], p["y0"] = start[:, 0], start[:, 1]
    phases = 2 * math.pi * u[:, 12:14]
    cols = {k: v.tolist() for k, v in p.items()}
    return [ClipSpec(shape=w[0], color=w[1], motion=w[2], camera=w[3],
                     **{k: float(cols[k][i]) for k in _PARAM_KEYS},
                     bg_phase=(float(phases[i, 0]), float(phases[i, 1])))
            for i, w in enumerate(words)]


# ---------------------------------------------------------------------------------------------- rendering

def _spec_tensors(specs: Sequence[ClipSpec]) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
    for s in specs:
        if not isinstance(s, ClipSpec):
            raise TypeError(f"expected ClipSpec, got {type(s).__name__}")
        video_prompt(s.shape, s.color, s.motion, s.camera)  # validates the words
    p = {k: torch.tensor([getattr(s, k) for s in specs], dtype=torch.float64) for k in _PARAM_KEYS}
    p["bg_phase"] = torch.tensor([s.bg_phase for s in specs], dtype=torch.float64).reshape(len(specs), 2)
    shape_idx = torch.tensor([SHAPES.index(s.shape) for s in specs])
    motion_idx = torch.tensor([MOTIONS.index(s.motion) for s in specs])
    cam_sign = torch.tensor([{"static": 0, "panning left": -1, "panning right": 1}[s.camera] for s in specs])
    colors = torch.tensor([COLORS[s.color] for s in specs], dtype=torch.float32)
    return p, shape_idx, motion_idx, cam_sign, colors


def _pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c[None, :], c[:, None]  # x [1,W], y [H,1]


def background(camera_x: Tensor, bg_phase: Tensor, size: int) -> Tensor:
    """Background luminance ``[n,F,1,W]`` (it depends on x only): soft vertical stripes of the world
    texture seen through a camera at offset ``camera_x [n,F]``."""
    xs = _pixel_grid(size)[0][0]                                                   # [W]
    X = (xs[None, None, :].double() + camera_x[..., None])                         # world x
    lum = torch.full_like(X, _BG_MEAN)
    for j in range(2):
        lum = lum + _BG_AMPS[j] * torch.sin(2 * math.pi * _BG_FREQS[j] * X + bg_phase[:, None, None, j])
    return lum.float()[:, :, None, :]


def _shape_sdf(lx: Tensor, ly: Tensor, r: Tensor, shape: str) -> Tensor:
    """Exact signed distance (frame units, < 0 inside) in local y-up coordinates; ``r`` broadcasts
    ``[n,1,1,1]``.

    Disc: ``|p| - r``. Square (half side ``a``): with ``q = |p| - a``, ``|max(q, 0)| + min(max(q_x, q_y), 0)``.
    Triangle (vertex up, inradius ``h = R / 2``, half side ``sqrt(3) h``): inside, the largest edge-line
    distance (exact for convex polygons); outside, the distance to the nearest edge segment."""
    if shape == "ball":
        return torch.sqrt(lx * lx + ly * ly) - r
    if shape == "cube":
        qx, qy = lx.abs() - _SQUARE_HALF * r, ly.abs() - _SQUARE_HALF * r
        return torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2) + torch.maximum(qx, qy).clamp_max(0)
    h = 0.5 * _TRI_CIRCUM * r
    half = math.sqrt(3) * h
    s3 = math.sqrt(3) / 2
    plane = None
    seg = None
    # edges: outward normal n and tangent t = (n_y, -n_x); local coordinates v = p.n - h, u = p.t
    for nx, ny in ((0.0, -1.0), (s3, 0.5), (-s3, 0.5)):
        v = nx * lx + ny * ly - h
        u = ny * lx - nx * ly
        d = torch.sqrt((u.abs() - half).clamp_min(0) ** 2 + v * v)
        plane = v if plane is None else torch.maximum(plane, v)
        seg = d if seg is None else torch.minimum(seg, d)
    return torch.where(plane > 0, seg, plane)


def _render(p: dict[str, Tensor], shape_idx: Tensor, motion_idx: Tensor, cam_sign: Tensor, colors: Tensor,
            num_frames: int, size: int, *, hq: bool = False) -> dict[str, Tensor]:
    n, Fr, S = shape_idx.shape[0], int(num_frames), int(size)
    off, ang, cam = _trajectories(shape_idx, motion_idx, cam_sign, p, Fr)
    world = off + torch.stack([p["x0"], p["y0"]], -1)[:, None]
    screen = world.clone()
    screen[..., 0] -= cam                                               # screen x = world x - camera offset
    angle = p["angle0"][:, None] + ang
    xs, ys = _pixel_grid(S)
    cx = screen[..., 0].float()[..., None, None]
    cy = screen[..., 1].float()[..., None, None]
    dx, dyu = xs - cx, -(ys - cy)                                       # y-up local frame
    ca = torch.cos(angle).float()[..., None, None]
    sa = torch.sin(angle).float()[..., None, None]
    lx, ly = ca * dx + sa * dyu, -sa * dx + ca * dyu
    r = p["radius"].float()[:, None, None, None]
    sdf = torch.empty(n, Fr, S, S)
    shade = torch.ones(n, Fr, S, S)
    for k, shape in enumerate(SHAPES):                                  # each clip's own shape only
        idx = (shape_idx == k).nonzero()[:, 0]
        if len(idx) == 0:
            continue
        lyk = ly[idx]
        sdf[idx] = _shape_sdf(lx[idx], lyk, r[idx], shape)
        if shape == "ball":                                             # darker stripe along the local x axis
            stripe = ((_STRIPE_HALF * r[idx] - lyk.abs()) * S + 0.5).clamp(0, 1)
            shade[idx] = 1 - _STRIPE_DARK * stripe
    alpha = (0.5 - sdf * S).clamp(0, 1)
    col = colors[:, None, :, None, None]                                # [n,1,3,1,1]
    if hq:
        # fake dome lighting from the top left and a specular highlight (screen-aligned, not rotating)
        rb = torch.tensor([_BOUND[s] for s in SHAPES])[shape_idx][:, None, None, None] * r
        light = (-0.6 * dx + 0.8 * dyu) / rb
        shade = shade * (0.82 + 0.28 * light.clamp(-1, 1))
        hx, hy = dx + 0.35 * 0.6 * rb, dyu - 0.35 * 0.8 * rb
        spec = 0.75 * torch.exp(-(hx * hx + hy * hy) / (2 * (0.22 * r) ** 2))
    obj = (col * shade[:, :, None]).clamp(0, 1)
    if hq:
        obj = obj * (1 - spec[:, :, None]) + spec[:, :, None]
    bg = background(cam, p["bg_phase"], S)[:, :, None]                 # [n,F,1,1,W]
    a = alpha[:, :, None]
    video = bg + (obj - bg) * a
    depth = torch.where(sdf < 0, torch.tensor(OBJECT_DEPTH), torch.tensor(BACKGROUND_DEPTH))
    return {"video": video, "mask": alpha, "depth": depth, "centroid": screen.float(),
            "world_centroid": world.float(), "angle": angle.float(), "camera_x": cam.float()}


def _check_sizes(num_frames: int, size: int) -> tuple[int, int]:
    num_frames, size = int(num_frames), int(size)
    if num_frames < 1 or size < 8:
        raise UserError(f"ShapeWorld clips need num_frames >= 1 and size >= 8 pixels, got {num_frames}, {size}")
    return num_frames, size


def render_clips(specs: Sequence[ClipSpec], num_frames: int = 8, size: int = 32) -> dict:
    """Render a batch of specs at once: a dict with ``video [n,F,3,H,W]``, ``mask``, ``depth [n,F,H,W]``,
    ``centroid``, ``world_centroid [n,F,2]``, ``angle``, ``camera_x [n,F]``, ``prompts`` and ``specs``
    (fields as in :class:`Clip`)."""
    num_frames, size = _check_sizes(num_frames, size)
    specs = list(specs)
    if not specs:
        raise UserError("render_clips needs at least one ClipSpec")
    p, si, mi, cs, cols = _spec_tensors(specs)
    out = _render(p, si, mi, cs, cols, num_frames, size)
    out["prompts"] = [s.prompt for s in specs]
    out["specs"] = specs
    return out


def render_clip(spec: ClipSpec, num_frames: int = 8, size: int = 32) -> Clip:
    """Render one clip with its ground truth (see :class:`Clip`)."""
    out = render_clips([spec], num_frames, size)
    return Clip(**{k: out[k][0] for k in ("video", "mask", "depth", "centroid", "world_centroid", "angle",
                                          "camera_x")}, prompt=spec.prompt, spec=spec)


def sample_clips(n: int, seed: int = 0, prompts: str | Sequence[str] | None = None, num_frames: int = 8,
                 size: int = 32) -> dict:
    """A training batch of ``n`` random clips (dict as :func:`render_clips`): ``prompts`` is one prompt,
    ``n`` prompts or ``None`` (uniform over :func:`video_prompts`). Same seed, same batch."""
    num_frames, size = _check_sizes(num_frames, size)
    return render_clips(sample_clip_specs(prompts, n, seed, num_frames), num_frames, size)


def _prompt_seed(prompt: str, seed: int) -> int:
    return (zlib.crc32(prompt.encode()) * 1000003 + int(seed)) % (2**62)


@lru_cache(maxsize=4096)
def _reference_specs(prompt: str, k: int, seed: int) -> tuple[ClipSpec, ...]:
    return tuple(sample_clip_specs(prompt, k, _prompt_seed(prompt, seed)))


def reference_clips(prompt: str, k: int = 16, num_frames: int = 8, size: int = 32, seed: int = 0) -> dict:
    """A fixed set of ``k`` clips of ``prompt`` (dict as :func:`render_clips`), the same on every call and
    machine: the mixture components of the exact video teacher and the clean references of the metrics.

    The nuisance seed is derived from the *canonical* prompt (CRC-32) and ``seed``, so synonyms of a
    prompt get the same set and different prompts get independent sets; other lengths and sizes render the
    same clips (same specs, first ``k`` specs shared by larger ``k``). The specs are cached; the clips
    are rendered on each call (a few ms), so callers own the tensors they get."""
    num_frames, size = _check_sizes(num_frames, size)
    if int(k) < 1:
        raise UserError(f"reference_clips needs k >= 1, got {k}")
    canon = video_prompt(*parse_video_prompt(prompt))
    return render_clips(_reference_specs(canon, int(k), int(seed)), num_frames, size)


# ------------------------------------------------------------------------------------------------ domains

def block_size(size: int) -> int:
    """Side of the compression blocks of :func:`degrade` for frames ``size`` pixels wide (4 at 32)."""
    return max(2, round(size / 8))


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[...,H,W]`` (``sigma`` in pixels, taps to 3 sigma, reflect padding;
    identity for ``sigma <= 0``). Written as sums of shifted slices: much faster on CPU than a
    one-channel ``conv2d`` over many small frames."""
    if sigma <= 1e-6:
        return x
    rad = max(1, math.ceil(3 * sigma))
    t = torch.arange(-rad, rad + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).tolist()
    shp = x.shape
    y = x.reshape(-1, 1, shp[-2], shp[-1])
    for axis in (-1, -2):
        n = y.shape[axis]
        r = min(rad, n - 1)
        pad = (r, r, 0, 0) if axis == -1 else (0, 0, r, r)
        yp = F.pad(y, pad, mode="reflect")
        out = None
        for i in range(-r, r + 1):
            term = yp.narrow(axis, r + i, n) * k[rad + i]
            out = term if out is None else out + term
        y = out / sum(k[rad - r: rad + r + 1])
    return y.reshape(shp)


@lru_cache(maxsize=16)
def _watermark(size: int) -> Tensor:
    xs, ys = _pixel_grid(size)

    def box(x0, x1, y0, y1):  # antialiased axis-aligned box coverage
        cx = ((torch.minimum(xs - x0, x1 - xs)) * size + 0.5).clamp(0, 1)
        cy = ((torch.minimum(ys - y0, y1 - ys)) * size + 0.5).clamp(0, 1)
        return cx * cy

    wm = box(0.60, 0.94, 0.86, 0.90)                       # underline of a "logo"
    for x in (0.62, 0.71, 0.80, 0.89):                       # four letter strokes above it
        wm = torch.maximum(wm, box(x, x + 0.04, 0.74, 0.90))
    return wm


def watermark_pattern(size: int) -> Tensor:
    """The fixed watermark of the low-quality domain: coverage ``[H,W]`` in [0,1], bottom-right corner."""
    return _watermark(int(size)).clone()


#: watermark grey level and opacity at strength 1
_WM_GREY, _WM_ALPHA = 0.3, 0.4


def degrade(video: Tensor, seed: int = 0, strength: float = 1.0) -> Tensor:
    """Map clean frames to the low-quality "web video" domain (WebVid-like): same shape out.

    ``video`` is any ``[...,3,H,W]`` in [0,1] (clips ``[F,3,H,W]``, batches ``[B,F,3,H,W]``, images). With
    ``s = strength`` (0 = identity; 1 = the standard domain) in this order:

    1. a fixed semi-transparent dark grey watermark (:func:`watermark_pattern`, opacity ``min(0.4 s, 0.8)``)
       in screen space (it does not move with the camera);
    2. Gaussian blur, ``sigma = 0.8 s`` pixels at 32 px (scaled with the frame size);
    3. Gaussian sensor noise, ``std = 0.03 s`` per pixel and channel (seeded by ``seed``);
    4. blocky compression: each pixel is pulled ``min(0.35 s, 1)`` of the way to the mean of its
       :func:`block_size` block, then colours are quantised to ``max(4, round(32 - 20 s))`` levels.
    """
    s = float(strength)
    if s < 0:
        raise UserError(f"degrade strength must be >= 0, got {strength}")
    if video.dim() < 3 or video.shape[-3] != 3:
        raise ValueError(f"degrade expects [...,3,H,W] frames, got {tuple(video.shape)}")
    if s == 0:
        return video.clone()
    x = video.float()
    H, W = x.shape[-2:]
    wm = _watermark(W).to(x.device) if H == W else _watermark_hw(H, W).to(x.device)
    a = min(_WM_ALPHA * s, 0.8) * wm
    x = x * (1 - a) + _WM_GREY * a
    x = gaussian_blur(x, 0.8 * s * W / 32)
    gen = torch.Generator().manual_seed(int(seed))
    x = x + 0.03 * s * torch.randn(x.shape, generator=gen).to(x.device)
    b = block_size(W)
    if H % b == 0 and W % b == 0:
        shp = x.shape
        y = x.reshape(-1, 3, H, W)
        mean = F.avg_pool2d(y, b)
        mean = mean.repeat_interleave(b, -2).repeat_interleave(b, -1)
        y = y + min(0.35 * s, 1.0) * (mean - y)
        x = y.reshape(shp)
    levels = max(4, round(32 - 20 * s))
    x = torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)
    return x.clamp(0, 1)


def _watermark_hw(H: int, W: int) -> Tensor:
    return F.interpolate(_watermark(max(H, W))[None, None], size=(H, W), mode="bilinear",
                         align_corners=False)[0, 0]


def hq_images(n: int, seed: int = 0, size: int = 32, prompts: str | Sequence[str] | None = None
              ) -> tuple[Tensor, list[str]]:
    """The high-quality image domain: ``n`` sharp single frames ``[n,3,H,W]`` and their captions
    (``"a red ball"``; shape and colour only).

    Objects are those of the clips (random nuisance parameters drawn as for :func:`sample_clip_specs`),
    rendered with crisp antialiased edges, a fake dome shading lit from the top left (x0.82..1.1 across
    the object) and a specular highlight, on the clean striped background -- no blur, noise, blocks or
    watermark. ``prompts`` (video prompts) choose the objects; ``None`` draws them uniformly."""
    n = int(n)
    size = _check_sizes(1, size)[1]
    if n < 1:
        raise UserError(f"hq_images needs n >= 1, got {n}")
    specs = sample_clip_specs(prompts, n, seed, 2)
    p, si, mi, cs, cols = _spec_tensors(specs)
    out = _render(p, si, mi, cs, cols, 1, size, hq=True)
    return out["video"][:, 0], [f"a {s.color} {s.shape}" for s in specs]
