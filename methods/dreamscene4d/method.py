"""DreamScene4D (Chu, Ke, Fragkiadaki, NeurIPS 2024, arXiv 2405.02280): multi-object 4D scenes from a monocular video.

Algorithm (``../shared/specs/dreamscene4d.md``):
    0. decompose: per-object mask tracks (files or the scene's ground truth); amodal completion of occluded
       frames for lifting (``--amodal``: the exact completion of a ShapeWorld scene, or none)
    for each object k:
      1. static lift (spec 3): object-centric crop of the lift frame (fill 0.65), DreamGaussian-style Gaussians
         fitted with balanced reference RGB / mask losses (1e4 r, 1e3 r) and Zero123-class novel-view SDS
         (random orbit views, t annealed 980 -> 20)
      2. deformation (spec 4.5): a K-planes deformation field (studio.students.deform4d) on the per-frame crops
         (s_t = max(s0, ext_t / 0.975)) with RGB / mask / flow (splatted 2D displacements) / scale / local
         rigidity losses and per-frame SDS (t <= 500); the canonical Gaussians frozen
      3. object-to-world (spec 4.7): S_t from the box track (fixed), translations p_t initialised on the box-centre
         rays and optimised with world-frame RGB / mask losses
      4. joint fine-tune (spec 4.8): deformation + translations with the world-frame losses
    5. compose (spec 5): one scale rho_k per object about the camera centre from frame 0's depth (exact scene
       depth: absolute; a depth estimator: ratios to the last object, then the 1-D search); every object
       rendered together, in depth order
    6. outputs (the kind): PLY per frame, the 4D file, orbit / time-sweep videos, 2D tracks from the 3D
       trajectories, metrics against the ground truth

``--factorise false`` is the paper's ablation: no crops, no translation stage: the deformation field alone explains
all motion in the world frame (frame 0's placement).

Cameras (``--camera``): ``gt`` the scene's ground-truth cameras (the default when the input is a ShapeWorld scene),
``static`` frame 0's camera for every frame (the default for a user video: DreamScene4D's static camera, fovy 49.1,
distance 2), ``estimate`` frame 0's camera fixes the gauge and every later pose is refined photometrically against a
background model (part 6, :mod:`.background`: our design, the official code releases no background or camera
code). ``--background gaussians`` (on by default with ``--camera estimate``) adds the static background Gaussians to
the composition, the PLYs, the 4D file and the videos; ``--background-fill`` fills the occluded background through
the part-3 inpainting path (exact on a ShapeWorld scene).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from studio.errors import UserError
from studio.io import atomic_write_bytes
from studio.runs.skeleton import train_stages
from studio.cameras import Cameras
from studio.runs.video_to_4d import VideoInput, VideoTo4DConfig, VideoTo4DMethod
from studio.students.deform4d import KPlanesConfig, time_resolution_for

from . import geometry as G
from .background import BACKGROUND_CHOICES, CAMERA_CHOICES, FILL_CHOICES, BackgroundSettings, build_background
from .stages import FitSettings, ObjectFit, object_stages


@dataclass
class DreamScene4DConfig(VideoTo4DConfig):
    teacher: str = "shapeworld-nv-exact"
    """Zero123-class novel-view teacher: shapeworld-nv-exact (embedded default), shapeworld-nv-unet, zero123-xl, a folder"""
    guidance_scale: float = 5.0
    """CFG scale of the novel-view SDS (DreamGaussian: 5)"""
    factorise: bool = True
    """motion factorisation (crops + object-to-world translation); false = deformation only (the ablation)"""
    amodal: Literal["auto", "none", "exact", "teacher"] = "auto"
    """amodal completion for lifting: exact (a ShapeWorld scene's unoccluded object renders), teacher (inpaint the
    occluded parts with --inpaint-teacher, from the visible masks), none (no completion, the ablation: the static
    lift and the object-centric deformation see only the visible object pixels, the pixels other objects cover are
    left out of their losses); auto = exact when the input has ground truth, else none"""
    inpaint_teacher: str = "shapeworld-exact"
    """the inpainting teacher of --amodal teacher: shapeworld-exact (a ShapeWorld scene's exact teacher, conditioned
    on the visible pixels) or an SD-inpainting model (folder or HF id, e.g. stabilityai/stable-diffusion-2-inpainting)"""
    inpaint_steps: int = 10
    """DDIM steps of the inpainting (--amodal teacher)"""
    flow: Literal["auto", "none", "exact"] = "auto"
    """optical-flow targets: exact (the scene's ground-truth flow), none; auto = exact when available"""
    depth: str = "auto"
    """composition depth: exact (the scene's depth: absolute scale), none (rho = 1), auto (exact when the input has
    ground truth, else none), or a transformers
    depth-estimation model (folder or HF id, e.g. LiheYoung/depth-anything-small-hf; output read as disparity)"""
    rho_search: int = 100
    """candidates of the 1-D rho search (spec: 1000 steps of 0.00085 over [0.65, 1.5]; here the same range)"""
    lift_frame: Literal["first", "least_occluded"] = "least_occluded"
    """the frame each object is lifted from: first (the paper), or least_occluded (the largest mask not cut by the
    frame border; with amodal completion the amodal mask)"""
    init: Literal["carved", "ball"] = "carved"
    """initial Gaussians: carved (ball points on the lift crop's mask, coloured from it) or ball (DreamGaussian)"""
    steps_static: int = 60
    steps_deform: int = 60
    steps_translate: int = 40
    steps_joint: int = 20
    init_points: int = 800
    crop_size: int = 64
    """object-centric crop side (paper: 256)"""
    batch_frames: int = 4
    """frames per step (paper: 10)"""
    sds_views: int = 2
    """novel views per step in the static stage (paper: 16)"""
    sds_views_dynamic: int = 1
    """novel views per frame in the deformation stage (paper: 4)"""
    sds_weight: float = 1.0
    view_grid_deg: float = 30.0
    """novel views snap to this angular grid (a finite view set the exact teacher caches); 0 = continuous"""
    kplanes_resolution: int = 16
    kplanes_multires: tuple[int, ...] = (1, 2)
    kplanes_channels: int = 16
    """K-planes size (paper: 64, (1, 2, 4, 8), 32 channels; smaller here for CPU)"""
    rigid_weight: float = 5e4
    flow_weight: float = 1e4
    camera: Literal["auto", "gt", "estimate", "static"] = "auto"
    """per-frame cameras: gt (the scene's ground truth), estimate (photometric refinement against the background
    model, frame 0 fixing the gauge), static (frame 0's camera for every frame); auto = gt when the input has ground
    truth, else static (DreamScene4D's default camera)"""
    background: Literal["auto", "none", "gaussians"] = "auto"
    """background model: gaussians (static background Gaussians fitted to the frames outside the object masks,
    composed behind the objects and written to the outputs), none; auto = gaussians with --camera estimate"""
    background_fill: Literal["auto", "none", "teacher"] = "auto"
    """the background hidden by the objects: teacher (inpainted by --inpaint-teacher: shapeworld-exact on a
    ShapeWorld scene is exact, or an SD-inpainting model), none (fit only the visible background); auto = teacher
    when the teacher can run (a ShapeWorld scene, or an SD-inpainting model named), else none"""
    background_steps: int = 60
    """fit steps of the background Gaussians (each pass)"""
    background_stride: int = 1
    """one background Gaussian per stride x stride pixel block"""
    pose_steps: int = 15
    """Gauss-Newton iterations per frame and pyramid level of the camera refinement"""


class DreamScene4DMethod(VideoTo4DMethod):
    name = "dreamscene4d"
    description = ("DreamScene4D: per-object Gaussians lifted with Zero123-class SDS, K-planes deformation with motion "
                   "factorisation, depth-ratio composition")
    paper = "https://arxiv.org/abs/2405.02280"
    Config = DreamScene4DConfig
    default_for_verb = True

    def validate(self, cfg: DreamScene4DConfig) -> None:
        super().validate(cfg)
        if cfg.steps_static < 1 or cfg.steps_deform < 0 or cfg.steps_translate < 0 or cfg.steps_joint < 0:
            raise UserError("--steps-static must be >= 1 and the other --steps-* >= 0")
        if cfg.crop_size < 16 or cfg.init_points < 8 or cfg.batch_frames < 1:
            raise UserError("--crop-size must be >= 16, --init-points >= 8, --batch-frames >= 1")
        for opt, val, choices in (("--camera", cfg.camera, CAMERA_CHOICES), ("--background", cfg.background,
                                   BACKGROUND_CHOICES), ("--background-fill", cfg.background_fill, FILL_CHOICES)):
            if val not in choices:
                raise UserError(f"{opt} {val!r} is not an option; choose one of {', '.join(choices)}")
        if cfg.camera == "estimate" and cfg.background == "none":
            raise UserError("--camera estimate refines the poses against the background model; use --background "
                            "gaussians (or auto), or --camera static / gt")
        if cfg.background_steps < 0 or cfg.background_stride < 1 or cfg.pose_steps < 1:
            raise UserError("--background-steps must be >= 0, --background-stride >= 1 and --pose-steps >= 1")
        if cfg.amodal not in AMODAL_CHOICES:
            raise UserError(f"--amodal {cfg.amodal!r} is not an option; choose one of {', '.join(AMODAL_CHOICES)} "
                            "(none = no amodal completion: lift from the visible pixels only)")
        if cfg.amodal == "teacher" and (cfg.inpaint_steps < 1 or not cfg.inpaint_teacher.strip()):
            raise UserError("--amodal teacher needs --inpaint-steps >= 1 and an --inpaint-teacher (shapeworld-exact, "
                            "or an SD-inpainting folder / HF id)")

    # -- the pipeline --------------------------------------------------------------------------------------
    def reconstruct(self, cfg: DreamScene4DConfig, inp: VideoInput, run_dir: Path, *, callbacks=None, resume=False,
                    progress=True):
        torch.manual_seed(cfg.seed)
        info: dict = {"factorise": cfg.factorise}
        frames, masks, cams, scene = inp.frames, inp.masks, inp.cameras, inp.scene
        K, T = masks.shape[:2]
        if K > 9:
            raise UserError(f"{K} object masks given; DreamScene4D composes at most 9 objects")
        teacher = None
        if cfg.sds_weight > 0 and (cfg.sds_views > 0 or cfg.sds_views_dynamic > 0):
            from studio.runs.text_to_3d import load_teacher_cached

            teacher = load_teacher_cached(cfg.teacher)
        amodal = cfg.amodal if cfg.amodal != "auto" else ("exact" if scene is not None else "none")
        if amodal not in AMODAL_CHOICES:  # reconstruct() may be called without validate()
            raise UserError(f"--amodal {amodal!r} is not an option; choose one of {', '.join(AMODAL_CHOICES)}")
        flow_src = cfg.flow if cfg.flow != "auto" else ("exact" if scene is not None else "none")
        if scene is None and (amodal == "exact" or flow_src == "exact"):
            raise UserError("--amodal exact / --flow exact need a ShapeWorld scene input (ground truth); use none")
        if amodal == "teacher" and scene is None and cfg.inpaint_teacher.strip().lower() == "shapeworld-exact":
            raise UserError("--inpaint-teacher shapeworld-exact needs a ShapeWorld scene input; give an SD-inpainting "
                            "model (folder or HF id) or use --amodal none")
        depth = cfg.depth if cfg.depth != "auto" else ("exact" if scene is not None else "none")
        if depth == "exact" and scene is None:
            raise UserError("--depth exact needs a ShapeWorld scene input; pass a depth model (folder or HF id) or none")
        info.update(amodal=amodal, flow=flow_src, depth=depth, lift_frames=[])
        depth_map, metric = _estimate_depth(depth, inp)  # before training: a bad model path fails fast
        background = _cameras_and_background(cfg, inp, depth, info, run_dir)  # may replace inp.cameras
        cams = inp.cameras
        completed = _complete(cfg, inp, info) if amodal == "teacher" else None  # (rgb, amodal masks) per object
        kp = KPlanesConfig(resolution=cfg.kplanes_resolution, multires=tuple(cfg.kplanes_multires),
                           time_resolution=time_resolution_for(T), channels=cfg.kplanes_channels)
        fits, stages = [], []
        for k in range(K):
            lift_rgb, lift_masks = lift_targets(amodal, k, scene, completed)
            lift = 0 if cfg.lift_frame == "first" else least_occluded_frame(lift_masks if lift_masks is not None
                                                                           else masks[k])
            info["lift_frames"].append(lift)
            st = FitSettings(crop_size=cfg.crop_size, init_points=cfg.init_points, init=cfg.init, lift_frame=lift,
                             batch_frames=cfg.batch_frames, sds_views=cfg.sds_views,
                             sds_views_dynamic=cfg.sds_views_dynamic, sds_weight=cfg.sds_weight,
                             guidance_scale=cfg.guidance_scale, view_grid_deg=cfg.view_grid_deg, kplanes=kp,
                             factorise=cfg.factorise, seed=cfg.seed, rigid_weight=cfg.rigid_weight,
                             flow_weight=cfg.flow_weight if flow_src != "none" else 0.0)
            depth0 = None  # a moving camera needs the object at a metric depth (its translation sets the parallax)
            moving = not bool((cams.viewmats == cams.viewmats[:1]).all())
            if moving and metric and bool(masks[k, 0].any()):
                reg = masks[k, 0] & (depth_map > 0)
                depth0 = float(depth_map[reg].median()) if bool(reg.any()) else None
            info.setdefault("init_depth", []).append(depth0)
            fit = ObjectFit(k, frames, masks, cams, st, teacher, lift_rgb=lift_rgb, lift_masks=lift_masks,
                            flow=scene.flow if flow_src == "exact" else None, depth0=depth0)
            fits.append(fit)
            stages += object_stages(fit, {"static": cfg.steps_static, "deform": cfg.steps_deform,
                                          "translate": cfg.steps_translate, "joint": cfg.steps_joint})
        total = sum(s.steps for s in stages)
        t0 = time.perf_counter()
        history, seconds = train_stages(stages, run_dir, seed=cfg.seed, callbacks=callbacks, resume=resume,
                                        progress=progress, checkpoint_every=max(50, total // 4),
                                        preview_every=max(10, total // 10))
        info["train_seconds"] = round(seconds, 2)
        last: dict[str, dict] = {}
        for rec in history:
            last[rec["stage"]] = rec
        per_stage: dict[str, float] = {}
        for name, rec in last.items():  # a stage's seconds: its steps over its mean rate
            kind = name.split("/")[-1]
            per_stage[kind] = round(per_stage.get(kind, 0.0) + rec["step"] / max(rec.get("it_s", 1e9), 1e-9), 2)
        info["stage_seconds"] = per_stage
        t1 = time.perf_counter()
        rhos = compose(fits, inp, cfg, depth_map, metric)
        info["compose_seconds"] = round(time.perf_counter() - t1, 2)
        info["rho"] = [round(float(r), 4) for r in rhos]
        rho_bg = 1.0
        if background is not None and depth_map is not None and not metric:
            rho_bg = _background_rho(fits, depth_map)
            info["rho_background"] = round(rho_bg, 4)
        info["fit_seconds"] = round(time.perf_counter() - t0, 2)
        model = Composed4D(fits, rhos, cams.centers[0], background=background, rho_background=rho_bg)
        model.save(Path(run_dir) / "model_4d.safetensors", cfg)
        return model, info


AMODAL_CHOICES = ("auto", "none", "exact", "teacher")


def lift_targets(amodal: str, k: int, scene=None, completed: tuple[Tensor, Tensor] | None = None
                 ) -> tuple[Tensor | None, Tensor | None]:
    """Object ``k``'s lifting targets ``(rgb [T,H,W,3], masks [T,H,W])`` for a resolved ``--amodal`` (not auto):
    exact -> the scene's unoccluded render and amodal mask; teacher -> the completion ``completed`` (rgb, masks per
    object, from :func:`_complete`); none -> ``(None, None)``: :class:`ObjectFit` then lifts and deforms from the
    input frames on the visible mask, with the pixels other objects cover left out of the losses."""
    if amodal == "exact":
        if scene is None:
            raise UserError("--amodal exact needs a ShapeWorld scene input (ground truth); use none or teacher")
        return scene.object_rgb[k], scene.amodal_masks[k]
    if amodal == "teacher":
        if completed is None:
            raise UserError("--amodal teacher: no completion was computed (internal order error)")
        return completed[0][k], completed[1][k]
    if amodal == "none":
        return None, None
    raise UserError(f"--amodal {amodal!r} is not an option; choose one of {', '.join(AMODAL_CHOICES)}")


def _cameras_and_background(cfg: DreamScene4DConfig, inp: VideoInput, depth: str, info: dict,
                            run_dir: Path) -> dict[str, Tensor] | None:
    """``--camera`` / ``--background`` (module doc): sets ``inp.cameras`` (and ``inp.camera_source``) to the cameras
    the method uses, writes them as ``cameras.json`` (spec 1.4's layout: ``pos`` + x, y, z, w quaternion,
    camera-to-world, OpenCV axes) and returns the background's activated Gaussians (None without a background)."""
    from studio.world.scenes4d import camera_pose_records

    scene = inp.scene
    camera = cfg.camera if cfg.camera != "auto" else ("gt" if scene is not None else "static")
    bg_kind = cfg.background if cfg.background != "auto" else ("gaussians" if camera == "estimate" else "none")
    if camera == "estimate" and bg_kind == "none":
        raise UserError("--camera estimate refines the poses against the background model; use --background gaussians")
    if camera == "gt" and scene is None:
        raise UserError("--camera gt needs a ShapeWorld scene input (ground-truth cameras); use --camera static or "
                        "estimate for a video")
    cams = inp.cameras
    if camera == "static":
        T = len(cams)
        cams = Cameras(cams.viewmats[:1].expand(T, 4, 4).clone(), cams.Ks.clone(), cams.width, cams.height)
    info["camera"] = camera
    info["background"] = bg_kind
    out = None
    if bg_kind == "gaussians":
        fill_kind = cfg.background_fill
        name = cfg.inpaint_teacher.strip()
        if fill_kind == "auto":
            fill_kind = "teacher" if (scene is not None or name.lower() != "shapeworld-exact") else "none"
        fill = None
        if fill_kind == "teacher":
            from .background import complete_background

            fill = complete_background(inp.frames, inp.masks, name, scene=scene, steps=cfg.inpaint_steps, seed=cfg.seed)
        depth_fn, metric = _background_depth(depth, inp)
        bg, est, binfo = build_background(inp.frames, inp.masks, cams, depth_fn, fill=fill,
                                          estimate=camera == "estimate", metric=metric, seed=cfg.seed,
                                          settings=BackgroundSettings(fit_steps=cfg.background_steps,
                                                                      stride=cfg.background_stride,
                                                                      pose_steps=cfg.pose_steps))
        info.update(binfo, background_fill=fill_kind)
        if camera == "estimate":
            cams = est
        out = bg.gaussians()
    inp.cameras = cams
    if not (camera == "static" and inp.camera_source == "default"):  # a user video keeps its default camera's name
        inp.camera_source = {"gt": "ground-truth", "estimate": "estimated", "static": "static"}[camera]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(run_dir) / "cameras.json", json.dumps(
        {"source": inp.camera_source, "convention": "camera-to-world, OpenCV axes, orientation x,y,z,w",
         "frames": camera_pose_records(cams)}, indent=1).encode())
    return out


def _background_depth(depth: str, inp: VideoInput):
    """``(depth_fn(t) -> [H,W], metric)`` for the background: the scene's exact background depth; a depth model's
    per-frame estimate with the objects' pixels set to the background's median (relative scale); or, with no depth,
    a fronto-parallel plane at ``BackgroundSettings.plane_depth`` (positions kept on it)."""
    from .background import background_valid

    if depth == "exact":
        return (lambda t: inp.scene.background_depth[t]), True
    if depth == "none":
        T, H, W = inp.frames.shape[:3]
        plane = torch.full((H, W), BackgroundSettings().plane_depth)
        return (lambda t: plane), True
    from studio.teachers.depth import DepthEstimator

    d = DepthEstimator.from_pretrained(depth).depth(inp.frames)  # [T,H,W]
    valid = background_valid(inp.masks) & (d > 0)
    for t in range(d.shape[0]):
        fillv = d[t][valid[t]].median() if bool(valid[t].any()) else d[t][d[t] > 0].median()
        d[t] = torch.where(valid[t], d[t], fillv)
    return (lambda t: d[t]), False


def _background_rho(fits: list[ObjectFit], depth: Tensor) -> float:
    """Spec 5.3's ``rho_bg`` for a relative depth map: the background was built in the depth map's units, the
    reference object (the last, rho 1) sits at its rendered depth, so the background scales by
    ``d_ref / D_ref`` (rendered over estimated median depth of the reference object at frame 0)."""
    f = fits[-1]
    with torch.no_grad():
        img, a, _ = f.render(f.world_gaussians(0), f.cams[0], f.W, f.H, mode="RGB+ED")
    reg = f.vis[0] & (a[0] > 0.75) & (depth > 0)
    if not bool(reg.any()):
        return 1.0
    return float(img[0, ..., -1][reg].median() / depth[reg].median())


def _complete(cfg: DreamScene4DConfig, inp: VideoInput, info: dict) -> tuple[Tensor, Tensor]:
    """--amodal teacher: every object's occluded pixels inpainted by ``cfg.inpaint_teacher`` from the frames and the
    visible masks (part 3, ``studio.teachers.inpaint.complete_objects``), ``(rgb [K,T,H,W,3] over white, amodal
    masks [K,T,H,W])``; with a ground-truth scene ``info["amodal_iou"]`` per object (against its amodal masks) and
    ``info["visible_iou"]`` (the visible masks against the same, what no completion gives)."""
    from studio.teachers.inpaint import complete_objects

    t0 = time.perf_counter()
    name = cfg.inpaint_teacher.strip()
    rgb, am = complete_objects(inp.frames, inp.masks, teacher="shapeworld-exact" if name.lower() == "shapeworld-exact"
                               else name, scene=inp.scene, steps=cfg.inpaint_steps, seed=cfg.seed)
    info["inpaint_seconds"] = round(time.perf_counter() - t0, 2)
    info["inpaint_teacher"] = name
    if inp.scene is not None:
        gt = inp.scene.amodal_masks.bool()

        def iou(a: Tensor) -> list[float]:
            inter = (a & gt).flatten(1).sum(1).float()
            union = (a | gt).flatten(1).sum(1).float().clamp_min(1)
            return [round(float(v), 4) for v in inter / union]

        info["amodal_iou"], info["visible_iou"] = iou(am.bool()), iou(inp.masks.bool())
    return rgb.float(), am.bool()


def least_occluded_frame(masks: Tensor) -> int:
    """The frame with the largest mask among those whose box does not touch the frame border (all frames when every
    box does): the least occluded / truncated view of the object."""
    T, H, W = masks.shape
    area = masks.flatten(1).sum(1).float()
    border = masks[:, 0].any(1) | masks[:, -1].any(1) | masks[:, :, 0].any(1) | masks[:, :, -1].any(1)
    score = torch.where(border, area - H * W, area)
    return int(score.argmax())


# ------------------------------------------------------------------------------------------------ composition
def _estimate_depth(depth: str, inp: VideoInput) -> tuple[Tensor | None, bool]:
    """Frame 0's depth map and whether it is metric (absolute)."""
    if depth == "none":
        return None, False
    if depth == "exact":
        return inp.scene.depth[0], True
    from studio.teachers.depth import DepthEstimator

    est = DepthEstimator.from_pretrained(depth)
    return est.depth(inp.frames[:1])[0], False


def compose(fits: list[ObjectFit], inp: VideoInput, cfg: DreamScene4DConfig, depth: Tensor | None,
            metric: bool) -> list[float]:
    """Spec 5: one ``rho_k`` per object from frame 0's ``depth`` (scaling about the camera centre); ``metric``
    depth gives absolute scales, else ratios to the last object (rho 1) refined by the 1-D search."""
    K = len(fits)
    if depth is None:
        return [1.0] * K
    cam0 = inp.cameras[0]
    c0 = cam0.centers[0]
    rend_d, mono_d, regions = [], [], []
    with torch.no_grad():
        for f in fits:
            g = f.world_gaussians(0)
            img, a, _ = f.render(g, cam0, f.W, f.H, mode="RGB+ED")
            er = G.erode(f.vis[0], 3 if min(f.H, f.W) < 128 else 7)
            if not bool(er.any()):
                er = f.vis[0]
            valid = er & (depth > 0)
            reg = valid & (a[0] > 0.75)
            if not bool(reg.any()):
                reg = valid & (a[0] > 0.5)
            if not bool(reg.any()) or not bool(valid.any()):
                rend_d.append(None)
                mono_d.append(None)
                regions.append(None)
                continue
            rend_d.append(img[0, ..., -1][reg])
            mono_d.append(depth[valid])
            regions.append(reg)
    rhos = [1.0] * K
    if metric:
        for k in range(K):
            if rend_d[k] is not None:
                rhos[k] = float(mono_d[k].median() / rend_d[k].median())
        return rhos
    ref = max((k for k in range(K) if rend_d[k] is not None), default=None)
    if ref is None:
        return rhos
    for k in range(K):
        if k == ref or rend_d[k] is None:
            continue
        rhos[k] = G.depth_ratio(mono_d[k], mono_d[ref], rend_d[k], rend_d[ref])
        # 1-D search: normalised depth of the pair {k, ref} against the estimate
        D_ref = mono_d[ref].median()
        R_ref = (mono_d[ref].quantile(0.9) - mono_d[ref].quantile(0.1)).clamp_min(1e-6)
        union = (fits[k].vis[0] | fits[ref].vis[0]) & (depth > 0)
        target = (depth[union] - D_ref) / R_ref
        gk, gr = fits[k].world_gaussians(0), fits[ref].world_gaussians(0)
        d_ref = rend_d[ref].median()
        r_ref = (rend_d[ref].quantile(0.9) - rend_d[ref].quantile(0.1)).clamp_min(1e-6)

        def render_pair(rho: float, gk=gk, gr=gr, union=union, d_ref=d_ref, r_ref=r_ref, f=fits[k]) -> Tensor:
            gs = dict(gk)
            gs["means"] = G.scale_about(gk["means"], c0, rho)
            gs["scales"] = gk["scales"] * rho
            both = {n: torch.cat([gs[n], gr[n]]) for n in ("means", "quats", "scales", "opacities", "colors")}
            with torch.no_grad():
                img, _, _ = f.render(both, cam0, f.W, f.H, mode="RGB+ED")
            return (img[0, ..., -1][union] - d_ref) / r_ref

        n = max(int(cfg.rho_search), 1)
        rhos[k] = G.search_rho(target, render_pair, rhos[k], lo=0.65, step=0.85 / n, n=n)
    return rhos


class Composed4D:
    """The composed scene: every object's deformed Gaussians, placed in the world and scaled by ``rho_k`` about the
    first camera's centre (the kind's ``Dynamic4D``)."""

    def __init__(self, fits: list[ObjectFit], rhos: list[float], center: Tensor, *,
                 background: dict[str, Tensor] | None = None, rho_background: float = 1.0):
        self.fits, self.rhos, self.center = fits, list(rhos), center
        self.num_frames = fits[0].T
        self.num_objects = len(fits)
        self.background, self.rho_background = background, float(rho_background)

    def background_gaussians(self) -> dict[str, Tensor] | None:
        """The static background's activated Gaussians in the world (scaled by ``rho_background`` about the centre),
        or None: the kind composes them behind the objects (the renderer's depth sort) in the PLYs and videos."""
        if self.background is None or self.background["means"].shape[0] == 0:
            return None
        b = dict(self.background)
        b["means"] = G.scale_about(b["means"], self.center, self.rho_background)
        b["scales"] = b["scales"] * self.rho_background
        return b

    def object_gaussians(self, k: int, t: int) -> dict[str, Tensor]:
        f, rho = self.fits[k], self.rhos[k]
        g = f.world_gaussians(t)
        return {"means": G.scale_about(g["means"], self.center, rho), "scales": g["scales"] * rho,
                "quats": g["quats"], "opacities": g["opacities"], "colors": g["colors"].clamp(0, 1),
                "object": torch.full((g["means"].shape[0],), k)}

    def world_gaussians(self, t: int, objects: list[int] | None = None) -> dict[str, Tensor]:
        gs = [self.object_gaussians(k, t) for k in (objects if objects is not None else range(self.num_objects))]
        return {n: torch.cat([g[n] for g in gs]) for n in gs[0]}

    def save(self, path: Path, cfg: DreamScene4DConfig) -> Path:
        """One safetensors file: per object ``obj<k>/canonical/*``, ``obj<k>/field/*`` (deformation weights),
        ``obj<k>/scale [T]``, ``obj<k>/translation [T,3]``, ``obj<k>/rotation [3,3]``, ``obj<k>/rho``; the header
        holds the K-planes config and the camera centre of the composition."""
        from safetensors.torch import save as st_save

        tensors = {"center": self.center.detach().contiguous()}
        for k, f in enumerate(self.fits):
            model = f.dyn.canonical if f.dyn is not None else f.model
            tensors.update({f"obj{k}/canonical/{n}": v.detach().contiguous() for n, v in model.params.items()})
            if f.dyn is not None:
                tensors.update({f"obj{k}/field/{n}": v.detach().contiguous() for n, v in f.dyn.field.state_dict().items()})
            S = f.S if f.st.factorise else f.S[f.st.lift_frame].expand(f.T)
            p = f.p.detach() if f.st.factorise else f.p.detach()[f.st.lift_frame].expand(f.T, 3)
            tensors[f"obj{k}/scale"] = S.detach().contiguous().clone()
            tensors[f"obj{k}/translation"] = p.contiguous().clone()
            tensors[f"obj{k}/rotation"] = f.A.contiguous()
            tensors[f"obj{k}/rho"] = torch.tensor([float(self.rhos[k])])
        bgd = self.background_gaussians()
        if bgd is not None:  # the static background, world frame (activated: scales linear, colours RGB)
            tensors.update({f"background/{n}": v.detach().contiguous().clone() for n, v in bgd.items()})
        kp = dataclasses.asdict(self.fits[0].st.kplanes)
        kp["multires"] = list(kp["multires"])
        meta = {"format": "studio.dreamscene4d", "version": 1, "objects": len(self.fits), "frames": self.num_frames,
                "kplanes": kp, "time": "tau = 2 t / T - 1",
                "world": "x_w = center + rho (S_t A (mu + d_mu(mu, tau)) + p_t - center)",
                "background": bgd is not None}
        atomic_write_bytes(path, st_save(tensors, metadata={"studio": json.dumps(meta)}))
        return path
