"""Video to 4D: the kind's config, input loading, artefacts and ground-truth evaluation, for every video-to-4D method.

A method subclasses :class:`VideoTo4DMethod`, extends :class:`VideoTo4DConfig` and implements
``reconstruct(cfg, inp, run_dir, *, callbacks, resume, progress) -> (model, info)`` where ``model`` follows
:class:`Dynamic4D` (per-frame world Gaussians of every object). The kind does the rest once:

* **input** (:func:`load_input`): a 4D ShapeWorld scene name (``two_cross``, ``random_3``...; rendered with full
  ground truth), a saved scene folder, an MP4 / frame folder with ``--masks DIR`` (one mask folder or video per
  object, spec 1.1 layout);
* **artefacts** (:func:`export`): ``ply/frame_00000.ply`` ... (3DGS PLY of every frame, with the model's static
  background when it has one, also alone as ``background.ply``), ``orbit.mp4`` (a 360-degree orbit of the objects
  at the middle frame), ``time_sweep.mp4`` (all frames from a fixed novel view), ``reconstruction.mp4`` (the
  method's cameras; both with the background), ``tracks.npz`` (2D tracks of the ground-truth query points or of a query grid, from the 3D
  trajectories of the Gaussians, spec 6);
* **metrics** against the scene's ground truth (:func:`evaluate`): novel-view PSNR and mask IoU of the objects at
  held-out views (the input camera turned by +-``eval_azimuth`` degrees about the scene's vertical axis) at every
  frame, 2D track EPE on visible and occluded points and delta_avg, 3D trajectory error; with cameras other than
  the ground truth (static or estimated) the camera pose errors (``camera_rot_error_deg`` geodesic, mean over frames
  1.., ``camera_trans_error``, both relative to frame 0); with a background the background PSNR against the clean
  plates and the full composite's PSNR against the frames.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..cameras import Cameras, look_at
from ..errors import UserError
from ..io import write_mp4, write_ply
from ..render import rasterize_gaussians
from .protocol import Method

SH_C0 = 0.28209479177387814


@dataclass
class VideoTo4DConfig:
    video: str = ""
    """a video (MP4...), a frame folder, a saved 4D scene folder, or a 4D ShapeWorld scene name (two_cross,
    bend_occlude, trio, trio_orbit, random_<seed>)"""
    masks: str | None = None
    """per-object mask tracks: a folder with one PNG folder (001/00000.png...) or mask video per object"""
    size: int = 64
    """frame size of a generated ShapeWorld scene"""
    frames: int = 12
    """number of frames of a generated ShapeWorld scene"""
    seed: int = 0
    video_size: int = 96
    """side of the orbit / time-sweep videos"""
    orbit_frames: int = 24
    eval_azimuth: float = 25.0
    """held-out views: the input camera turned by +- this many degrees about the scene's vertical axis"""


@dataclass
class VideoInput:
    frames: Tensor  # [T,H,W,3]
    masks: Tensor  # [K,T,H,W] bool (visible)
    cameras: Cameras  # one per frame
    scene: Any = None  # a studio.world.scenes4d.Scene4D with ground truth, or None
    camera_source: str = "default"  # "ground-truth", "default" (static DreamScene4D camera, fovy 49.1), or what a
    # method set in reconstruct(): "static" / "estimated" (it may replace ``cameras`` with the ones it used)


class Dynamic4D(Protocol):
    num_frames: int
    num_objects: int

    def world_gaussians(self, t: int, objects: list[int] | None = None) -> dict[str, Tensor]:
        """Activated world Gaussians of frame ``t``: ``means quats scales opacities colors`` (RGB) ``object`` [N]."""
        ...

    # optional: ``background_gaussians() -> dict | None``, a static background (same keys, no ``object``); the kind
    # composes it behind the objects (one depth-sorted render) in the PLYs and the videos, never in object metrics


_KEYS = ("means", "quats", "scales", "opacities", "colors")


def with_background(g: dict[str, Tensor], bg: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Objects ``g`` plus the static background ``bg`` as one Gaussian set (the rasterizer sorts every Gaussian by
    depth, so the background lands behind the objects wherever it is farther)."""
    if bg is None:
        return g
    return {k: torch.cat([g[k], bg[k].to(g[k])]) for k in _KEYS}


def model_background(model) -> dict[str, Tensor] | None:
    fn = getattr(model, "background_gaussians", None)
    return fn() if callable(fn) else None


def default_cameras(T: int, H: int, W: int, fovy: float = 49.1) -> Cameras:
    """DreamScene4D's camera when none is known (spec 2): static, at (0, 0, 2) looking at the origin."""
    from ..cameras import intrinsics_from_fov

    eye = torch.tensor([[0.0, 0.0, 2.0]]).repeat(T, 1)
    return Cameras(look_at(eye), intrinsics_from_fov(torch.full((T,), fovy), W, H), W, H)


def load_input(cfg: VideoTo4DConfig) -> VideoInput:
    from ..world import scenes4d as S4

    v = str(cfg.video).strip()
    if not v:
        raise UserError("the video is empty; give a video file, a frame folder or a 4D scene name such as two_cross")
    p = Path(v)
    if not p.exists() and (v in S4.scene_names() or (v.startswith("random_") and v[7:].isdigit())):
        scene = S4.make_scene(v, size=cfg.size, frames=cfg.frames, seed=cfg.seed)
        return VideoInput(scene.frames, scene.masks, scene.cameras, scene, "ground-truth")
    if not p.exists():
        raise UserError(f"video '{v}' does not exist; give a video file, a frame folder, a saved scene folder or one "
                        f"of the scenes {', '.join(S4.scene_names())}")
    if p.is_dir() and (p / "scene.json").is_file():
        scene = S4.load_scene(p)
        if cfg.masks is None:
            return VideoInput(scene.frames, scene.masks, scene.cameras, scene, "ground-truth")
    frames, masks = S4.load_video_input(p, cfg.masks)
    if masks is None:
        raise UserError(f"no object masks for '{v}': pass --masks DIR with one mask folder (001/00000.png...) or mask "
                        "video per object")
    T, H, W = frames.shape[:3]
    return VideoInput(frames, masks.bool(), default_cameras(T, H, W), None, "default")


class VideoTo4DMethod(Method):
    """Base of video-to-4D methods (module doc)."""

    name = "base-video-to-4d"
    kind = "video-to-4d"
    kind_title = "Video to 4D"
    input = "video"
    verb = ("video-to-4d",)
    Config = VideoTo4DConfig

    @classmethod
    def examples(cls) -> list[str]:
        from ..world.scenes4d import scene_names

        return scene_names()

    def validate(self, cfg: VideoTo4DConfig) -> None:
        if not str(cfg.video).strip():
            raise UserError("the video is empty; give a video file, a frame folder or a 4D scene name such as two_cross")
        if cfg.frames < 2 or cfg.size < 16:
            raise UserError(f"--frames must be >= 2 and --size >= 16, got {cfg.frames}, {cfg.size}")

    def reconstruct(self, cfg, inp: VideoInput, run_dir: Path, *, callbacks=None, resume=False,
                    progress=True) -> tuple[Dynamic4D, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, cfg, run_dir: Path, *, callbacks=None, resume: bool = False, progress: bool = True) -> dict:
        t0 = time.perf_counter()
        inp = load_input(cfg)
        model, info = self.reconstruct(cfg, inp, run_dir, callbacks=callbacks, resume=resume, progress=progress)
        metrics = {"frames": int(inp.frames.shape[0]), "objects": int(inp.masks.shape[0]),
                   "camera_source": inp.camera_source, **info}
        metrics.update(export(model, inp, cfg, run_dir))
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        return metrics

    def summary(self, metrics: dict, run_dir: Path) -> str:
        gt = metrics.get("ground_truth") or {}
        extra = f", novel-view PSNR {gt['novel_view_psnr']:.2f} dB" if gt.get("novel_view_psnr") is not None else ""
        return f"done in {metrics.get('seconds', 0):.0f}s{extra}: {run_dir}/"


# ------------------------------------------------------------------------------------------------ rendering
def render_gaussians(g: dict, cams: Cameras, *, bg: float = 1.0, mode: str = "RGB") -> tuple[Tensor, Tensor]:
    """``[C,H,W,3]`` colours over ``bg`` and ``[C,H,W]`` alphas of activated Gaussians (all objects at once: the
    renderer sorts every Gaussian by depth, so the objects are composed in depth order)."""
    C = len(cams)
    if g["means"].shape[0] == 0:
        return torch.full((C, cams.height, cams.width, 3), bg), torch.zeros(C, cams.height, cams.width)
    img, a, _ = rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"].clamp(0, 1),
                                    cams.viewmats, cams.Ks, cams.width, cams.height,
                                    backgrounds=torch.full((C, 3), float(bg)), render_mode=mode)
    return img, a[..., 0]


def turned_cameras(cams: Cameras, degrees: float, center: Tensor | None = None) -> Cameras:
    """Each camera turned by ``degrees`` about the vertical axis through ``center`` (default the origin), looking
    at ``center``: the held-out views."""
    center = torch.zeros(3) if center is None else center
    th = math.radians(degrees)
    R = torch.tensor([[math.cos(th), 0.0, math.sin(th)], [0.0, 1.0, 0.0], [-math.sin(th), 0.0, math.cos(th)]])
    eyes = (cams.centers - center) @ R.T + center
    return Cameras(look_at(eyes, center.expand_as(eyes)), cams.Ks, cams.width, cams.height)


# ------------------------------------------------------------------------------------------------ ground truth
_GT_CACHE: dict[tuple, dict[str, Tensor]] = {}


def ground_truth_gaussians(scene, seed: int, t: int) -> dict[str, Tensor]:
    """The scene's objects at frame ``t`` as activated world Gaussians (rebuilt exactly as the scene renderer
    builds them: same object sets, bend, pose), for renders at views the video does not have."""
    from ..world.objects import get_object
    from ..world.primitives import rotmat_to_quat
    from ..world.scenes4d import bend_points

    K = scene.num_objects
    spec = scene.spec
    out: dict[str, list[Tensor]] = {k: [] for k in ("means", "quats", "scales", "opacities", "colors", "object")}
    for k in range(K):
        key = (spec.objects[k].name, spec.n_gaussians, int(seed) * 1009 + k)
        if key not in _GT_CACHE:
            _GT_CACHE.clear() if len(_GT_CACHE) > 16 else None
            _GT_CACHE[key] = get_object(key[0]).gaussians(key[1], seed=key[2])
        g = _GT_CACHE[key]
        yr = (float(g["means"][:, 1].min()), float(g["means"][:, 1].max()))
        m, Rb = bend_points(g["means"], scene.bend_angles[k, t], yr)
        A = scene.object_poses[k, t, :3, :3]
        s_k = float(scene.object_scales[k])
        qb = rotmat_to_quat((A / s_k)[None] @ Rb)
        out["means"].append(m @ A.T + scene.object_poses[k, t, :3, 3])
        out["quats"].append(quat_multiply(qb, g["quats"]))
        out["scales"].append(g["scales"] * s_k)
        out["opacities"].append(g["opacities"])
        out["colors"].append(g["colors"])
        out["object"].append(torch.full((m.shape[0],), k))
    return {k: torch.cat(v) for k, v in out.items()}


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of w-x-y-z quaternions (broadcast)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def _stack_frames(model: Dynamic4D, T: int) -> list[dict[str, Tensor]]:
    with torch.no_grad():
        return [{k: v.detach() for k, v in model.world_gaussians(t).items()} for t in range(T)]


def predicted_tracks(seq: list[dict[str, Tensor]], cams: Cameras, queries: Tensor, query_frame: int = 0,
                     max_dist: float = 4.0, depth_tol: float = 0.25) -> tuple[Tensor, Tensor]:
    """Spec 6: each query ``[Q,2]`` (pixels at ``query_frame``) takes the nearest Gaussian centre (2D) among those on
    the visible surface there (rendered alpha > 0.75 at its pixel, projected depth within ``depth_tol`` of the
    rendered depth); its projected trajectory is the track ``[Q,T,2]``. Also ``accepted [Q]`` (within ``max_dist``)."""
    T = len(seq)
    g = seq[query_frame]
    cam = cams[query_frame]
    proj, z = cam.project(g["means"])
    proj, z = proj[0], z[0]
    img, a = render_gaussians(g, cam, mode="RGB+ED")
    H, W = cam.height, cam.width
    j = proj[:, 0].floor().long()
    i = proj[:, 1].floor().long()
    inside = (j >= 0) & (j < W) & (i >= 0) & (i < H) & (z > 0)
    jc, ic = j.clamp(0, W - 1), i.clamp(0, H - 1)
    surf = inside & (a[0, ic, jc] > 0.75) & ((z - img[0, ic, jc, -1]).abs() < depth_tol)
    if not bool(surf.any()):
        surf = inside
    cand = surf.nonzero(as_tuple=True)[0]
    if cand.numel() == 0:
        return queries[:, None].expand(-1, T, -1).clone(), torch.zeros(queries.shape[0], dtype=torch.bool)
    d = torch.cdist(queries, proj[cand])
    dist, jj = d.min(1)
    idx = cand[jj]
    tracks = torch.stack([cams[t].project(seq[t]["means"][idx])[0][0] for t in range(T)], 1)
    return tracks, dist < max_dist


def evaluate(seq: list[dict[str, Tensor]], inp: VideoInput, cfg: VideoTo4DConfig,
             bg: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Metrics against the scene's ground truth (module doc); ``bg`` the model's static background, if any."""
    scene = inp.scene
    T = len(seq)
    cams = inp.cameras  # the method's cameras (ground truth, static or estimated): tracks are projected with them
    gcams = scene.cameras  # the held-out views are defined by the ground truth
    out: dict[str, Any] = {}
    # novel views (held-out) at every frame: objects only, over white
    psnrs, ious = [], []
    gts = [ground_truth_gaussians(scene, cfg.seed, t) for t in range(T)]
    for sign in (1.0, -1.0):
        nv = turned_cameras(gcams, sign * cfg.eval_azimuth)
        for t in range(T):
            gt = gts[t]
            gi, ga = render_gaussians(gt, nv[t])
            pi, pa = render_gaussians(seq[t], nv[t])
            mse = float((gi - pi).pow(2).mean())
            psnrs.append(99.0 if mse <= 1e-10 else -10 * math.log10(mse))
            inter = ((ga > 0.5) & (pa > 0.5)).sum()
            union = ((ga > 0.5) | (pa > 0.5)).sum()
            ious.append(float(inter) / max(float(union), 1.0))
    out["novel_view_psnr"] = float(np.mean(psnrs))
    out["novel_view_iou"] = float(np.mean(ious))
    # input-view reconstruction of the object layer
    rec = []
    for t in range(T):
        gi, _ = render_gaussians(gts[t], gcams[t])
        pi, _ = render_gaussians(seq[t], cams[t])
        rec.append(-10 * math.log10(max(float((gi - pi).pow(2).mean()), 1e-10)))
    out["input_view_psnr"] = float(np.mean(rec))
    # cameras other than the ground truth: pose errors relative to frame 0 (geodesic rotation, centre offset)
    if inp.camera_source != "ground-truth":
        from ..world.scenes4d import camera_pose_errors

        e = camera_pose_errors(cams.c2w_opencv, scene)
        out["camera_rot_error_deg"] = float(e["rot_deg"][1:].mean()) if T > 1 else 0.0
        out["camera_rot_error_deg_max"] = float(e["rot_deg"].max())
        out["camera_trans_error"] = float(e["trans"][1:].mean()) if T > 1 else 0.0
        out["camera_trans_error_scaled"] = float(e["trans_scaled"][1:].mean()) if T > 1 else 0.0
    # the background layer (when the model has one) against the scene's clean plates, in the method's cameras, and
    # the full composite against the input frames
    if bg is not None:
        bi, _ = render_gaussians(bg, cams, bg=0.0)
        out["background_psnr"] = float(np.mean([-10 * math.log10(max(float((bi[t] - scene.background_frames[t])
                                                                             .pow(2).mean()), 1e-10)) for t in range(T)]))
        full = [render_gaussians(with_background(seq[t], bg), cams[t])[0][0] for t in range(T)]
        out["input_view_psnr_full"] = float(np.mean([-10 * math.log10(max(float((full[t] - inp.frames[t]).pow(2)
                                                                                .mean()), 1e-10)) for t in range(T)]))
    # tracks: the ground-truth points visible at frame 0 are the queries
    vis0 = scene.track_visible[:, :, 0]
    q = scene.tracks_2d[:, :, 0][vis0]  # [Q,2]
    gt_tr = scene.tracks_2d[vis0]  # [Q,T,2]
    gt_vis = scene.track_visible[vis0]  # [Q,T]
    gt_3d = scene.points_3d[vis0]  # [Q,T,3]
    tracks, acc = predicted_tracks(seq, cams, q)
    later = torch.zeros_like(gt_vis)
    later[:, 1:] = True
    err = (tracks - gt_tr).norm(dim=-1)
    sel_v, sel_o = gt_vis & later, ~gt_vis & later
    out["track_epe_visible"] = float(err[sel_v].mean()) if bool(sel_v.any()) else None
    out["track_epe_occluded"] = float(err[sel_o].mean()) if bool(sel_o.any()) else None
    H, W = scene.size
    s = torch.tensor([256.0 / W, 256.0 / H])
    e256 = ((tracks - gt_tr) * s).norm(dim=-1)[sel_v]
    out["track_delta_avg"] = float(sum((e256 < d).float().mean() for d in (1, 2, 4, 8, 16)) / 5) if e256.numel() else None
    out["track_queries"] = int(q.shape[0])
    out["track_accepted"] = float(acc.float().mean()) if acc.numel() else None
    # 3D trajectories of the same associations
    g0 = seq[0]
    proj, _ = cams[0].project(g0["means"])
    idx = torch.cdist(q, proj[0]).argmin(1) if q.shape[0] else torch.zeros(0, dtype=torch.long)
    pred3d = torch.stack([seq[t]["means"][idx] for t in range(T)], 1) if q.shape[0] else gt_3d
    out["traj_error_3d"] = float((pred3d - gt_3d).norm(dim=-1).mean()) if q.shape[0] else None
    return out, tracks


def export(model: Dynamic4D, inp: VideoInput, cfg: VideoTo4DConfig, run_dir: Path) -> dict[str, Any]:
    """Write the kind's artefacts (module doc) and, with a ground-truth scene, its metrics."""
    run_dir = Path(run_dir)
    T = int(inp.frames.shape[0])
    seq = _stack_frames(model, T)
    bg = model_background(model)
    if bg is not None:
        bg = {k: bg[k].detach() for k in _KEYS}
    (run_dir / "ply").mkdir(parents=True, exist_ok=True)

    def ply(path: Path, g: dict[str, Tensor]) -> None:
        sh = ((g["colors"].clamp(0, 1) - 0.5) / SH_C0)[:, None, :]
        op = torch.logit(g["opacities"].clamp(1e-6, 1 - 1e-6))
        write_ply(path, g["means"], torch.log(g["scales"].clamp_min(1e-12)), g["quats"], op, sh)

    for t, g in enumerate(seq):  # every frame's PLY holds the whole scene: objects and the static background
        ply(run_dir / "ply" / f"frame_{t:05d}.ply", with_background(g, bg))
    if bg is not None:
        ply(run_dir / "background.ply", bg)
    cams = inp.cameras
    center = torch.cat([g["means"] for g in seq]).median(0).values if seq[0]["means"].numel() else torch.zeros(3)
    vs = int(cfg.video_size)
    H, W = cams.height, cams.width
    sq = Cameras(cams.viewmats, cams.Ks, W, H)
    # orbit at the middle frame, around the objects' centre
    tm = T // 2
    orbit = [turned_cameras(sq[tm], 360.0 * i / cfg.orbit_frames, center) for i in range(cfg.orbit_frames)]
    frames = [render_gaussians(seq[tm], c.resized(vs, int(round(vs * H / W))))[0][0] for c in orbit]
    write_mp4(run_dir / "orbit.mp4", torch.stack(frames), fps=12)
    # (the 360-degree orbit shows the objects alone: a one-sided background would hide them from behind)
    side = turned_cameras(sq[0], cfg.eval_azimuth + 15.0, center).resized(vs, int(round(vs * H / W)))
    write_mp4(run_dir / "time_sweep.mp4", torch.stack([render_gaussians(with_background(seq[t], bg), side)[0][0]
                                                       for t in range(T)]), fps=8)
    recon = torch.stack([render_gaussians(with_background(seq[t], bg), cams[t])[0][0] for t in range(T)])
    write_mp4(run_dir / "reconstruction.mp4", torch.cat([inp.frames, recon], 2), fps=8)
    metrics: dict[str, Any] = {"n_gaussians": int(seq[0]["means"].shape[0])}
    if bg is not None:
        metrics["n_background_gaussians"] = int(bg["means"].shape[0])
    if inp.scene is not None:
        gt, tracks = evaluate(seq, inp, cfg, bg)
        metrics["ground_truth"] = gt
        vis0 = inp.scene.track_visible[:, :, 0]
        np.savez(run_dir / "tracks.npz", tracks=tracks.numpy(), queries=inp.scene.tracks_2d[:, :, 0][vis0].numpy())
    else:
        m0 = inp.masks[:, 0].any(0)
        ys, xs = torch.meshgrid(torch.linspace(0.5, H - 0.5, 48), torch.linspace(0.5, W - 0.5, 48), indexing="ij")
        qs = torch.stack([xs, ys], -1).reshape(-1, 2)
        keep = m0[qs[:, 1].long().clamp(0, H - 1), qs[:, 0].long().clamp(0, W - 1)]
        qs = qs[keep]
        if qs.shape[0]:
            tracks, acc = predicted_tracks(seq, cams, qs)
            np.savez(run_dir / "tracks.npz", tracks=tracks.numpy(), queries=qs.numpy(), accepted=acc.numpy())
    return metrics


__all__ = ["VideoTo4DConfig", "VideoTo4DMethod", "VideoInput", "Dynamic4D", "load_input", "export", "evaluate",
           "with_background", "model_background",
           "ground_truth_gaussians", "predicted_tracks", "render_gaussians", "turned_cameras", "default_cameras"]
