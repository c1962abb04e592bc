"""Dynamic 3D ShapeWorld: multi-object 4D scenes with full ground truth (DreamScene4D, issue 20 part 1-2).

Two or three ShapeWorld objects (their exact Gaussian sets, ``studio.world.objects``) move in 3D along known
trajectories -- translation, rotation about their own axes, and for some objects a non-rigid *bend* -- in
front of a textured back wall, seen by a static or a moving pinhole camera. Every frame is rendered by the
studio's Gaussian rasterizer (``studio.render.rasterize_gaussians``), so colours, masks, depth and flow
all come from the renderer; the wall is ray-traced exactly (ray / plane intersection and an analytic
texture).

Conventions (``studio.cameras``): y-up world, OpenCV cameras (``viewmats`` world-to-camera), pixel
``(row i, col j)`` centred at ``(j + 0.5, i + 0.5)``; tracks are ``(x, y)`` = ``(column, row)`` pixel
coordinates in that convention. Vertical field of view 49.1 degrees (DreamScene4D / Zero123's setting).
All tensors are torch, CPU, float32 unless said otherwise.

``Scene4D`` fields (``K`` objects, ``T`` frames, ``H x W`` pixels, ``P`` tracked surface points per object):

* ``frames [T,H,W,3]`` float in [0, 1]: the video.
* ``masks [K,T,H,W]`` bool: *visible* per-object masks. A pixel belongs to object k when the joint render's
  alpha exceeds 0.5 and k has the largest blend weight there (the renderer's per-object weights rendered
  as one-hot features), and k's own alpha there exceeds 0.5 (so ``masks <= amodal_masks``).
* ``amodal_masks [K,T,H,W]`` bool: each object rendered alone, alpha > 0.5.
* ``object_rgb [K,T,H,W,3]`` / ``object_alpha [K,T,H,W]``: each object rendered alone over white / its
  alpha: the ground truth of amodal completion (``amodal_completion_target``).
* ``depth [T,H,W]``: view-space z (distance along the optical axis) of the *objects* layer (the joint
  render's expected depth), **0 where no object covers the pixel** (alpha <= 0.5), the renderers'
  convention. ``background_depth [T,H,W]`` is the wall's exact z (finite everywhere) and
  ``scene_depth [T,H,W]`` the two combined (object depth where an object covers the pixel, else the wall).
* ``object_depth [K,T,H,W]``: each object's own expected depth (0 off its amodal mask).
* ``cameras``: a ``studio.cameras.Cameras`` batch of ``T`` cameras (``scene.cameras[t]`` is frame t's);
  ``camera_to_world(scene)`` / ``relative_camera_poses(scene)`` / ``camera_pose_records(scene)`` give the
  pose ground truth in the forms the method needs (spec 1.4).
* ``fps``, ``object_names`` (ShapeWorld names), ``prompts`` (their prompts), ``name``.
* ``canonical_points [K,P,3]``: the tracked points in each object's canonical frame (the object's own
  coordinates before bending, scaling, rotating and translating).
* ``points_3d [K,P,T,3]``: world trajectories of those points.
* ``tracks_2d [K,P,T,2]``: their pixel positions ``(x, y)`` in each frame's camera;
  ``track_visible [K,P,T]`` bool: inside the image, facing the camera (its surfel normal), and not occluded by
  the renderer's own blend rule: the transmittance at the point's pixel position through every Gaussian (of any
  object) nearer to the camera than the point, except its own surface patch (Gaussians within ``VIS_SIGMAS``
  footprints or ``VIS_PATCH`` times the object's scale of it in 3D), exceeds 0.5. The tracked points are
  Gaussian centres.
* ``flow [T-1,H,W,2]``: forward optical flow ``t -> t+1`` in pixels, defined on frame t's pixels:
  object pixels carry the blend of their Gaussians' projected displacements (the renderer's
  N-channel features), wall pixels the exact displacement of the wall point (zero for a static camera),
  composited with the render's alpha like colour. ``flow_backward [T-1,H,W,2]``: entry t is the flow from frame
  t+1 back to frame t, on frame t+1's pixels (same construction); ``flow_fb_valid(scene)`` applies the
  forward-backward consistency rule of spec 1.6 to the pair.
* ``background [H,W,3]``: the clean wall plate of frame 0; ``background_frames [T,H,W,3]`` of every frame
  (they differ only when the camera moves). The wall is the plane ``z = wall_z`` with the analytic
  texture ``wall_texture(xy, wall_seed)``.
* ``object_poses [K,T,4,4]``: object-to-world transforms ``x_w = R (s x_b) + t`` applied after the bend
  (``object_scales [K]`` = s, rotation and translation in the matrix, which includes the scale).
* ``bend_angles [K,T]`` (radians; 0 for rigid objects) and ``bend_fn``: the non-rigid ground truth, see
  ``bend_points``. ``rigid [K]`` bool.
* ``spec``: the ``SceneSpec`` the scene was made from (``save_scene`` stores it as JSON).

Entry points:

* scenes: ``scene_names()``, ``scene_spec(name)``, ``make_scene(name_or_spec, size=, frames=, seed=)``,
  ``random_spec(seed)`` / ``random_scene(seed)``, ``render_scene(spec, size=, frames=, seed=)``;
* files: ``save_scene(scene, dir)`` / ``load_scene(dir)``, ``load_video_input(video_or_frame_dir, masks=)``,
  ``load_mask_tracks(masks, T, H, W)``;
* ground truth for the method stages: ``scene_gaussians(scene, t)`` (the exact world Gaussians of frame t;
  ``object_gaussians`` / ``posed_gaussians`` build them), ``render_view(scene, t, cameras)`` (novel views),
  ``wall_render(cameras, wall_z, seed)`` and ``wall_texture`` (the background), ``occlusion_region`` /
  ``amodal_completion_target`` (amodal completion), ``object_center_depth`` / ``object_median_depth``
  (composition depth), ``camera_to_world`` / ``relative_camera_poses`` / ``camera_pose_records`` /
  ``cameras_from_pose_records`` / ``camera_pose_errors`` (camera motion), ``bend_points`` (non-rigid motion),
  ``project_points`` (per-frame projection).

Saved layout (``save_scene``; the DreamScene4D data layout of spec 1.1 plus ground truth)::

    <dir>/video.mp4                      H.264 of the frames (lossy; for viewers and the CLI)
    <dir>/frames/00000.png ...           the exact frames (lossless)
    <dir>/masks/001/00000.png ...        visible mask of object 1 (255 = object), one folder per object
    <dir>/amodal_masks/001/00000.png ... amodal masks
    <dir>/ground_truth.npz               every array field of Scene4D and the cameras' viewmats / Ks
    <dir>/scene.json                     names, fps, sizes, spec, camera poses (pos + x,y,z,w quaternion)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..cameras import Cameras, intrinsics_from_fov, look_at, spherical_to_position
from ..errors import UserError
from ..render.gaussians import rasterize_gaussians
from .objects import OBJECTS, get_object
from .primitives import gaussian_normals, rotation_matrix, rotmat_to_quat

__all__ = [
    "FOVY", "VIS_SIGMAS", "VIS_PATCH", "ObjectTrack", "SceneSpec", "Scene4D", "scene_names", "scene_spec", "make_scene",
    "random_scene", "random_spec", "render_scene", "save_scene", "load_scene", "load_video_input", "load_mask_tracks",
    "bend_points",
    "wall_texture", "camera_to_world", "relative_camera_poses", "camera_pose_records", "cameras_from_pose_records",
    "amodal_completion_target", "occlusion_region", "project_points", "object_gaussians", "posed_gaussians",
    "scene_gaussians", "render_view", "wall_render", "object_center_depth", "object_median_depth", "camera_pose_errors",
    "flow_fb_valid", "warp_backward",
]

FOVY = 49.1
#: ``track_visible``: Gaussians closer in 3D to a tracked point than ``max(VIS_SIGMAS footprints, VIS_PATCH x object
#: scale)`` are its own surface patch, never its occluders; the footprint is ``sqrt(s^2 + eps2d (z / f)^2)`` (the
#: point's Gaussian scale ``s`` and the renderer's 0.3 px^2 screen dilation at its depth ``z``, in world units).
#: The patch term keeps points seen at grazing angles visible (the nearer part of their own surface overlaps them
#: within a pixel); occluders farther away (another object, a snowman's head over its body) still count.
VIS_SIGMAS = 3.0
VIS_PATCH = 0.25


# ----------------------------------------------------------------------------------------------- spec
@dataclass
class ObjectTrack:
    """One object's motion. ``u = t / (T - 1)`` runs over [0, 1]:

    * translation ``start + (end - start) * u + (0, hop * sin(pi u), 0)``;
    * rotation ``R_y(yaw + spin * u) @ R_x(tilt)`` (degrees);
    * bend angle ``bend * sin(2 pi bend_cycles u)`` (degrees; 0 = rigid), see ``bend_points``;
    * ``scale`` maps the ShapeWorld object (about 1 unit wide) to world units.
    """

    name: str
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    scale: float = 0.55
    yaw: float = 0.0
    spin: float = 0.0
    tilt: float = 0.0
    hop: float = 0.0
    bend: float = 0.0
    bend_cycles: float = 1.0


@dataclass
class SceneSpec:
    """A scene: objects, camera path and wall. ``camera`` is ``"static"`` (at ``camera_elevation`` /
    ``camera_azimuth`` / ``camera_radius``, looking at the origin) or ``"orbit"`` (azimuth sweeps
    ``camera_azimuth +- camera_sweep / 2``, elevation rises by ``camera_rise``, radius shrinks by ``camera_dolly``)."""

    name: str
    objects: list[ObjectTrack]
    camera: str = "static"
    camera_elevation: float = 6.0
    camera_azimuth: float = 0.0
    camera_radius: float = 2.7
    camera_sweep: float = 24.0
    camera_rise: float = 6.0
    camera_dolly: float = 0.3
    wall_z: float = -1.6
    wall_seed: int = 0
    n_gaussians: int = 4000
    n_points: int = 256
    fps: float = 8.0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "SceneSpec":
        d = dict(d)
        d["objects"] = [ObjectTrack(**{**o, "start": tuple(o["start"]), "end": tuple(o["end"])}) for o in d["objects"]]
        return SceneSpec(**d)


def _scenes() -> dict[str, SceneSpec]:
    two = [ObjectTrack("penguin", (-0.95, -0.05, 0.45), (0.95, 0.0, 0.45), scale=0.6, yaw=-30, spin=80),
           ObjectTrack("house", (0.9, 0.0, -0.35), (-0.9, 0.05, -0.35), scale=0.65, yaw=20, spin=-60)]
    bend = [ObjectTrack("tree", (0.0, 0.0, -0.2), (0.15, 0.0, -0.25), scale=0.75, spin=30, bend=28,
                        bend_cycles=1.0),
            ObjectTrack("two_tone_box", (-1.0, -0.1, 0.5), (1.0, 0.05, 0.5), scale=0.5, yaw=-40, spin=120, tilt=15)]
    trio = [ObjectTrack("snowman", (-0.8, 0.0, -0.5), (0.6, 0.0, -0.2), scale=0.6, yaw=-20, spin=60),
            ObjectTrack("mushroom", (0.9, -0.1, 0.5), (-0.9, -0.1, 0.4), scale=0.5, spin=-90, hop=0.35),
            ObjectTrack("tree", (0.2, 0.05, 0.0), (0.1, 0.05, 0.1), scale=0.6, bend=24, bend_cycles=1.0, spin=20)]
    return {
        "two_cross": SceneSpec("two_cross", two, wall_seed=1),
        "bend_occlude": SceneSpec("bend_occlude", bend, wall_seed=2),
        "trio": SceneSpec("trio", trio, wall_seed=3),
        "trio_orbit": SceneSpec("trio_orbit", [replace(o) for o in trio], camera="orbit", wall_seed=3),
    }


def scene_names() -> list[str]:
    """The fixed benchmark scenes: ``two_cross`` (two rigid objects crossing, static camera),
    ``bend_occlude`` (a bending tree occluded by a spinning box), ``trio`` (three objects, one bending,
    a hop) and ``trio_orbit`` (the same with a moving camera)."""
    return list(_scenes())


def scene_spec(name: str) -> SceneSpec:
    """The ``SceneSpec`` of a named scene (``UserError`` listing the names)."""
    specs = _scenes()
    if name not in specs:
        raise UserError(f"unknown 4D scene {name!r}; choose one of: {', '.join(specs)} "
                        "(or pass a SceneSpec / use random_scene(seed))")
    return specs[name]


def random_spec(seed: int, *, n_objects: int | None = None, camera: str | None = None,
                bend_probability: float = 0.5) -> SceneSpec:
    """A random scene: 2-3 distinct ShapeWorld objects on crossing paths at different depths (so they
    occlude each other), random spins and hops, maybe one bending object, static or orbiting camera."""
    g = torch.Generator().manual_seed(int(seed) + 7919)

    def u(lo, hi):
        return float(lo + (hi - lo) * torch.rand((), generator=g))

    k = n_objects if n_objects is not None else (2 if u(0, 1) < 0.5 else 3)
    if not 1 <= k <= 9:
        raise UserError(f"n_objects must be in 1..9, got {k}")
    names = list(OBJECTS)
    pick = torch.randperm(len(names), generator=g)[:k].tolist()
    depths = torch.linspace(-0.5, 0.5, k)[torch.randperm(k, generator=g)].tolist()
    bend_idx = int(torch.randint(k, (), generator=g)) if u(0, 1) < bend_probability else -1
    objs = []
    for i, j in enumerate(pick):
        side = 1.0 if (i % 2 == 0) else -1.0
        x0, x1 = side * u(0.6, 1.0), -side * u(0.4, 1.0)
        z = depths[i]
        objs.append(ObjectTrack(names[j], (x0, u(-0.2, 0.2), z), (x1, u(-0.2, 0.2), z + u(-0.2, 0.2)),
                                scale=u(0.45, 0.65), yaw=u(-45, 45), spin=u(-120, 120), tilt=u(-15, 15),
                                hop=u(0, 0.3) if u(0, 1) < 0.3 else 0.0,
                                bend=u(15, 30) if i == bend_idx else 0.0))
    cam = camera if camera is not None else ("orbit" if u(0, 1) < 0.5 else "static")
    return SceneSpec(f"random_{seed}", objs, camera=cam, wall_seed=int(seed) + 100,
                     camera_sweep=u(12, 30), camera_elevation=u(0, 12))


# ----------------------------------------------------------------------------------------------- scene
@dataclass
class Scene4D:
    """A rendered 4D scene with ground truth (see the module docstring for every field)."""

    frames: Tensor
    masks: Tensor
    amodal_masks: Tensor
    depth: Tensor
    cameras: Cameras
    fps: float
    object_names: list[str]
    points_3d: Tensor
    tracks_2d: Tensor
    track_visible: Tensor
    flow: Tensor
    background: Tensor
    object_poses: Tensor
    bend_angles: Tensor
    object_scales: Tensor
    canonical_points: Tensor
    object_rgb: Tensor
    object_alpha: Tensor
    object_depth: Tensor
    background_depth: Tensor
    scene_depth: Tensor
    background_frames: Tensor
    flow_backward: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    name: str = ""
    spec: SceneSpec | None = None
    seed: int = 0

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def num_objects(self) -> int:
        return self.masks.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.frames.shape[1:3])

    @property
    def rigid(self) -> Tensor:
        return (self.bend_angles.abs() < 1e-12).all(dim=1)

    @property
    def static_camera(self) -> bool:
        return bool(torch.allclose(self.cameras.viewmats, self.cameras.viewmats[:1].expand_as(self.cameras.viewmats)))

    def camera_list(self) -> list[Cameras]:
        """The per-frame cameras as a list of one-camera batches."""
        return [self.cameras[t] for t in range(len(self.cameras))]


# ----------------------------------------------------------------------------------------------- geometry
def bend_points(points: Tensor, angle: Tensor | float, y_range: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """The non-rigid bend, in an object's canonical frame: each point turns about the z axis through the
    pivot ``(0, y_lo, 0)`` by ``angle * h`` with ``h = (y - y_lo) / (y_hi - y_lo)`` clamped to [0, 1]
    (the base stays, the top sways sideways). Returns bent points ``[...,3]`` and the per-point rotations
    ``[...,3,3]`` (to carry Gaussian orientations and normals along)."""
    y_lo, y_hi = y_range
    h = ((points[..., 1] - y_lo) / max(y_hi - y_lo, 1e-6)).clamp(0, 1)
    th = torch.as_tensor(angle, dtype=points.dtype) * h
    c, s = torch.cos(th), torch.sin(th)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    R = torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)
    pivot = torch.tensor([0.0, y_lo, 0.0], dtype=points.dtype)
    return ((R @ (points - pivot)[..., None])[..., 0] + pivot), R


def _quat_mul(a: Tensor, b: Tensor) -> Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def _object_state(track: ObjectTrack, T: int) -> tuple[Tensor, Tensor]:
    """``poses [T,4,4]`` (object-to-world incl. scale) and ``bend angles [T]`` (radians)."""
    u = torch.linspace(0, 1, T) if T > 1 else torch.zeros(1)
    start, end = torch.tensor(track.start), torch.tensor(track.end)
    trans = start + (end - start) * u[:, None]
    trans[:, 1] += track.hop * torch.sin(math.pi * u)
    poses = torch.eye(4).repeat(T, 1, 1)
    for t in range(T):
        R = rotation_matrix("y", track.yaw + track.spin * float(u[t])) @ rotation_matrix("x", track.tilt)
        poses[t, :3, :3] = R * track.scale
        poses[t, :3, 3] = trans[t]
    bend = torch.deg2rad(torch.tensor(track.bend)) * torch.sin(2 * math.pi * track.bend_cycles * u)
    return poses, bend


def _scene_cameras(spec: SceneSpec, T: int, H: int, W: int) -> Cameras:
    u = torch.linspace(0, 1, T) if T > 1 else torch.zeros(1)
    if spec.camera == "static":
        el = torch.full((T,), spec.camera_elevation)
        az = torch.full((T,), spec.camera_azimuth)
        r = torch.full((T,), spec.camera_radius)
    elif spec.camera == "orbit":
        az = spec.camera_azimuth + spec.camera_sweep * (u - 0.5)
        el = spec.camera_elevation + spec.camera_rise * u
        r = spec.camera_radius - spec.camera_dolly * u
    else:
        raise UserError(f"SceneSpec.camera must be 'static' or 'orbit', got {spec.camera!r}")
    eyes = spherical_to_position(el, az, r)
    return Cameras(look_at(eyes), intrinsics_from_fov(torch.full((T,), FOVY), W, H), W, H)


def project_points(cameras: Cameras, points: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame projection: ``points [..., T, 3]`` with camera t for slice t -> pixels ``[..., T, 2]``
    ``(x, y)`` and view-space depth ``[..., T]``."""
    R = cameras.viewmats[:, :3, :3]
    tr = cameras.viewmats[:, :3, 3]
    pc = (R @ points[..., None])[..., 0] + tr
    z = pc[..., 2]
    f = torch.stack([cameras.Ks[:, 0, 0], cameras.Ks[:, 1, 1]], -1)
    c = cameras.Ks[:, :2, 2]
    return pc[..., :2] / z[..., None] * f + c, z


def wall_texture(xy: Tensor, seed: int = 0) -> Tensor:
    """Analytic colour ``[...,3]`` in [0.1, 0.9] of the back wall at wall coordinates ``xy [...,2]``: a soft
    checker plus two coloured sinusoid gratings (smooth at 64 px, textured enough for photometric pose
    estimation), palette and phases from ``seed``."""
    g = torch.Generator().manual_seed(int(seed) + 31)
    base = 0.35 + 0.3 * torch.rand(3, generator=g)
    alt = 0.35 + 0.3 * torch.rand(3, generator=g)
    ph = torch.rand(4, generator=g) * 2 * math.pi
    fr = 0.8 + 0.8 * torch.rand(4, generator=g)
    x, y = xy[..., 0], xy[..., 1]
    check = torch.tanh(3.0 * torch.sin(math.pi * x * 1.6 + ph[0]) * torch.sin(math.pi * y * 1.6 + ph[1]))
    w = (0.5 + 0.5 * check)[..., None]
    col = base * w + alt * (1 - w)
    col = col + 0.1 * torch.sin(2 * math.pi * fr[2] * (x + 0.5 * y) + ph[2])[..., None] * torch.tensor([1.0, -0.5, 0.3])
    col = col + 0.08 * torch.sin(2 * math.pi * fr[3] * (y - 0.3 * x) + ph[3])[..., None] * torch.tensor([-0.4, 0.6, 1.0])
    return col.clamp(0.1, 0.9)


def wall_render(cams: Cameras, wall_z: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ray-trace the back wall ``z = wall_z`` (texture ``wall_texture(xy, seed)``) into ``cams``: colours
    ``[C,H,W,3]``, view-space depth ``[C,H,W]`` and the world points hit ``[C,H,W,3]``: the background's ground truth."""
    H, W = cams.height, cams.width
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    Kinv = torch.linalg.inv(cams.Ks)  # [T,3,3]
    pix = torch.stack([jj, ii, torch.ones_like(jj)], -1)  # [H,W,3]
    d_cam = torch.einsum("tij,hwj->thwi", Kinv, pix)  # z = 1
    c2w = cams.c2w_opencv
    d_w = torch.einsum("tij,thwj->thwi", c2w[:, :3, :3], d_cam)
    o = c2w[:, :3, 3][:, None, None]
    s = (wall_z - o[..., 2]) / d_w[..., 2]
    if bool((s <= 0).any()):
        raise UserError("the wall is behind a camera; keep the cameras in front of wall_z")
    pts = o + s[..., None] * d_w
    return wall_texture(pts[..., :2], seed), s, pts


# ----------------------------------------------------------------------------------------------- render
def _y_range(points: Tensor) -> tuple[float, float]:
    return float(points[:, 1].min()), float(points[:, 1].max())


def object_gaussians(spec: SceneSpec, k: int, seed: int = 0) -> dict[str, Tensor]:
    """Object ``k``'s canonical Gaussian set (its own frame, before bend / scale / pose), as the scene renders it,
    plus ``y_range`` (the bend's pivot span, a ``(lo, hi)`` tuple)."""
    g = get_object(spec.objects[k].name).gaussians(spec.n_gaussians, seed=int(seed) * 1009 + k)
    g["y_range"] = _y_range(g["means"])
    return g


def posed_gaussians(g: dict, pose: Tensor, bend: Tensor | float, scale: float) -> dict[str, Tensor]:
    """A canonical set ``g`` (from ``object_gaussians``) bent by ``bend`` (radians, ``bend_points``) and moved by
    the object-to-world ``pose [4,4]`` (rotation times ``scale``, translation): activated world Gaussians."""
    m, Rb = bend_points(g["means"], bend, g["y_range"])
    A = pose[:3, :3]
    qb = rotmat_to_quat((A / scale)[None] @ Rb)
    return {"means": m @ A.T + pose[:3, 3], "quats": _quat_mul(qb, g["quats"]), "scales": g["scales"] * scale,
            "opacities": g["opacities"], "colors": g["colors"]}


def scene_gaussians(scene: "Scene4D", t: int, objects: Sequence[int] | None = None) -> dict[str, Tensor]:
    """The ground-truth world Gaussians of ``scene`` at frame ``t`` (all objects or ``objects``), exactly those the
    frames were rendered from, plus ``object [N]`` (each Gaussian's object index). Needs ``scene.spec``."""
    if scene.spec is None:
        raise UserError("this Scene4D has no spec (not a ShapeWorld scene), so its Gaussians are unknown")
    ks = range(scene.num_objects) if objects is None else list(objects)
    parts = [posed_gaussians(object_gaussians(scene.spec, k, scene.seed), scene.object_poses[k, t],
                             scene.bend_angles[k, t], float(scene.object_scales[k])) for k in ks]
    out = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    out["object"] = torch.cat([torch.full((p["means"].shape[0],), k) for k, p in zip(ks, parts)])
    return out


@torch.no_grad()
def render_view(scene: "Scene4D", t: int, cameras: Cameras, *, wall: bool = True,
                objects: Sequence[int] | None = None, backend: str = "auto") -> dict[str, Tensor]:
    """Ground-truth render of frame ``t``'s objects from any ``cameras`` (novel views): ``images [C,H,W,3]`` over the
    wall (``wall=True``, ray-traced as in the video) or white, ``alphas [C,H,W]``, ``depth [C,H,W]`` (objects'
    expected depth, 0 where alpha <= 0.5)."""
    g = scene_gaussians(scene, t, objects)
    C = len(cameras)
    r, a, _ = rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], cameras.viewmats,
                                  cameras.Ks, cameras.width, cameras.height, render_mode="RGB+ED",
                                  backgrounds=None if wall else torch.ones(C, 3), backend=backend)
    a = a[..., 0].clamp(0, 1)
    img = r[..., :3]
    if wall:
        rgb, _, _ = wall_render(cameras, scene.spec.wall_z, scene.spec.wall_seed)
        img = img + (1 - a)[..., None] * rgb
    return {"images": img.clamp(0, 1), "alphas": a, "depth": torch.where(a > 0.5, r[..., 3], torch.zeros(()))}


@torch.no_grad()
def render_scene(spec: SceneSpec, *, size: int | tuple[int, int] = 64, frames: int = 16, seed: int = 0,
                 backend: str = "auto") -> Scene4D:
    """Render ``spec`` to a ``Scene4D`` (``size`` an int or ``(H, W)``; ``seed`` draws the Gaussian sets
    and the tracked points)."""
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    T = int(frames)
    if T < 2:
        raise UserError(f"frames must be >= 2 for a 4D scene, got {frames}")
    if min(H, W) < 8:
        raise UserError(f"size must be at least 8 pixels, got {H}x{W}")
    if not spec.objects:
        raise UserError("a SceneSpec needs at least one object")
    K = len(spec.objects)
    cams = _scene_cameras(spec, T, H, W)
    wall_rgb, wall_depth, wall_pts = wall_render(cams, spec.wall_z, spec.wall_seed)

    gen = torch.Generator().manual_seed(int(seed))
    per_t: list[list[dict[str, Tensor]]] = []  # [K][T] world Gaussians
    track_idx, n_all = [], []  # tracked Gaussians' indices in the joint set, Gaussians per object
    canon_pts, pts3d, poses_all, bends_all, scales, names, prompts = [], [], [], [], [], [], []
    for k, tr in enumerate(spec.objects):
        obj = get_object(tr.name)
        names.append(obj.name)
        prompts.append(obj.prompt)
        g = object_gaussians(spec, k, seed)
        poses, bends = _object_state(tr, T)
        poses_all.append(poses)
        bends_all.append(bends)
        scales.append(tr.scale)
        idx = torch.randperm(g["means"].shape[0], generator=gen)[: spec.n_points]
        track_idx.append(idx + sum(n_all))
        n_all.append(g["means"].shape[0])
        canon_pts.append(g["means"][idx])
        seq = []
        traj = []
        for t in range(T):
            seq.append(posed_gaussians(g, poses[t], bends[t], tr.scale))
            traj.append(seq[-1]["means"][idx])
        per_t.append(seq)
        pts3d.append(torch.stack(traj, 1))  # [P,T,3]
    points_3d = torch.stack(pts3d)  # [K,P,T,3]
    poses = torch.stack(poses_all)
    bends = torch.stack(bends_all)

    obj_rgb = torch.ones(K, T, H, W, 3)
    obj_alpha = torch.zeros(K, T, H, W)
    obj_depth = torch.zeros(K, T, H, W)
    frames_out = torch.zeros(T, H, W, 3)
    depth = torch.zeros(T, H, W)
    flow = torch.zeros(max(T - 1, 0), H, W, 2)
    flow_back = torch.zeros(max(T - 1, 0), H, W, 2)
    masks = torch.zeros(K, T, H, W, dtype=torch.bool)
    visible = torch.zeros(K, points_3d.shape[1], T, dtype=torch.bool)
    white = torch.ones(1, 3)

    def rast(g, t, feats, bg):
        return rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], feats,
                                   cams.viewmats[t:t + 1], cams.Ks[t:t + 1], W, H, backgrounds=bg,
                                   render_mode="RGB+ED", backend=backend)

    for t in range(T):
        for k in range(K):
            g = per_t[k][t]
            r, a, _ = rast(g, t, g["colors"], white)
            obj_rgb[k, t] = r[0, ..., :3].clamp(0, 1)
            obj_alpha[k, t] = a[0, ..., 0].clamp(0, 1)
            obj_depth[k, t] = torch.where(a[0, ..., 0] > 0.5, r[0, ..., 3], torch.zeros(()))
        # joint render: colour, per-object weights (one-hot), flow displacement features
        allg = {key: torch.cat([per_t[k][t][key] for k in range(K)]) for key in per_t[0][t]}
        n_k = [per_t[k][t]["means"].shape[0] for k in range(K)]
        onehot = torch.cat([torch.nn.functional.one_hot(torch.full((n,), k), K).float() for k, n in enumerate(n_k)])
        p0, _ = cams[t].project(allg["means"])
        disp = torch.zeros(allg["means"].shape[0], 4)  # forward (to t+1) and backward (to t-1) displacements
        if t < T - 1:
            p1, _ = cams[t + 1].project(torch.cat([per_t[k][t + 1]["means"] for k in range(K)]))
            disp[:, :2] = (p1 - p0)[0]
        if t > 0:
            pm, _ = cams[t - 1].project(torch.cat([per_t[k][t - 1]["means"] for k in range(K)]))
            disp[:, 2:] = (pm - p0)[0]
        feats = torch.cat([allg["colors"], onehot, disp], -1)
        r, a, meta = rast(allg, t, feats, None)
        a = a[0, ..., 0].clamp(0, 1)
        gi = torch.cat(track_idx)
        qz = meta["depths"][0, gi].detach()
        s_q = allg["scales"][gi].amax(-1)
        patch = torch.cat([torch.full((ti.numel(),), VIS_PATCH * float(o.scale)) for ti, o in zip(track_idx, spec.objects)])
        rad = torch.maximum(VIS_SIGMAS * torch.sqrt(s_q ** 2 + 0.3 * (qz / cams.Ks[t, 0, 0]) ** 2), patch)
        trans = _transmittance_at(meta, allg["means"], meta["means2d"][0, gi].detach(), qz, allg["means"][gi], rad)
        nrm = gaussian_normals(allg["quats"][gi])
        facing = (nrm * (cams.centers[t] - allg["means"][gi])).sum(-1) > 0
        visible[:, :, t] = ((trans > 0.5) & facing).reshape(K, -1)
        rgb = r[0, ..., :3]
        frames_out[t] = (rgb + (1 - a)[..., None] * wall_rgb[t]).clamp(0, 1)
        cover = a > 0.5
        depth[t] = torch.where(cover, r[0, ..., -1], torch.zeros(()))
        weights = r[0, ..., 3:3 + K]
        owner = weights.argmax(-1)
        for k in range(K):
            masks[k, t] = cover & (owner == k) & (obj_alpha[k, t] > 0.5)
        jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
        pix = torch.stack([jj, ii], -1)
        for dt, out_flow, ch in ((1, flow, 0), (-1, flow_back, 2)):
            if 0 <= t + dt < T:
                bg_to, _ = cams[t + dt].project(wall_pts[t].reshape(-1, 3))
                bg_flow = bg_to[0].reshape(H, W, 2) - pix
                out_flow[t if dt == 1 else t - 1] = r[0, ..., 3 + K + ch:3 + K + ch + 2] + (1 - a)[..., None] * bg_flow
    amodal = obj_alpha > 0.5
    scene_depth = torch.where(depth > 0, depth, wall_depth)
    tracks, z = project_points(cams, points_3d)
    visible &= (tracks[..., 0] >= 0) & (tracks[..., 0] < W) & (tracks[..., 1] >= 0) & (tracks[..., 1] < H) & (z > 0)
    return Scene4D(
        frames=frames_out, masks=masks, amodal_masks=amodal, depth=depth, cameras=cams, fps=float(spec.fps),
        object_names=names, points_3d=points_3d, tracks_2d=tracks, track_visible=visible, flow=flow,
        flow_backward=flow_back, background=wall_rgb[0].clone(), object_poses=poses, bend_angles=bends,
        object_scales=torch.tensor(scales, dtype=torch.float32), canonical_points=torch.stack(canon_pts),
        object_rgb=obj_rgb, object_alpha=obj_alpha, object_depth=obj_depth, background_depth=wall_depth,
        scene_depth=scene_depth, background_frames=wall_rgb, prompts=prompts, name=spec.name, spec=spec,
        seed=int(seed))


def _transmittance_at(meta: dict, means: Tensor, query: Tensor, query_depth: Tensor, query_xyz: Tensor,
                      exclude_radius: Tensor, cell: int = 4) -> Tensor:
    """Transmittance ``[Q]`` at pixel positions ``query [Q,2]`` through every Gaussian of a one-camera render
    (its ``meta``; world ``means [N,3]``) whose view depth is below ``query_depth`` and whose centre lies farther
    than ``exclude_radius [Q]`` from ``query_xyz [Q,3]``: ``prod (1 - alpha_j)`` with the
    renderer's alpha rule (``opacity * exp(-sigma)``, capped at 0.999, dropped below 1/255, within the
    Gaussian's 3-sigma ``radii``). Gaussians are binned into ``cell``-pixel cells by their extent."""
    alpha_max, alpha_min = 0.999, 1.0 / 255.0  # the rasterizer's rule (studio.render, module _common)
    m2, con, dep = meta["means2d"][0].detach(), meta["conics"][0].detach(), meta["depths"][0].detach()
    op, rad = meta["opacities"][0].detach(), meta["radii"][0]
    ok = (rad > 0).all(-1)
    m2, con, dep, op, rad, xyz = m2[ok], con[ok], dep[ok], op[ok], rad[ok].float(), means[ok]
    W, H = int(meta["width"]), int(meta["height"])
    gw, gh = (W + cell - 1) // cell, (H + cell - 1) // cell
    lo = ((m2 - rad) / cell).floor().long()
    hi = ((m2 + rad) / cell).floor().long()
    lo[:, 0].clamp_(0, gw - 1), lo[:, 1].clamp_(0, gh - 1), hi[:, 0].clamp_(0, gw - 1), hi[:, 1].clamp_(0, gh - 1)
    span = int((hi - lo).max()) + 1 if m2.shape[0] else 0
    cells, gids = [], []
    for dy in range(span):
        for dx in range(span):
            cx, cy = lo[:, 0] + dx, lo[:, 1] + dy
            keep = (cx <= hi[:, 0]) & (cy <= hi[:, 1])
            cells.append((cy * gw + cx)[keep])
            gids.append(torch.nonzero(keep).flatten())
    cells_t, gids_t = (torch.cat(cells), torch.cat(gids)) if cells else (torch.zeros(0, dtype=torch.long),) * 2
    order = torch.argsort(cells_t)
    cells_t, gids_t = cells_t[order], gids_t[order]
    bounds = torch.searchsorted(cells_t, torch.arange(gw * gh + 1))
    qc = (query / cell).floor().long()
    inside = (qc[:, 0] >= 0) & (qc[:, 0] < gw) & (qc[:, 1] >= 0) & (qc[:, 1] < gh)
    qcell = torch.where(inside, qc[:, 1] * gw + qc[:, 0], torch.full_like(qc[:, 0], -1))
    out = torch.ones(query.shape[0])
    for c in torch.unique(qcell[qcell >= 0]).tolist():
        qi = torch.nonzero(qcell == c).flatten()
        g = gids_t[bounds[c]:bounds[c + 1]]
        if g.numel() == 0:
            continue
        d = query[qi][:, None] - m2[g][None]
        cg = con[g]
        sig = 0.5 * (cg[:, 0] * d[..., 0] ** 2 + cg[:, 2] * d[..., 1] ** 2) + cg[:, 1] * d[..., 0] * d[..., 1]
        a = torch.clamp(op[g] * torch.exp(-sig), max=alpha_max)
        far = (xyz[g][None] - query_xyz[qi][:, None]).norm(dim=-1) > exclude_radius[qi][:, None]
        front = (dep[g][None] < query_depth[qi][:, None]) & far
        a = torch.where((a >= alpha_min) & (sig >= 0) & front, a, torch.zeros(()))
        out[qi] = torch.exp(torch.log1p(-a).sum(-1))
    return out


def make_scene(name_or_spec: str | SceneSpec, *, size: int | tuple[int, int] = 64, frames: int = 16,
               seed: int = 0, backend: str = "auto") -> Scene4D:
    """A named benchmark scene (``scene_names()``), a ``SceneSpec``, or ``"random_<seed>"``, rendered."""
    if isinstance(name_or_spec, SceneSpec):
        spec = name_or_spec
    elif isinstance(name_or_spec, str) and name_or_spec.startswith("random_") and name_or_spec[7:].isdigit():
        spec = random_spec(int(name_or_spec[7:]))
    else:
        spec = scene_spec(name_or_spec)
    return render_scene(spec, size=size, frames=frames, seed=seed, backend=backend)


def random_scene(seed: int, *, size: int | tuple[int, int] = 64, frames: int = 16, n_objects: int | None = None,
                 camera: str | None = None, backend: str = "auto") -> Scene4D:
    """A random scene (``random_spec(seed, ...)``) rendered with the same ``seed``."""
    return render_scene(random_spec(seed, n_objects=n_objects, camera=camera), size=size, frames=frames,
                        seed=seed, backend=backend)


# ----------------------------------------------------------------------------------------------- amodal helpers
def occlusion_region(scene: Scene4D, k: int) -> Tensor:
    """``[T,H,W]`` bool: where object ``k`` may be hidden -- the union of the *other* objects' visible masks
    minus ``k``'s own visible mask (spec 1.3's occlusion region)."""
    others = torch.cat([scene.masks[:k], scene.masks[k + 1:]]).any(0) if scene.num_objects > 1 else \
        torch.zeros_like(scene.masks[0])
    return others & ~scene.masks[k]


def amodal_completion_target(scene: Scene4D, k: int) -> tuple[Tensor, Tensor]:
    """Ground truth of amodal completion for object ``k``: its unoccluded render over white ``[T,H,W,3]``
    and its amodal mask ``[T,H,W]``."""
    return scene.object_rgb[k], scene.amodal_masks[k]


# ----------------------------------------------------------------------------------------------- camera poses
def camera_to_world(scene_or_cameras: Scene4D | Cameras, convention: str = "opencv") -> Tensor:
    """Ground-truth camera-to-world poses ``[T,4,4]`` (``"opencv"`` or ``"opengl"`` camera axes)."""
    cams = scene_or_cameras.cameras if isinstance(scene_or_cameras, Scene4D) else scene_or_cameras
    if convention == "opencv":
        return cams.c2w_opencv
    if convention == "opengl":
        return cams.c2w_opengl
    raise UserError(f"convention must be 'opencv' or 'opengl', got {convention!r}")


def relative_camera_poses(scene_or_cameras: Scene4D | Cameras) -> tuple[Tensor, Tensor]:
    """DreamScene4D's relative poses w.r.t. frame 0 (spec 1.4), in camera-to-world (OpenCV) terms:
    ``R_rel(t) = R_t R_0^{-1}`` ``[T,3,3]`` and ``dp(t) = p_t - p_0`` ``[T,3]`` (camera centres)."""
    c2w = camera_to_world(scene_or_cameras)
    R, p = c2w[:, :3, :3], c2w[:, :3, 3]
    return R @ R[0].T, p - p[0]


def _quat_xyzw(R: Tensor) -> Tensor:
    q = rotmat_to_quat(R)  # w,x,y,z
    return torch.cat([q[..., 1:], q[..., :1]], -1)


def _rot_from_xyzw(q: Tensor) -> Tensor:
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], -2)


def camera_pose_records(scene_or_cameras: Scene4D | Cameras) -> list[dict]:
    """The camera-pose JSON of spec 1.4: one ``{"pos": [x,y,z], "orientation": [x,y,z,w]}`` per frame
    (camera-to-world, OpenCV camera axes, scipy's scalar-last quaternion order)."""
    c2w = camera_to_world(scene_or_cameras)
    q = _quat_xyzw(c2w[:, :3, :3])
    return [{"pos": c2w[t, :3, 3].tolist(), "orientation": q[t].tolist()} for t in range(c2w.shape[0])]


def cameras_from_pose_records(records: Sequence[dict], Ks: Tensor, width: int, height: int) -> Cameras:
    """Inverse of ``camera_pose_records`` (with the intrinsics ``Ks [T,3,3]`` or ``[3,3]``)."""
    T = len(records)
    c2w = torch.eye(4).repeat(T, 1, 1)
    for t, r in enumerate(records):
        c2w[t, :3, :3] = _rot_from_xyzw(torch.tensor(r["orientation"], dtype=torch.float32))
        c2w[t, :3, 3] = torch.tensor(r["pos"], dtype=torch.float32)
    Ks = Ks if Ks.dim() == 3 else Ks[None].expand(T, 3, 3)
    return Cameras(torch.linalg.inv(c2w), Ks.clone(), width, height)


def warp_backward(field: Tensor, flow: Tensor) -> Tensor:
    """Sample ``field [N,H,W,C]`` at ``pixel + flow`` (``flow [N,H,W,2]`` pixels, bilinear, border values outside)."""
    N, H, W, _ = flow.shape
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    p = torch.stack([jj, ii], -1) + flow
    grid = torch.stack([p[..., 0] / W * 2 - 1, p[..., 1] / H * 2 - 1], -1)
    out = torch.nn.functional.grid_sample(field.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    return out.permute(0, 2, 3, 1)


def flow_fb_valid(forward: Tensor | Scene4D, backward: Tensor | None = None, *, rel: float = 0.01,
                  abs_px: float = 0.5) -> Tensor:
    """Forward-backward consistency (UnFlow, spec 1.6): ``[T-1,H,W]`` bool, a pixel of frame t is valid when
    ``|f + b(x + f)| <= rel (|f| + |b(x + f)|) + abs_px`` and ``x + f`` lands inside frame t+1. Takes a scene (its
    ground-truth pair) or ``forward`` / ``backward`` flows ``[T-1,H,W,2]`` (``backward[t]``: t+1 -> t)."""
    if isinstance(forward, Scene4D):
        forward, backward = forward.flow, forward.flow_backward
    if backward is None:
        raise UserError("flow_fb_valid needs the backward flow too (Scene4D.flow_backward or backward=)")
    H, W = forward.shape[1:3]
    bw = warp_backward(backward, forward)
    err = (forward + bw).norm(dim=-1)
    ok = err <= rel * (forward.norm(dim=-1) + bw.norm(dim=-1)) + abs_px
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    x, y = jj + forward[..., 0], ii + forward[..., 1]
    return ok & (x >= 0) & (x < W) & (y >= 0) & (y < H)


def object_center_depth(scene: Scene4D) -> Tensor:
    """``[K,T]`` view-space depth (camera z) of each object's origin (its pose translation) in frame t's camera:
    the ground truth of per-object depth placement (composition, spec 1.5 / part 7)."""
    _, z = project_points(scene.cameras, scene.object_poses[:, None, :, :3, 3])
    return z[:, 0]


def object_median_depth(scene: Scene4D) -> Tensor:
    """``[K,T]`` median rendered depth over each object's visible mask (NaN where the object is not visible)."""
    K, T = scene.masks.shape[:2]
    out = torch.full((K, T), float("nan"))
    for k in range(K):
        for t in range(T):
            v = scene.object_depth[k, t][scene.masks[k, t]]
            if v.numel():
                out[k, t] = v.median()
    return out


def camera_pose_errors(estimated_c2w: Tensor, scene_or_c2w: Scene4D | Tensor) -> dict[str, Tensor]:
    """Per-frame camera errors of estimated camera-to-world poses ``[T,4,4]`` (OpenCV axes) against the ground truth,
    both taken *relative to frame 0* (``R_t R_0^-1``, ``p_t - p_0``: the gauge DreamScene4D fixes):
    ``rot_deg [T]`` (geodesic angle of ``R_est_rel^T R_gt_rel``) and ``trans [T]`` (centre offset error, world
    units), plus ``trans_scaled [T]`` after the best global scale of the estimated offsets (monocular scale)."""
    gt = camera_to_world(scene_or_c2w) if isinstance(scene_or_c2w, Scene4D) else scene_or_c2w
    est = estimated_c2w.to(gt)
    if est.shape != gt.shape:
        raise UserError(f"estimated poses {tuple(est.shape)} must match the ground truth {tuple(gt.shape)} ([T,4,4])")
    Re, pe = est[:, :3, :3] @ est[0, :3, :3].T, est[:, :3, 3] - est[0, :3, 3]
    Rg, pg = gt[:, :3, :3] @ gt[0, :3, :3].T, gt[:, :3, 3] - gt[0, :3, 3]
    d = (Re.transpose(-1, -2) @ Rg).double()
    cos = (d.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    sin = torch.stack([d[:, 2, 1] - d[:, 1, 2], d[:, 0, 2] - d[:, 2, 0], d[:, 1, 0] - d[:, 0, 1]], -1).norm(dim=-1) / 2
    s = (pe * pg).sum() / (pe * pe).sum().clamp_min(1e-12)
    return {"rot_deg": torch.rad2deg(torch.atan2(sin, cos)).float(), "trans": (pe - pg).norm(dim=-1),
            "trans_scaled": (s * pe - pg).norm(dim=-1)}


# ----------------------------------------------------------------------------------------------- save / load
_ARRAYS = ("frames", "masks", "amodal_masks", "depth", "points_3d", "tracks_2d", "track_visible", "flow",
           "background", "object_poses", "bend_angles", "object_scales", "canonical_points", "object_rgb",
           "object_alpha", "object_depth", "background_depth", "scene_depth", "background_frames", "flow_backward")


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG")


def save_scene(scene: Scene4D, directory: str | os.PathLike, *, quality: float = 9.0) -> Path:
    """Write ``scene`` into ``directory`` (layout in the module docstring), atomically: everything is
    written into a temporary sibling folder that then replaces ``directory``."""
    from ..io.video import to_uint8, write_mp4

    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_mp4(tmp / "video.mp4", scene.frames, fps=scene.fps, quality=quality)
        (tmp / "frames").mkdir()
        fr = to_uint8(scene.frames)
        for t in range(fr.shape[0]):
            _write_png(tmp / "frames" / f"{t:05d}.png", fr[t])
        for sub, m in (("masks", scene.masks), ("amodal_masks", scene.amodal_masks)):
            for k in range(m.shape[0]):
                d = tmp / sub / f"{k + 1:03d}"
                d.mkdir(parents=True)
                mk = (m[k].numpy().astype(np.uint8) * 255)
                for t in range(mk.shape[0]):
                    _write_png(d / f"{t:05d}.png", mk[t])
        arrays = {k: getattr(scene, k).numpy() for k in _ARRAYS if getattr(scene, k) is not None}
        arrays["viewmats"] = scene.cameras.viewmats.numpy()
        arrays["Ks"] = scene.cameras.Ks.numpy()
        np.savez_compressed(tmp / "ground_truth.npz", **arrays)
        meta = {"name": scene.name, "seed": scene.seed, "fps": scene.fps, "object_names": scene.object_names, "prompts": scene.prompts,
                "height": scene.size[0], "width": scene.size[1], "frames": scene.num_frames,
                "spec": scene.spec.to_dict() if scene.spec is not None else None,
                "camera_poses": camera_pose_records(scene), "fovy": FOVY, "format": "studio-scene4d-1"}
        (tmp / "scene.json").write_text(json.dumps(meta, indent=1))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_scene(directory: str | os.PathLike) -> Scene4D:
    """Read a folder written by ``save_scene`` back into a ``Scene4D`` (exact: arrays from the npz)."""
    d = Path(directory)
    if not (d / "scene.json").is_file() or not (d / "ground_truth.npz").is_file():
        raise UserError(f"{str(d)!r} is not a saved 4D scene (no scene.json / ground_truth.npz); "
                        "write one with studio.world.scenes4d.save_scene")
    meta = json.loads((d / "scene.json").read_text())
    with np.load(d / "ground_truth.npz") as z:
        arr = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    cams = Cameras(arr.pop("viewmats"), arr.pop("Ks"), int(meta["width"]), int(meta["height"]))
    spec = SceneSpec.from_dict(meta["spec"]) if meta.get("spec") else None
    return Scene4D(**{k: arr[k] for k in _ARRAYS if k in arr}, cameras=cams, fps=float(meta["fps"]),
                   object_names=list(meta["object_names"]), prompts=list(meta.get("prompts", [])),
                   name=meta.get("name", ""), spec=spec, seed=int(meta.get("seed", 0)))


# ----------------------------------------------------------------------------------------------- video input
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXT = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)


def _read_image(path: Path, what: str, fix: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise UserError(f"could not read {what} '{path}': {type(exc).__name__}: {exc}; {fix}") from None


def _read_frames(src: Path) -> Tensor:
    from ..io.video import read_video

    if not src.exists():
        raise UserError(f"video input '{src}' does not exist; pass an MP4 file or a folder of frame images "
                        "(00000.png, 00001.png, ...)")
    if src.is_dir():
        files = _image_files(src)
        if not files:
            raise UserError(f"frame folder '{src}' holds no images ({', '.join(IMAGE_EXT)}); put the frames there "
                            "named so they sort in time order (00000.png, 00001.png, ...)")
        imgs = [_read_image(p, "frame", "replace it with a valid PNG/JPEG") for p in files]
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise UserError(f"frames in '{src}' have different sizes {sorted(shapes)}; resize them to one size")
        return torch.from_numpy(np.stack(imgs)).float() / 255.0
    if src.suffix.lower() not in VIDEO_EXT:
        raise UserError(f"video input '{src}' is not a video ({', '.join(VIDEO_EXT)}) or a frame folder; "
                        "convert it to MP4 or pass the folder of its frames")
    try:
        return read_video(src)
    except ValueError as exc:
        raise UserError(f"{exc}; re-encode it (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4) or pass a frame "
                        "folder") from None


def _read_mask_track(src: Path, T: int, H: int, W: int) -> Tensor:
    """One object's masks ``[T,H,W]`` bool from a PNG folder or a mask video (> 50% grey = object)."""
    if src.is_dir():
        files = _image_files(src)
        if not files:
            raise UserError(f"mask folder '{src}' holds no images; put one binary PNG per frame there "
                            "(255 = object), named like the frames")
        arr = np.stack([_read_image(p, "mask", "replace it with a binary PNG (0 / 255)").mean(-1) for p in files])
        m = torch.from_numpy(arr) > 127.5
    else:
        from ..io.video import read_video

        try:
            m = read_video(src).mean(-1) > 0.5
        except ValueError as exc:
            raise UserError(f"{exc}; pass one mask video or one PNG folder per object") from None
    if m.shape[0] != T:
        raise UserError(f"mask track '{src}' has {m.shape[0]} frames but the video has {T}; give one mask per "
                        "frame (an empty mask for frames where the object is absent)")
    if tuple(m.shape[1:]) != (H, W):
        raise UserError(f"masks in '{src}' are {m.shape[2]}x{m.shape[1]} but the frames are {W}x{H}; resize the "
                        "masks to the frame size (nearest neighbour)")
    return m


def load_video_input(video: str | os.PathLike, masks: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                     *, size: int | tuple[int, int] | None = None, max_frames: int | None = None,
                     ) -> tuple[Tensor, Tensor | None]:
    """Read a user's video and its per-object mask tracks: ``(frames [T,H,W,3] float in [0,1],
    masks [K,T,H,W] bool or None)``.

    ``video``: an MP4 (or other ffmpeg-readable video; decoded by decord through ``studio.io.video``) or a
    folder of frame images sorted by name. A saved scene folder (``save_scene``) also works: its lossless
    ``frames/`` are read, and its ``masks/`` when ``masks`` is not given.
    ``masks``: a folder holding one entry per object -- a sub-folder of per-frame PNGs (``001/00000.png``,
    the DreamScene4D layout) or a mask video (``001.mp4``) -- taken in name order, or a list of such
    entries; ``None`` for no masks (use a ``MaskSource`` to make them). Every problem raises ``UserError``
    naming the input and the fix.
    ``size``: an int resizes so the longer side is ``size`` (aspect kept, e.g. DreamScene4D's 720), ``(H, W)``
    resizes exactly (antialiased bilinear for frames, nearest for masks); ``max_frames`` keeps that many frames
    evenly spaced over the clip (first and last included). Masks are read at the original size and resampled the
    same way.
    """
    src = Path(video)
    if src.is_dir() and (src / "scene.json").is_file() and (src / "frames").is_dir():
        if masks is None and (src / "masks").is_dir():
            masks = src / "masks"
        src = src / "frames"
    frames = _read_frames(src)
    T, H, W = frames.shape[:3]
    m = load_mask_tracks(masks, T, H, W) if masks is not None else None
    if max_frames is not None:
        if int(max_frames) < 1:
            raise UserError(f"max_frames must be >= 1, got {max_frames}")
        if int(max_frames) < T:
            idx = torch.linspace(0, T - 1, int(max_frames)).round().long()
            frames = frames[idx]
            m = m[:, idx] if m is not None else None
    if size is not None:
        if isinstance(size, int):
            if size < 8:
                raise UserError(f"size must be >= 8 pixels, got {size}")
            s_ = size / max(H, W)
            hw = (max(1, round(H * s_)), max(1, round(W * s_)))
        else:
            hw = (int(size[0]), int(size[1]))
            if min(hw) < 8:
                raise UserError(f"size must be at least 8x8 pixels, got {size}")
        if hw != (H, W):
            import torch.nn.functional as F

            frames = F.interpolate(frames.permute(0, 3, 1, 2), size=hw, mode="bilinear", align_corners=False,
                                   antialias=True).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
            if m is not None:
                K, Tm = m.shape[:2]
                m = F.interpolate(m.reshape(K * Tm, 1, H, W).float(), size=hw, mode="nearest").reshape(K, Tm, *hw) > 0.5
    return frames, m


def load_mask_tracks(masks: str | os.PathLike | Sequence[str | os.PathLike], T: int, H: int, W: int) -> Tensor:
    """Per-object mask tracks ``[K,T,H,W]`` bool for a video of ``T`` frames of ``H x W`` from a folder of
    per-object PNG folders / mask videos (name order), one object's PNG folder, or a list of such entries
    (see ``load_video_input``); ``UserError`` naming the input and the fix on any problem."""
    if isinstance(masks, (str, os.PathLike)):
        mdir = Path(masks)
        if not mdir.exists():
            raise UserError(f"mask input '{mdir}' does not exist; pass a folder with one sub-folder of PNGs or one "
                            "mask video per object")
        if not mdir.is_dir():
            entries = [mdir]
        else:
            entries = sorted(p for p in mdir.iterdir()
                             if (p.is_dir() and not p.name.startswith(".")) or p.suffix.lower() in VIDEO_EXT)
            if not entries:
                if _image_files(mdir):
                    entries = [mdir]  # a single object's PNG folder
                else:
                    raise UserError(f"mask folder '{mdir}' holds no per-object mask folders or mask videos; lay it "
                                    "out as <dir>/001/00000.png ... (one sub-folder per object) or <dir>/001.mp4")
    else:
        entries = [Path(p) for p in masks]
        for p in entries:
            if not p.exists():
                raise UserError(f"mask input '{p}' does not exist; pass existing mask folders or videos")
    return torch.stack([_read_mask_track(p, T, H, W) for p in entries])
