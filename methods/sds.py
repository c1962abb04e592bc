"""SDS (DreamFusion, Poole et al. 2022, arXiv 2209.14988) on a 3D Gaussian student.

Algorithm (per step):
    1. sample B orbit cameras; render the Gaussians x = g(theta, c)
    2. z = E(x); t ~ schedule; z_t = sqrt(abar) z + sqrt(1 - abar) eps
    3. G = w(t) (eps_cfg(z_t; y_view(c), t) - eps)        # teacher frozen, no_grad
    4. dL/dz = G  (studio.distill.inject_gradient); step theta; densify / prune
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from studio.distill.sds import sds
from studio.train.gaussian_stage import GaussianDistillStage, ScoreContext

from studio.runs.text_to_3d import TextTo3DConfig, TextTo3DMethod


@dataclass
class SDSConfig(TextTo3DConfig):
    weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
    grad_clip: float | None = None
    """element-wise clamp of G (None = off)"""


class SDSMethod(TextTo3DMethod):
    default_for_verb = True
    name = "sds"
    description = "Score Distillation Sampling (DreamFusion) into 3D Gaussians"
    paper = "https://arxiv.org/abs/2209.14988"
    Config = SDSConfig

    def stages(self, cfg: SDSConfig, teacher, stage_kwargs: dict) -> list:
        def score(ctx: ScoreContext):
            return sds(ctx.teacher, ctx.latents, ctx.cond, ctx.t, guidance_scale=ctx.guidance_scale,
                       weighting=cfg.weighting, grad_clip=cfg.grad_clip, camera=ctx.camera, generator=ctx.generator)

        return [GaussianDistillStage("sds", cfg.stage, teacher, cfg.prompt, score, seed=cfg.seed, **stage_kwargs)]
