"""The text-to-3D Gaussian stage: sample cameras, render the student, score it with a teacher.

Methods compose it with their own score function (SDS, VSD, BSD, DSD, ...): a callable
``score_fn(ctx: ScoreContext) -> ScoreOutput`` that returns a loss whose gradient w.r.t. the latents is
the method's score gradient. Everything else — orbit cameras, view-dependent prompts, optional camera
conditioning, timestep schedules, backgrounds, densification (our CPU ``DefaultStrategy``, gsplat's
``Strategy`` interface), SH-degree schedule, previews and checkpoint state — lives here once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras, OrbitSampler, orbit_cameras
from ..distill.timesteps import TimestepSampler
from ..students.gaussians import DefaultStrategy, GaussianModel
from ..teachers.prompts import view_conditioned
from . import profile as _profile
from .loop import StepOutput

_off = contextlib.nullcontext  # the section() of an unprofiled step


@dataclass
class GaussianStageConfig:
    """Settings of the Gaussian score-distillation stage (defaults follow DreamGaussian / threestudio-3dgs)."""

    batch_size: int = 4
    """views per step"""
    init_points: int = 3000
    init_radius: float = 0.5
    init_opacity: float = 0.1
    sh_degree: int = 0
    sh_degree_every: int = 1000
    background: Literal["white", "black", "random"] = "white"
    elevation_range: tuple[float, float] = (-10.0, 45.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    radius_range: tuple[float, float] = (3.0, 3.4)
    fovy_range: tuple[float, float] = (38.0, 42.0)
    view_prompt: Literal["discrete", "left_right", "interpolated", "interpolated_left_right", "none"] = "discrete"
    camera_conditioning: bool = True
    """pass each view's camera to camera-aware teachers (ShapeWorld exact, VSD's LoRA); others ignore it"""
    negative_prompt: str = ""
    t_min: float = 0.02
    t_max: float = 0.98
    t_schedule: Literal["uniform", "linear", "dreamgaussian", "sqrt"] = "linear"
    t_max_end: float = 0.5
    t_anneal_end: float = 1.0
    """fraction of the steps at which the ``linear`` t_max anneal reaches ``t_max_end``"""
    shared_t: bool = False
    """one timestep for the whole batch of views (LucidDreamer / PlacidDreamer) instead of one per view"""
    lr_means: float = 1e-3
    lr_sh0: float = 1e-2
    lr_opacities: float = 5e-2
    lr_scales: float = 5e-3
    lr_quats: float = 5e-3
    densify: bool = True
    densify_start: int = 100
    densify_stop_frac: float = 0.6
    densify_every: int = 100
    densify_grad: float = 0.002
    prune_opacity: float = 0.01
    opacity_reset_every: int = 0
    """0 = never (score distillation usually does not reset opacities)"""
    scale_reg: float = 0.0
    """weight of a penalty on Gaussian scales above 5% of the scene radius (keeps splats small)"""
    max_gaussians: int = 0
    """densification budget (0 = none): growth stops at this many Gaussians, highest gradients first"""
    densify_scale3d: float = 0.05
    """Gaussians smaller than this fraction of the scene extent are cloned, larger ones split
    (3DGS ``percent_dense``)"""
    random_background_p: float = 0.0
    """probability per view of a random background colour instead of ``background``"""
    center_jitter: float = 0.0
    """std of the look-at target jitter (world units)"""
    up_jitter: float = 0.0
    """std of the camera up-vector jitter"""
    flip_p: float = 0.0
    """probability per view of a horizontal flip of the render before scoring (LucidDreamer's augmentation;
    not meaningful with a camera-conditioned teacher, whose references are not mirrored)"""
    depth_latent_p: float = 0.0
    """probability per step of scoring the depth map (3 channels, near = bright) instead of the RGB render
    (LucidDreamer's geometry-only steps)"""
    tv_weight: float = 0.0
    """weight of the total variation of the render (and of the depth map)"""
    scale_mean_weight: float = 0.0
    """weight of the mean activated Gaussian scale (PlacidDreamer's lambda_scale)"""
    radius_decay_every: int = 0
    """every this many steps multiply ``radius_range`` by ``radius_decay`` (0 = fixed radius)"""
    radius_decay: float = 0.95
    radius_floor: tuple[float, float] = (0.0, 0.0)
    """the decayed radius range never goes below this"""
    fovy_scale_every: int = 0
    """every this many steps scale the low / high ends of ``fovy_range`` by ``fovy_scale`` (0 = fixed)"""
    fovy_scale: tuple[float, float] = (1.0, 1.0)
    fovy_limits: tuple[float, float] = (1.0, 179.0)
    """the scaled fovy range stays inside these limits (degrees)"""
    backend: str = "auto"


def scheduled_camera_ranges(cfg: GaussianStageConfig, step: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(radius_range, fovy_range)`` in force at ``step`` (PlacidDreamer's camera schedules).

    Radius: both ends times ``radius_decay ** k`` with ``k = step // radius_decay_every``, each end
    floored at ``radius_floor``. Field of view: low end times ``fovy_scale[0] ** k``, high end times
    ``fovy_scale[1] ** k`` (``k = step // fovy_scale_every``), both clamped to ``fovy_limits``. (The
    official code scales the FoV range by ``[0.75, 1.1]`` every 500 iterations within ``[0.16, 0.60]``
    rad; reading the pair as per-end factors is our interpretation.)
    """
    r0, r1 = cfg.radius_range
    if cfg.radius_decay_every > 0:
        k = step // cfg.radius_decay_every
        r0 = max(cfg.radius_floor[0], r0 * cfg.radius_decay ** k)
        r1 = max(cfg.radius_floor[1], r1 * cfg.radius_decay ** k)
    f0, f1 = cfg.fovy_range
    if cfg.fovy_scale_every > 0:
        k = step // cfg.fovy_scale_every
        lo, hi = cfg.fovy_limits
        f0 = min(max(f0 * cfg.fovy_scale[0] ** k, lo), hi)
        f1 = min(max(f1 * cfg.fovy_scale[1] ** k, lo), hi)
    return (min(r0, r1), max(r0, r1)), (min(f0, f1), max(f0, f1))


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels of ``[B,C,H,W]`` (both directions, summed)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def depth_image(depth: Tensor, alpha: Tensor, background: Tensor) -> Tensor:
    """Depth ``[B,1,H,W]`` (expected depth) -> a 3-channel image in [0,1]: per view, foreground depth
    normalised so the nearest point is 1 and the farthest 0, composited over ``background [B,3]`` with
    the alpha (the form in which LucidDreamer / PlacidDreamer score geometry)."""
    d = depth / alpha.clamp_min(1e-6)
    fg = alpha > 0.5
    big = torch.finfo(d.dtype).max
    near = torch.where(fg, d, torch.full_like(d, big)).flatten(1).min(1).values.view(-1, 1, 1, 1)
    far = torch.where(fg, d, torch.full_like(d, -big)).flatten(1).max(1).values.view(-1, 1, 1, 1)
    ok = far > near
    near, far = torch.where(ok, near, torch.zeros_like(near)), torch.where(ok, far, torch.ones_like(far))
    v = (1 - (d - near) / (far - near)).clamp(0, 1).expand(-1, 3, -1, -1)
    return alpha * v + (1 - alpha) * background.view(-1, 3, 1, 1)


@dataclass
class ScoreContext:
    teacher: Any
    latents: Tensor  # [B,C,h,w], differentiable
    images: Tensor  # [B,3,H,W] renders in [0,1]
    alphas: Tensor  # [B,1,H,W]
    cond: Any  # TextCond
    t: Tensor  # [B]
    camera: Tensor | None  # [B,20] camera vectors (Cameras.to_vector)
    cameras: Cameras
    guidance_scale: float
    step: int
    progress: float
    generator: torch.Generator


ScoreFn = Callable[[ScoreContext], Any]


class GaussianDistillStage:
    """One score-distillation stage on a :class:`GaussianModel` (see module doc)."""

    def __init__(self, name: str, cfg: GaussianStageConfig, teacher, prompt: str, score_fn: ScoreFn, *,
                 steps: int, resolution: int, guidance_scale: float, model: GaussianModel | None = None, seed: int = 0, extra_modules: dict[str, torch.nn.Module] | None = None,
                 extra_optimizers: dict[str, torch.optim.Optimizer] | None = None):
        self.name, self.cfg, self.teacher, self.prompt, self.score_fn = name, cfg, teacher, prompt, score_fn
        self.steps, self.resolution, self.guidance_scale = int(steps), int(resolution), float(guidance_scale)
        self.generator = torch.Generator().manual_seed(seed)
        self.model = model or GaussianModel.random_in_sphere(
            cfg.init_points, radius=cfg.init_radius, seed=seed, sh_degree=cfg.sh_degree, opacity=cfg.init_opacity,
            rgb=torch.full((cfg.init_points, 3), 0.5) + 0.1 * torch.randn(cfg.init_points, 3, generator=self.generator))
        self.extra_modules = dict(extra_modules or {})
        self.extra_optimizers = dict(extra_optimizers or {})
        self.sampler = OrbitSampler(cfg.elevation_range, cfg.azimuth_range, cfg.radius_range, cfg.fovy_range,
                                    self.resolution, self.resolution)
        self.sampler.center_jitter, self.sampler.up_jitter = cfg.center_jitter, cfg.up_jitter
        self.timesteps = TimestepSampler(cfg.t_min, cfg.t_max, cfg.t_schedule, t_max_end=cfg.t_max_end,
                                         anneal_end=cfg.t_anneal_end)
        self.strategy = DefaultStrategy(
            prune_opa=cfg.prune_opacity, grow_grad2d=cfg.densify_grad, refine_start_iter=cfg.densify_start,
            refine_stop_iter=int(cfg.densify_stop_frac * self.steps) if cfg.densify else 0,
            refine_every=cfg.densify_every, reset_every=cfg.opacity_reset_every or 10**9, grow_scale3d=cfg.densify_scale3d,
            prune_scale3d=0.5, max_gaussians=cfg.max_gaussians)
        self._build_optimizers()
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.last_logs: dict[str, float] = {}

    # -- parameters ----------------------------------------------------------------------------------
    def _build_optimizers(self) -> None:
        c = self.cfg
        lrs = {"means": c.lr_means, "sh0": c.lr_sh0, "shN": c.lr_sh0 / 20, "opacities": c.lr_opacities,
               "scales": c.lr_scales, "quats": c.lr_quats}
        self._optim = self.model.make_optimizers({k: v for k, v in lrs.items() if k in self.model.params})

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {**self._optim, **self.extra_optimizers}

    # -- one step ------------------------------------------------------------------------------------
    def _backgrounds(self, B: int) -> Tensor:
        if self.cfg.background == "random":
            return torch.rand(B, 3, generator=self.generator)
        bg = torch.ones(B, 3) if self.cfg.background == "white" else torch.zeros(B, 3)
        if self.cfg.random_background_p > 0:
            pick = torch.rand(B, generator=self.generator) < self.cfg.random_background_p
            bg = torch.where(pick[:, None], torch.rand(B, 3, generator=self.generator), bg)
        return bg

    def render(self, cams: Cameras, backgrounds: Tensor, render_mode: str = "RGB"):
        return self.model.render(cams.viewmats, cams.Ks, cams.width, cams.height, backgrounds=backgrounds,
                                 backend=self.cfg.backend, render_mode=render_mode)

    def train_step(self, step: int, progress: float) -> StepOutput:
        prof = _profile.active()
        if prof is None:
            return self._train_step(step, progress, _off)
        for h in getattr(self, "_profile_handles", ()):  # left by a step the Trainer skipped (no after_step)
            h.remove()
        prof.begin_step()
        teacher = self.teacher
        inner = getattr(teacher, "_forward", None)
        own = getattr(teacher, "__dict__", {})
        fwd = own.get("_forward")  # an instance override, if any, is put back afterwards

        def timed_forward(*a, **kw):
            with prof.section("teacher_forward"):
                return inner(*a, **kw)

        if inner is not None and hasattr(teacher, "__dict__"):
            own["_forward"] = timed_forward
        try:
            with prof.section("loss_sds"):
                out = self._train_step(step, progress, prof.section)
        finally:
            if fwd is None:
                own.pop("_forward", None)
            else:
                own["_forward"] = fwd
        self._profile_hooks(prof, out)
        return out

    def _profile_hooks(self, prof, out: StepOutput) -> None:
        """Autograd and optimizer hooks that time the backward of the render and the optimizer steps (they change
        no value); removed in ``after_step``."""
        handles = []
        img, alpha = self._profile_outputs
        if out.loss.requires_grad:
            handles.append(out.loss.register_hook(lambda g: prof.mark("backward_start", "min") or None))
        for x in (img, alpha):
            if x.requires_grad:
                handles.append(x.register_hook(lambda g: prof.mark("render_grad_ready", "max") or None))
        for prm in self.model.params.values():
            if prm.requires_grad:
                handles.append(prm.register_post_accumulate_grad_hook(lambda p: prof.mark("backward_end", "max")))
        for o in self.optimizers().values():
            handles.append(o.register_step_pre_hook(lambda *a: prof.mark("opt_start") or None))
            handles.append(o.register_step_post_hook(
                lambda *a: prof.add("optimizer_step", prof.clock() - prof.marks["opt_start"])))
        self._profile_handles = handles

    def _profile_backward(self, prof) -> None:
        for h in getattr(self, "_profile_handles", ()):
            h.remove()
        self._profile_handles, self._profile_outputs = [], None
        m = prof.marks
        if "render_grad_ready" in m and "backward_end" in m:
            prof.add("render_backward", m["backward_end"] - m["render_grad_ready"])
            if "backward_start" in m:
                prof.add("loss_sds", m["render_grad_ready"] - m["backward_start"])

    def _train_step(self, step: int, progress: float, section) -> StepOutput:
        c, teacher = self.cfg, self.teacher
        with section("cameras"):
            self.model.step_sh_degree(step, every=c.sh_degree_every)
            self.sampler.radius_range, self.sampler.fovy_range = scheduled_camera_ranges(c, step)
            views = self.sampler.sample(c.batch_size, self.generator)
            bg = self._backgrounds(c.batch_size)
        use_depth = c.depth_latent_p > 0 and float(torch.rand((), generator=self.generator)) < c.depth_latent_p
        need_depth = use_depth or c.tv_weight > 0
        with section("render_forward"):
            img, alpha, meta = self.render(views.cameras, bg, render_mode="RGB+ED" if need_depth else "RGB")
        self._profile_outputs = (img, alpha) if section is not _off else None
        with section("densification"):
            self.strategy.step_pre_backward(self.model.params, self._optim, self.strategy_state, step, meta)
        img = img.permute(0, 3, 1, 2)
        alpha = alpha.permute(0, 3, 1, 2)
        images, depth = img[:, :3], (img[:, 3:4] if need_depth else None)  # [B,3,H,W], [B,1,H,W]
        rgb_for_reg = images
        depth_img = depth_image(depth, alpha, bg) if need_depth else None
        if use_depth:
            images = depth_img
        if c.flip_p > 0:
            flip = (torch.rand(c.batch_size, generator=self.generator) < c.flip_p).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
        size = teacher.native_resolution
        if images.shape[-1] != size and teacher.is_latent:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        with section("teacher_forward"):
            latents = teacher.encode(images)
            cond = view_conditioned(teacher, self.prompt, views.azimuth, views.elevation,
                                    mode=c.view_prompt, negative=c.negative_prompt or None)
        t = self.timesteps.sample(1 if c.shared_t else c.batch_size, progress, teacher.schedule, self.generator)
        t = t.expand(c.batch_size) if c.shared_t else t
        ctx = ScoreContext(teacher, latents, images, alpha, cond, t,
                           views.cameras.to_vector() if c.camera_conditioning else None, views.cameras,
                           self.guidance_scale, step, progress, self.generator)
        out = self.score_fn(ctx)
        loss = out.loss
        logs = {"t": float(t.float().mean()), "grad_norm": float(out.grad.norm() / c.batch_size),
                "n_gaussians": float(self.model.num_gaussians)}
        if c.tv_weight > 0:
            tv = total_variation(rgb_for_reg) + total_variation(depth_img)
            loss = loss + c.tv_weight * tv
            logs["tv"] = float(tv.detach())
        if c.scale_mean_weight > 0:
            sm = self.model.scales.mean()
            loss = loss + c.scale_mean_weight * sm
            logs["scale_mean"] = float(sm.detach())
        if c.scale_reg > 0:
            reg = (self.model.scales - 0.05 * 1.0).clamp_min(0).pow(2).sum()
            loss = loss + c.scale_reg * reg
            logs["scale_reg"] = float(reg)
        logs.update(getattr(out, "logs", {}) or {})
        self.last_logs = logs
        self._meta = meta
        return StepOutput(loss, logs, meta)

    def after_step(self, step: int, out: StepOutput) -> None:
        prof = _profile.active()
        if prof is not None:
            self._profile_backward(prof)
        with (prof.section("densification") if prof is not None else _off()):
            self.strategy.step_post_backward(self.model.params, self._optim, self.strategy_state, step, out.info)
        self.model.step = step + 1

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "params": {k: v.detach().clone() for k, v in self.model.params.items()},
            "sh_degree": self.model.sh_degree,
            "active_sh_degree": self.model.active_sh_degree,
            "strategy": {k: v for k, v in self.strategy_state.items() if isinstance(v, (Tensor, int, float, type(None)))},
            "generator": self.generator.get_state(),
            "extra": {k: m.state_dict() for k, m in self.extra_modules.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model = GaussianModel(state["params"], state["sh_degree"], active_sh_degree=state["active_sh_degree"])
        self._build_optimizers()
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.strategy_state.update({k: v for k, v in state.get("strategy", {}).items()})
        self.generator.set_state(state["generator"])
        for k, m in self.extra_modules.items():
            if k in state.get("extra", {}):
                m.load_state_dict(state["extra"][k])

    @torch.no_grad()
    def preview(self, n: int = 4, size: int | None = None) -> Tensor:
        """``n`` views around the object side by side: ``[H, n*W, 3]`` in [0,1]."""
        prof = _profile.active()
        with (prof.section("preview") if prof is not None else _off()):
            return self._preview(n, size)

    def _preview(self, n: int, size: int | None) -> Tensor:
        s = size or self.resolution
        cams = orbit_cameras(15.0, torch.arange(n) * (360.0 / n), sum(self.cfg.radius_range) / 2,
                             sum(self.cfg.fovy_range) / 2, s, s)
        img, _, _ = self.render(cams, torch.ones(n, 3))
        return torch.cat(list(img.clamp(0, 1)), dim=1)
