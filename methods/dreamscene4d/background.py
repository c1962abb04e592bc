"""DreamScene4D's background model and per-frame camera poses (issue 20 part 6; spec 1.4). **Our design**: the
official code releases neither (its authors' background / camera code is "still being cleaned up", issues #4 and #7;
the paper names DUSt3R for the background and "re-rendering the background to match the video frames" for the
camera), so everything here is a documented, configurable choice of ours, not a port.

Background model (``--background gaussians``): static 3D Gaussians in the shared student
(:class:`studio.students.gaussians.GaussianModel`, SH degree 0, isotropic) rendered by the shared rasterizer, so the
composition is the renderer's own depth sort (the background sits behind the objects because it is farther, not
because it is drawn first) and the PLY / videos carry it like any other Gaussians. Chosen over a textured far
layer because every output of the kind is Gaussians already. Built as:

1. **targets**: the frames with the objects removed. Pixels outside every (dilated) object mask are the real
   background; the occluded background is filled by the inpainting teacher path of part 3
   (:func:`complete_background`: ``studio.teachers.inpaint.inpaint_video`` with the hole = the union of the object
   masks; on a ShapeWorld scene the exact teacher knows the clean plates, so the fill is exact; with an
   SD-inpainting model it is that model's guess; ``--background-fill none`` leaves the hole out of the fit, and
   other frames, where the objects have moved, cover it);
2. **initialisation**: one Gaussian per ``stride x stride`` pixel block of frame 0, back-projected with a depth
   map (the scene's exact background depth; a transformers depth model, with the objects' pixels replaced by the
   background's median; or, without depth, a fronto-parallel plane at ``plane_depth``), coloured from the target,
   scale = half the block's footprint at that depth;
3. **growth**: every later frame adds Gaussians where the model does not cover the frame yet (rendered alpha < 0.5:
   what the moving camera newly sees), back-projected with that frame's camera (estimated or given); non-metric
   depth is first rescaled to the model's rendered depth where the two overlap;
4. **fit**: colours, opacities, scales (and, for non-exact depth, positions) optimised on all frames' targets with
   the frames' cameras (squared error over the target's valid pixels plus coverage ``(1 - alpha)^2``).

Camera poses (``--camera estimate``): frame 0's camera fixes the gauge (DreamScene4D's relative poses, spec 1.4:
the ShapeWorld ground truth of frame 0, or the default camera of a user video). Frame t starts from the previous
pose (frame 1) or the constant-velocity extrapolation ``V_{t-1} V_{t-2}^-1 V_{t-1}`` and is refined
photometrically: a left-multiplied delta ``[exp(omega) | v]`` of the world-to-camera matrix (rotation vector and
translation, 6 numbers) is optimised through the rasterizer against frame t's real pixels, masked to the
background (outside the dilated object masks) and to where the model covers the frame, coarse to fine (quarter,
half, full resolution): Levenberg-Marquardt on the per-pixel residuals with the Jacobian from central differences
of the renderer (default), or Adam on the rasterizer's autograd gradients to ``viewmats`` (``solver="adam"``; it
crawls along the rotation / translation valley of a far, nearly planar background: on ``trio_orbit`` frame 1,
48 px, 100 Adam steps left 1.6 deg where 10 Gauss-Newton iterations reach 0.2 deg). After every frame is placed, ``rounds`` alternations refit the background on
all frames and re-refine every pose. Translation units are the background depth's: metric with the exact depth,
the depth model's scale otherwise (spec 1.4's ``cam_scales`` question; not resolved for non-metric depth), and
only weakly constrained with the plane (no depth).

Errors against the ground truth (``studio.world.scenes4d.camera_pose_errors``: geodesic rotation error in degrees
and centre error, both relative to frame 0) are reported by the kind's evaluation.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from studio.cameras import Cameras
from studio.errors import UserError
from studio.students.gaussians import GaussianModel, rgb_to_sh, sh_to_rgb

CAMERA_CHOICES = ("auto", "gt", "estimate", "static")
BACKGROUND_CHOICES = ("auto", "none", "gaussians")
FILL_CHOICES = ("auto", "none", "teacher")


@dataclass
class BackgroundSettings:
    stride: int = 1
    """one Gaussian per stride x stride pixel block of a frame"""
    dilate: int = 1
    """object masks grown by this many pixels before taking the background (mixed edge pixels excluded)"""
    fit_steps: int = 60
    grow_steps: int = 0
    """fit steps (on the frames placed so far) after each frame's new Gaussians (0: measured better on trio_orbit,
    48 px: 0.36 vs 0.73 deg mean rotation error, because refitting old colours to not-yet-refined poses drifts)"""
    pose_steps: int = 15
    """iterations per frame and pyramid level of the pose refinement (Gauss-Newton; Adam needs ~10x more)"""
    solver: str = "gauss-newton"
    """pose solver: gauss-newton (Levenberg-Marquardt, Jacobian by central differences of the renderer) or adam
    (first-order, through the rasterizer's gradients to viewmats)"""
    levels: int = 3
    """pyramid levels of the pose refinement (3: quarter, half, then full resolution)"""
    rounds: int = 1
    """alternations of (refit the background on all frames, re-refine every pose) after the sequential pass"""
    lr_rot: float = 3e-3
    """pose refinement learning rate of the rotation vector (radians per step at most, Adam)"""
    lr_trans: float = 3e-3
    """... of the translation, times the background's median depth"""
    plane_depth: float = 4.0
    """depth of the fronto-parallel background plane when there is no depth map (twice the default camera's
    distance to the objects)"""
    opacity: float = 0.95


# ------------------------------------------------------------------------------------------------ geometry helpers
def so3_exp(omega: Tensor) -> Tensor:
    """Rotation matrix of a rotation vector ``omega [3]`` (Rodrigues; smooth at 0)."""
    th2 = (omega * omega).sum()
    th = torch.sqrt(th2 + 1e-20)
    z = omega.new_zeros(())
    Kx = torch.stack([torch.stack([z, -omega[2], omega[1]]), torch.stack([omega[2], z, -omega[0]]),
                      torch.stack([-omega[1], omega[0], z])])
    a = torch.where(th2 < 1e-8, 1 - th2 / 6, torch.sin(th) / th)
    b = torch.where(th2 < 1e-8, 0.5 - th2 / 24, (1 - torch.cos(th)) / (th * th))
    return torch.eye(3, dtype=omega.dtype) + a * Kx + b * (Kx @ Kx)


def pose_delta(omega: Tensor, v: Tensor) -> Tensor:
    """``[4,4]`` rigid transform ``[exp(omega) | v]`` (left-multiplies a world-to-camera matrix: a camera-frame
    motion)."""
    top = torch.cat([so3_exp(omega), v[:, None]], 1)
    return torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=omega.dtype)], 0)


def pixel_rays(cam: Cameras) -> Tensor:
    """``[H,W,3]`` camera-frame directions (z = 1) through the pixel centres of ``cam`` (its first camera)."""
    H, W = cam.height, cam.width
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    pix = torch.stack([jj, ii, torch.ones_like(jj)], -1)
    return pix @ torch.linalg.inv(cam.Ks[0]).T


def backproject(depth: Tensor, cam: Cameras, select: Tensor) -> Tensor:
    """World points ``[N,3]`` of the ``select``-ed pixels ``[H,W]`` at view-space ``depth [H,W]`` in ``cam``."""
    pc = pixel_rays(cam)[select] * depth[select][:, None]
    c2w = torch.linalg.inv(cam.viewmats[0])
    return pc @ c2w[:3, :3].T + c2w[:3, 3]


def background_valid(masks: Tensor, dilate: int = 1) -> Tensor:
    """``[T,H,W]`` bool: pixels outside every object mask ``[K,T,H,W]`` grown by ``dilate`` pixels."""
    union = masks.bool().any(0).float()[:, None]
    if dilate > 0:
        union = F.max_pool2d(union, 2 * dilate + 1, 1, dilate)
    return union[:, 0] < 0.5


def _pool(x: Tensor, f: int) -> Tensor:
    """Average-pool ``[H,W,C]`` by ``f``."""
    return F.avg_pool2d(x.permute(2, 0, 1)[None], f)[0].permute(1, 2, 0) if f > 1 else x


# ------------------------------------------------------------------------------------------------ background
class BackgroundModel:
    """Static background Gaussians (module doc): a :class:`GaussianModel` (SH degree 0) plus ``metric`` (whether
    its depth is absolute)."""

    def __init__(self, model: GaussianModel | None = None, *, metric: bool = True, opacity: float = 0.95):
        self.model, self.metric, self.opacity = model, metric, float(opacity)

    @property
    def num_gaussians(self) -> int:
        return 0 if self.model is None else self.model.num_gaussians

    def add(self, points: Tensor, colors: Tensor, scales: Tensor) -> int:
        """Append isotropic Gaussians at ``points [N,3]`` with ``colors [N,3]`` and linear ``scales [N]``."""
        n = points.shape[0]
        if n == 0:
            return 0
        new = {"means": points.float(), "scales": torch.log(scales.clamp_min(1e-6))[:, None].repeat(1, 3).float(),
               "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
               "opacities": torch.full((n,), math.log(self.opacity / (1 - self.opacity))),
               "sh0": rgb_to_sh(colors.float().clamp(0, 1))[:, None, :], "shN": torch.zeros(n, 0, 3)}
        if self.model is not None:
            new = {k: torch.cat([self.model.params[k].detach(), v]) for k, v in new.items()}
        self.model = GaussianModel(new, sh_degree=0)
        return n

    def add_from_frame(self, target: Tensor, weight: Tensor, cam: Cameras, depth: Tensor, stride: int = 1,
                       only_uncovered: bool = True) -> int:
        """Back-project the valid (``weight > 0``) pixels of ``target [H,W,3]`` that the model does not cover yet
        (rendered alpha < 0.5) at ``depth [H,W]`` in ``cam``, one Gaussian per ``stride`` block."""
        H, W = cam.height, cam.width
        sel = weight > 0
        if stride > 1:
            grid = torch.zeros(H, W, dtype=torch.bool)
            grid[stride // 2::stride, stride // 2::stride] = True
            sel &= grid
        if only_uncovered and self.model is not None:
            with torch.no_grad():
                _, a = self.render(cam)
            sel &= a[0] < 0.5
        sel &= depth > 0
        if not bool(sel.any()):
            return 0
        f = float(cam.Ks[0, 0, 0])
        pts = backproject(depth, cam, sel)
        return self.add(pts, target[sel], depth[sel] / f * 0.5 * stride)

    def render(self, cams: Cameras, *, mode: str = "RGB", bg: float = 0.0) -> tuple[Tensor, Tensor]:
        """``[C,H,W,D]`` (colour, plus expected depth with ``mode="RGB+ED"``) over ``bg`` and alphas ``[C,H,W]``."""
        C = len(cams)
        if self.model is None:
            D = 4 if mode == "RGB+ED" else 3
            return torch.full((C, cams.height, cams.width, D), float(bg)), torch.zeros(C, cams.height, cams.width)
        img, a, _ = self.model.render(cams.viewmats, cams.Ks, cams.width, cams.height, render_mode=mode,
                                      backgrounds=torch.full((C, 3), float(bg)))
        return img, a[..., 0]

    def gaussians(self) -> dict[str, Tensor]:
        """Activated Gaussians (detached): ``means quats scales opacities colors`` (RGB in [0, 1])."""
        m = self.model
        if m is None:
            z = torch.zeros(0, 3)
            return {"means": z, "quats": torch.zeros(0, 4), "scales": z, "opacities": torch.zeros(0), "colors": z}
        with torch.no_grad():
            return {"means": m.means.detach().clone(), "quats": m.quats.detach().clone(),
                    "scales": m.scales.detach().clone(), "opacities": m.opacities.detach().clone(),
                    "colors": sh_to_rgb(m.params["sh0"][:, 0]).detach().clamp(0, 1)}

    def fit(self, targets: Tensor, weights: Tensor, cams: Cameras, steps: int, *, frames_per_step: int = 4,
            seed: int = 0) -> float:
        """Fit colours, opacities, scales (and positions when the depth is not metric) to ``targets [T,H,W,3]``
        where ``weights [T,H,W] > 0`` in ``cams``; returns the last loss."""
        if self.model is None or steps <= 0:
            return float("nan")
        m = self.model
        lrs = {"sh0": 0.02, "opacities": 0.05, "scales": 0.005, "means": 0.0 if self.metric else 1e-3,
               "quats": 0.0, "shN": 0.0}
        params = [{"params": [m.params[k]], "lr": lr} for k, lr in lrs.items() if lr > 0]
        opt = torch.optim.Adam(params)
        T = targets.shape[0]
        g = torch.Generator().manual_seed(int(seed) + 4099)
        w = weights.float()
        loss_v = float("nan")
        for _ in range(int(steps)):
            idx = torch.randperm(T, generator=g)[:frames_per_step] if T > frames_per_step else torch.arange(T)
            c = Cameras(cams.viewmats[idx], cams.Ks[idx], cams.width, cams.height)
            img, a = self.render(c)
            wi = w[idx]
            err = ((img[..., :3] - targets[idx]) ** 2).sum(-1) + (1 - a) ** 2
            loss = (err * wi).sum() / wi.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
        for p in m.params.values():
            p.grad = None
        return loss_v

    def median_depth(self, cam: Cameras) -> float:
        with torch.no_grad():
            img, a = self.render(cam, mode="RGB+ED")
        d = img[0, ..., -1][a[0] > 0.5]
        return float(d.median()) if d.numel() else 1.0


# ------------------------------------------------------------------------------------------------ camera poses
def refine_pose(bg: BackgroundModel, frame: Tensor, valid: Tensor, viewmat: Tensor, K: Tensor, W: int, H: int, *,
                steps: int = 15, levels: int = 3, solver: str = "gauss-newton", lr_rot: float = 3e-3,
                lr_trans: float = 3e-3, depth_scale: float | None = None) -> tuple[Tensor, float]:
    """Photometric refinement of one camera (module doc): the world-to-camera ``viewmat [4,4]`` (the
    initialisation) -> the refined one and the final loss (mean squared colour error), from ``frame [H,W,3]`` on its
    ``valid [H,W]`` background pixels where ``bg`` covers the frame (rendered alpha > 0.9). The unknowns are a
    rotation vector and a translation (in units of ``depth_scale``, default the background's median depth) of a
    camera-frame delta ``[exp(omega) | v] @ viewmat``; coarse to fine over ``levels`` (each halves the resolution).

    ``solver="gauss-newton"`` (default): Levenberg-Marquardt on the per-pixel residuals, the 6-column Jacobian by
    central differences of the renderer, ``steps`` iterations per level; it walks the rotation / translation valley
    of a far, nearly planar background that first-order steps crawl along. ``solver="adam"``: Adam on the loss
    through the rasterizer's autograd (gradients to ``viewmats``), ``steps`` steps per level with linear decay."""
    if bg.model is None:
        raise UserError("refine_pose needs a background model with Gaussians; build it from a frame first")
    if solver not in ("gauss-newton", "adam"):
        raise UserError(f"pose solver must be 'gauss-newton' or 'adam', got {solver!r}")
    if depth_scale is None:
        depth_scale = bg.median_depth(Cameras(viewmat[None], K[None], W, H))
    ds = float(depth_scale)
    theta = torch.zeros(6)
    req = {k: p.requires_grad for k, p in bg.model.params.items()}
    for p in bg.model.params.values():
        p.requires_grad_(False)

    def vm_of(th: Tensor) -> Tensor:
        return pose_delta(th[:3], th[3:] * ds) @ viewmat

    loss_v = float("nan")
    try:
        for level in reversed(range(max(1, int(levels)))):
            f = 2 ** level
            w, h = W // f, H // f
            if w < 8 or h < 8:
                continue
            Kl = K.clone()
            Kl[0] *= w / W
            Kl[1] *= h / H
            tgt = _pool(frame, f)
            vl = _pool(valid.float()[..., None], f)[..., 0] > 0.999

            def render(th: Tensor) -> tuple[Tensor, Tensor]:
                img, a = bg.render(Cameras(vm_of(th)[None], Kl[None], w, h))
                return img[0], a[0]

            if solver == "adam":
                th = theta.clone().requires_grad_(True)
                opt = torch.optim.Adam([{"params": [th], "lr": lr_rot}])
                scale = torch.tensor([1.0, 1.0, 1.0, lr_trans / lr_rot, lr_trans / lr_rot, lr_trans / lr_rot])
                for i in range(int(steps)):
                    img, a = render(th * scale)
                    sel = vl & (a.detach() > 0.9)
                    if not bool(sel.any()):
                        break
                    loss = ((img - tgt) ** 2).sum(-1)[sel].mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for g in opt.param_groups:
                        g["lr"] = lr_rot * (1.0 - 0.9 * i / max(int(steps), 1))
                    opt.step()
                    loss_v = float(loss.detach())
                theta = (th.detach() * scale)
                continue
            lam, eps = 1e-3, 1e-3
            with torch.no_grad():
                for _ in range(int(steps)):
                    img, a = render(theta)
                    sel = vl & (a > 0.9)
                    if int(sel.sum()) < 12:
                        break
                    r = (img - tgt)[sel].reshape(-1)
                    cost = float((r * r).mean())
                    cols = []
                    for i in range(6):
                        e = torch.zeros(6)
                        e[i] = eps
                        cols.append(((render(theta + e)[0] - render(theta - e)[0])[sel].reshape(-1)) / (2 * eps))
                    J = torch.stack(cols, 1).double()
                    JtJ, Jtr = J.T @ J, J.T @ r.double()
                    improved = False
                    for _ in range(6):
                        A = JtJ + lam * torch.diag(JtJ.diagonal().clamp_min(1e-9))
                        step = -torch.linalg.solve(A, Jtr).float()
                        img2, _ = render(theta + step)
                        c2 = float(((img2 - tgt)[sel] ** 2).mean())
                        if c2 < cost:
                            theta, cost, improved = theta + step, c2, True
                            lam = max(lam / 3, 1e-6)
                            break
                        lam *= 4
                    loss_v = 3 * cost  # per-pixel squared colour error, as the adam path
                    if not improved or float(step.abs().max()) < 1e-6:
                        break
    finally:
        for k, p in bg.model.params.items():
            p.requires_grad_(req[k])
    with torch.no_grad():
        return vm_of(theta.detach()), loss_v


def _extrapolate(prev: Tensor, prev2: Tensor | None) -> Tensor:
    """Constant-velocity initialisation ``V_{t-1} V_{t-2}^-1 V_{t-1}`` (or the previous pose)."""
    if prev2 is None:
        return prev.clone()
    return prev @ torch.linalg.inv(prev2) @ prev


def build_background(frames: Tensor, masks: Tensor, cameras: Cameras, depth_fn: Callable[[int], Tensor], *,
                     fill: Tensor | None = None, estimate: bool = False, metric: bool = True,
                     settings: BackgroundSettings | None = None, seed: int = 0) -> tuple[BackgroundModel, Cameras, dict]:
    """The background model and the cameras (module doc).

    ``frames [T,H,W,3]``, object ``masks [K,T,H,W]``; ``cameras``: the given per-frame cameras, or with
    ``estimate=True`` only its frame 0 (the gauge) and intrinsics are used and every later pose is estimated;
    ``depth_fn(t) -> [H,W]`` view-space depth of frame t's background (0 = unknown); ``fill [T,H,W,3]``: the
    frames with the occluded background inpainted (None: only visible background pixels are fitted). Returns
    ``(background, cameras, info)`` with ``info`` holding seconds, Gaussian count, per-frame pose losses."""
    st = settings or BackgroundSettings()
    t0 = time.perf_counter()
    T, H, W = frames.shape[:3]
    if masks.shape[1:] != (T, H, W):
        raise UserError(f"masks {tuple(masks.shape)} must be [K,T,H,W] for frames {tuple(frames.shape)}")
    valid = background_valid(masks, st.dilate)
    targets = fill if fill is not None else frames
    weights = torch.ones(T, H, W) if fill is not None else valid.float()
    bg = BackgroundModel(metric=metric, opacity=st.opacity)
    K = cameras.Ks
    vms = [cameras.viewmats[0].clone()]
    bg.add_from_frame(targets[0], weights[0], cameras[0], depth_fn(0), st.stride, only_uncovered=False)
    if bg.model is None:
        raise UserError("no background pixels to build the background from: the object masks cover frame 0 "
                        "entirely; use --background none")
    bg.fit(targets[:1], weights[:1], cameras[0], st.fit_steps, seed=seed)  # colours: undo the splats' blur
    depth_scale = bg.median_depth(cameras[0])
    losses = [0.0]

    def depth_at(t: int, cam: Cameras) -> Tensor:
        d = depth_fn(t)
        if bg.metric:
            return d
        with torch.no_grad():  # align a relative depth to the model where both exist
            img, a = bg.render(cam, mode="RGB+ED")
        both = (a[0] > 0.5) & (d > 0)
        if bool(both.any()):
            d = d * (img[0, ..., -1][both] / d[both]).median()
        return d

    for t in range(1, T):
        if estimate:
            init = _extrapolate(vms[-1], vms[-2] if len(vms) > 1 else None)
            vm, loss = refine_pose(bg, frames[t], valid[t], init, K[t], W, H, steps=st.pose_steps, levels=st.levels,
                                   solver=st.solver, lr_rot=st.lr_rot, lr_trans=st.lr_trans, depth_scale=depth_scale)
            losses.append(loss)
        else:
            vm = cameras.viewmats[t].clone()
        vms.append(vm)
        cam_t = Cameras(vm[None], K[t:t + 1], W, H)
        if bg.add_from_frame(targets[t], weights[t], cam_t, depth_at(t, cam_t), st.stride) and st.grow_steps > 0:
            seen = Cameras(torch.stack(vms), K[:t + 1], W, H)
            bg.fit(targets[:t + 1], weights[:t + 1], seen, st.grow_steps, seed=seed + t)
    cams = Cameras(torch.stack(vms), K.clone(), W, H)
    for r in range(int(st.rounds) if estimate else 0):
        bg.fit(targets, weights, cams, st.fit_steps, seed=seed + r)
        for t in range(1, T):
            vm, losses[t] = refine_pose(bg, frames[t], valid[t], cams.viewmats[t], K[t], W, H, steps=st.pose_steps,
                                        levels=1, solver=st.solver, lr_rot=st.lr_rot / 3, lr_trans=st.lr_trans / 3,
                                        depth_scale=depth_scale)
            cams.viewmats[t] = vm
    final = bg.fit(targets, weights, cams, st.fit_steps, seed=seed + 97)
    info = {"background_gaussians": bg.num_gaussians, "background_seconds": round(time.perf_counter() - t0, 2),
            "background_fit_loss": round(final, 5) if final == final else None}
    if estimate:
        info["pose_losses"] = [round(float(x), 5) for x in losses]
    return bg, cams, info


def complete_background(frames: Tensor, masks: Tensor, teacher: str = "shapeworld-exact", *, scene=None,
                        steps: int = 10, seed: int = 0, dilate: int = 1) -> Tensor:
    """The frames ``[T,H,W,3]`` with every object removed and the hole (the union of the object masks, grown by
    ``dilate``) inpainted by the part-3 path (``studio.teachers.inpaint.inpaint_video``): ``teacher``
    ``"shapeworld-exact"`` (a ShapeWorld ``scene``'s exact teacher, which knows its clean background plates) or an
    SD-inpainting folder / hub id."""
    from studio.teachers.inpaint import ShapeWorldInpaintTeacher, inpaint_video, load_inpaint_teacher

    name = str(teacher).strip()
    if name.lower() == "shapeworld-exact":
        if scene is None:
            raise UserError("--background-fill teacher with the shapeworld-exact teacher needs a ShapeWorld scene "
                            "input; give an SD-inpainting model as --inpaint-teacher or use --background-fill none")
        t = ShapeWorldInpaintTeacher(scene.background_frames.permute(0, 3, 1, 2)).freeze()
    else:
        t = load_inpaint_teacher(name)
    hole = ~background_valid(masks, dilate)
    out = inpaint_video(t, frames.permute(0, 3, 1, 2).float(), hole.float()[:, None], steps=steps, seed=seed)
    return out.permute(0, 2, 3, 1).contiguous()


__all__ = ["BackgroundSettings", "BackgroundModel", "build_background", "complete_background", "refine_pose",
           "background_valid", "backproject", "pose_delta", "so3_exp", "CAMERA_CHOICES", "BACKGROUND_CHOICES",
           "FILL_CHOICES"]
