"""The text-to-3D Gaussian stage: sample cameras, render the student, score it with a teacher.

Methods compose it with their own score function (SDS, VSD, BSD, DSD, ...): a callable
``score_fn(ctx: ScoreContext) -> ScoreOutput`` that returns a loss whose gradient w.r.t. the latents is
the method's score gradient. Everything else — orbit cameras, view-dependent prompts, optional camera
conditioning, timestep schedules, backgrounds, densification (our CPU ``DefaultStrategy``, gsplat's
``Strategy`` interface), SH-degree schedule, previews and checkpoint state — lives here once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras, OrbitSampler, orbit_cameras
from ..distill.timesteps import TimestepSampler
from ..students.gaussians import DefaultStrategy, GaussianModel
from ..teachers.prompts import view_conditioned
from .loop import StepOutput


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
    view_prompt: Literal["discrete", "interpolated", "none"] = "discrete"
    camera_conditioning: bool = True
    """pass each view's camera to camera-aware teachers (ShapeWorld exact, VSD's LoRA); others ignore it"""
    negative_prompt: str = ""
    t_min: float = 0.02
    t_max: float = 0.98
    t_schedule: Literal["uniform", "linear", "dreamgaussian", "sqrt"] = "linear"
    t_max_end: float = 0.5
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
    backend: str = "auto"


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
        self.timesteps = TimestepSampler(cfg.t_min, cfg.t_max, cfg.t_schedule, t_max_end=cfg.t_max_end)
        self.strategy = DefaultStrategy(
            prune_opa=cfg.prune_opacity, grow_grad2d=cfg.densify_grad, refine_start_iter=cfg.densify_start,
            refine_stop_iter=int(cfg.densify_stop_frac * self.steps) if cfg.densify else 0,
            refine_every=cfg.densify_every, reset_every=cfg.opacity_reset_every or 10**9, grow_scale3d=0.05,
            prune_scale3d=0.5)
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
        if self.cfg.background == "white":
            return torch.ones(B, 3)
        if self.cfg.background == "black":
            return torch.zeros(B, 3)
        return torch.rand(B, 3, generator=self.generator)

    def render(self, cams: Cameras, backgrounds: Tensor):
        return self.model.render(cams.viewmats, cams.Ks, cams.width, cams.height, backgrounds=backgrounds,
                                 backend=self.cfg.backend)

    def train_step(self, step: int, progress: float) -> StepOutput:
        c, teacher = self.cfg, self.teacher
        self.model.step_sh_degree(step, every=c.sh_degree_every)
        views = self.sampler.sample(c.batch_size, self.generator)
        img, alpha, meta = self.render(views.cameras, self._backgrounds(c.batch_size))
        self.strategy.step_pre_backward(self.model.params, self._optim, self.strategy_state, step, meta)
        images = img.permute(0, 3, 1, 2)  # [B,3,H,W]
        size = teacher.native_resolution
        if images.shape[-1] != size and teacher.is_latent:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        latents = teacher.encode(images)
        cond = view_conditioned(teacher, self.prompt, views.azimuth, views.elevation,
                                mode=c.view_prompt, negative=c.negative_prompt or None)
        t = self.timesteps.sample(c.batch_size, progress, teacher.schedule, self.generator)
        ctx = ScoreContext(teacher, latents, images, alpha.permute(0, 3, 1, 2), cond, t,
                           views.cameras.to_vector() if c.camera_conditioning else None, views.cameras,
                           self.guidance_scale, step, progress, self.generator)
        out = self.score_fn(ctx)
        loss = out.loss
        logs = {"t": float(t.float().mean()), "grad_norm": float(out.grad.norm() / c.batch_size),
                "n_gaussians": float(self.model.num_gaussians)}
        if c.scale_reg > 0:
            reg = (self.model.scales - 0.05 * 1.0).clamp_min(0).pow(2).sum()
            loss = loss + c.scale_reg * reg
            logs["scale_reg"] = float(reg)
        logs.update(getattr(out, "logs", {}) or {})
        self.last_logs = logs
        self._meta = meta
        return StepOutput(loss, logs, meta)

    def after_step(self, step: int, out: StepOutput) -> None:
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
        s = size or self.resolution
        cams = orbit_cameras(15.0, torch.arange(n) * (360.0 / n), sum(self.cfg.radius_range) / 2,
                             sum(self.cfg.fovy_range) / 2, s, s)
        img, _, _ = self.render(cams, torch.ones(n, 3))
        return torch.cat(list(img.clamp(0, 1)), dim=1)
