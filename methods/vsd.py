"""VSD (ProlificDreamer, Wang et al. 2023, arXiv 2305.16213) on a 3D Gaussian student.

Algorithm (per step), threestudio's ProlificDreamer conventions:
    0. once: phi = LoRA (rank 4) on a copy of the teacher's UNet (or of --lora-base), plus a camera
       embedding of the flattened c2w as the UNet's class embedding (both zero at init: phi = teacher)
    1. sample B orbit cameras c; render the Gaussians x = g(theta, c); z = E(x)
    2. t ~ schedule; z_t = sqrt(abar) z + sqrt(1 - abar) eps
    3. G = w(t) (eps_pre_cfg(z_t; y_view(c), t) - eps_phi(z_t; y, t, c))   # both no_grad, s = 7.5
    4. L_phi = || phi(add_noise(sg(z), eps', t'); y, t', c or 0 w.p. 0.1) - target(eps') ||^2,
       t' ~ U{0..T-1} (the base's own parameterisation: eps, or v for a v-prediction base)
    5. one backward of inject(z, G) + L_phi; step theta (Gaussian lrs) and phi (AdamW, lr 1e-4,
       betas (0.9, 0.99)); densify / prune
``lora_steps_per_step = k`` makes k - 1 extra LoRA updates (own backward) before step 5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from studio.distill.vsd import c2w_from_cameras, check_lora_base, vsd
from studio.errors import UserError
from studio.students.lora_score import LoRAScore
from studio.runs.text_to_3d import TextTo3DConfig, TextTo3DMethod, load_teacher_cached
from studio.train.gaussian_stage import GaussianDistillStage, ScoreContext

SHAPEWORLD_LORA_BASE = "shapeworld-unet"


@dataclass
class VSDConfig(TextTo3DConfig):
    teacher: str = "shapeworld-unet"
    """VSD needs a diffusers UNet teacher (or --lora-base): the default is the trained ShapeWorld UNet; the
    UNet-less shapeworld-exact (64 px) has no LoRA base in its space unless --lora-base names one"""
    lora_rank: int = 4
    lora_lr: float = 1e-4
    lora_base: str | None = None
    """diffusers model whose UNet copy hosts the LoRA (None = the teacher's own; ProlificDreamer: sd21 for an
    sd21-base teacher); for teachers without a UNet (shapeworld-exact) the default is shapeworld-unet"""
    lora_steps_per_step: int = 1
    camera_condition: bool = True
    """condition the LoRA on the camera (flattened c2w as class embedding, dropped with p=0.1)"""
    weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
    grad_clip: float | None = None
    """element-wise clamp of G (None = off)"""


def lora_base_for(cfg: VSDConfig, teacher):
    """The model whose UNet the LoRA copies: the teacher itself, ``--lora-base``, or for UNet-less
    ShapeWorld teachers ``shapeworld-unet`` (checked to live in the teacher's space)."""
    name = cfg.lora_base
    hint = ("use --teacher shapeworld-unet (its UNet is then also the LoRA base) or --lora-base <a diffusers UNet "
            "model in the teacher's space>")
    if name is None or name == cfg.teacher:
        if getattr(teacher, "unet", None) is not None:
            return teacher, cfg.teacher
        if not cfg.teacher.lower().startswith("shapeworld"):
            raise UserError(f"VSD needs a diffusers UNet for its LoRA but teacher {cfg.teacher!r} has none; use a "
                            "diffusers teacher (--teacher sd21-base, a local folder or a Hugging Face id) or give "
                            "--lora-base <a diffusers model in the teacher's latent space>")
        name = SHAPEWORLD_LORA_BASE
    try:
        base = load_teacher_cached(name)
    except UserError as e:
        raise UserError(f"VSD's LoRA base {name!r} could not be loaded ({e}); {hint}") from None
    check_lora_base(teacher, base, teacher_name=cfg.teacher, base_name=name, hint=hint)
    return base, name


class VSDMethod(TextTo3DMethod):
    name = "vsd"
    kind = "3d"
    description = "Variational Score Distillation (ProlificDreamer): SDS against a camera-conditioned LoRA score"
    paper = "https://arxiv.org/abs/2305.16213"
    Config = VSDConfig

    #: CFG of the teacher in VSD (its registration's "vsd" value: ProlificDreamer's 7.5 for real models; for
    #: ShapeWorld the scale its samples are drawn with)
    guidance_role = "vsd"

    def stages(self, cfg: VSDConfig, teacher, stage_kwargs: dict) -> list:
        if cfg.lora_rank < 1 or cfg.lora_steps_per_step < 1 or cfg.lora_lr <= 0:
            raise UserError("--lora-rank and --lora-steps-per-step must be >= 1 and --lora-lr > 0, got "
                            f"{cfg.lora_rank}, {cfg.lora_steps_per_step}, {cfg.lora_lr}")
        base, _ = lora_base_for(cfg, teacher)
        lora = LoRAScore(base, rank=cfg.lora_rank, camera_condition=cfg.camera_condition, seed=cfg.seed)
        lora_opt = lora.make_optimizer(lr=cfg.lora_lr, betas=(0.9, 0.99))
        y = base.encode_prompt([cfg.prompt]).embeds  # view-independent prompt, the base's text encoder

        def score(ctx: ScoreContext):
            c = c2w_from_cameras(ctx.cameras) if cfg.camera_condition else None
            out = vsd(ctx.teacher, lora, ctx.latents, ctx.cond, ctx.t, guidance_scale=ctx.guidance_scale,
                      camera_c2w=c, lora_cond=y, camera=ctx.camera, weighting=cfg.weighting,
                      grad_clip=cfg.grad_clip, generator=ctx.generator)
            z = ctx.latents.detach()
            for _ in range(cfg.lora_steps_per_step - 1):  # extra LoRA updates
                extra = lora.lora_loss(z, y, c, ctx.generator)
                if bool(extra.isfinite()):
                    extra.backward()
                    lora_opt.step()
                lora_opt.zero_grad(set_to_none=True)
            lora_loss = lora.lora_loss(z, y, c, ctx.generator)
            out.loss = out.loss + lora_loss  # the loop's single backward trains theta and the LoRA
            out.logs["lora_loss"] = float(lora_loss.detach())
            return out

        return [GaussianDistillStage("vsd", cfg.stage, teacher, cfg.prompt, score, seed=cfg.seed,
                                     extra_modules={"lora": lora}, extra_optimizers={"lora": lora_opt},
                                     **stage_kwargs)]
