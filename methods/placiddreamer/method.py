"""PlacidDreamer (Huang et al., ACM MM 2024, arXiv 2407.13976): one multi-view model for initialisation,
consistency and personalisation, and Balanced Score Distillation into 3D Gaussians.

Algorithm (``../shared/specs/placiddreamer_dreampolish.md`` section 2.2):
    0. reference image of the prompt: ``--image``, else sampled from the text-to-image teacher
       ("<prompt>, front view")
    1. multi-view + geometry: the novel-view teacher (Zero123-XL, or ShapeWorld's exact image-conditioned
       teacher) generates 8 views on the Latent-Plane's camera ring, with the Latent-Plane's fine plane
       applied inside the sampling (``--enhance-views``, :mod:`.enhance`); the Latent-Plane's coarse plane turns
       them into a 64^3 density grid -> marching-cubes mesh -> surface points (paper 100k, default 20k) -> Gaussians
       (uniform scaling into the unit cube, opacity 0.1, scale from 3-NN distances)
    2. personalisation: DreamBooth-LoRA (rank 4, lr 1e-4, 400 steps, batch 2, no prior preservation) of
       the text-to-image teacher on the 8 views; the LoRA (scale 1) then serves both CFG branches
    3. 3DGS with BSD: 4 views per step, radius / FoV schedules, azimuth-interpolated view prompts,
       negative prompt, depth-as-latent with p = 0.2, flip augmentation, t_max 980 -> 500 over the first
       30% of the steps (1500 of 5000), one t per step; per view
           c = lam (eps_y - eps_neg), s = eps_neg, alpha* = clip(<s - c, s> / ||s - c||^2, 0, 1)
           dL/dz = 0.1 sqrt(abar_t) (alpha* c + (1 - alpha*) s)
       plus TV (rgb, depth) and mean-scale losses; densify / prune / opacity reset.

Steps 0-2 are :mod:`.prepare` (the Latent-Plane itself is :mod:`.latent_plane`, the DreamBooth-LoRA the
shared :mod:`studio.train.personalize`); each writes its results into the run folder (``reference.png``,
``views.png``, ``init_mesh.ply``, ``init.ply``, ``lora/``) and ``--resume`` reuses them; step 3 resumes
from the training loop's checkpoint. Iteration counts of the paper's 5000-step schedule are scaled to
``--steps``.

Deviations from the official code, on purpose (spec 2.7): ``lam`` is a real parameter (the official 3D
code ignores ``--lambda_`` and hard-codes 15); the init keeps the aspect ratio (the official per-axis
min-max normalisation stretches thin objects); offset noise is a flag, default off; alpha* has a
defined value when ``c == s``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from studio.cameras import azimuth_in_sector
from studio.distill.bsd import bsd
from studio.distill.sds import sds
from studio.errors import UserError
from studio.runs.text_to_3d import TextTo3DConfig, TextTo3DMethod, heldout_sector
from studio.train.gaussian_stage import GaussianDistillStage, GaussianStageConfig, ScoreContext

from .latent_plane.ring import RING_N
from .prepare import personalise_teacher, prepare_init, reference_image

#: the paper's run length; schedule fields of the stage config are given for it and scaled to --steps
PAPER_STEPS = 5000
NEGATIVE_PROMPT = "unrealistic, blurry, low quality."


def placid_stage() -> GaussianStageConfig:
    """Stage 3 settings of the official code (``configs/cactus.yaml`` + argument defaults), in our units:
    polar 45..105 deg = elevation -15..45, FoV-y 0.32..0.60 rad, limits 0.16..0.60 rad.

    One addition: a densification budget of 40k Gaussians. The official gradient threshold 7.5e-4 is
    calibrated for 512 px renders; at our 64 px CPU renders the same threshold grew a 20k init to 723k
    Gaussians in 125 steps, so growth is capped (highest gradients first; ``--stage.max-gaussians 0``
    removes the cap)."""
    return GaussianStageConfig(
        batch_size=4, sh_degree=0, background="white", random_background_p=0.66,
        elevation_range=(-15.0, 45.0), azimuth_range=(-180.0, 180.0),
        radius_range=(5.2, 5.5), radius_decay_every=500, radius_decay=0.95, radius_floor=(3.5, 5.0),
        fovy_range=(18.33, 34.38), fovy_scale_every=500, fovy_scale=(0.75, 1.1), fovy_limits=(9.17, 34.38),
        center_jitter=0.05, up_jitter=0.02,
        view_prompt="interpolated_left_right", negative_prompt=NEGATIVE_PROMPT, camera_conditioning=False,
        t_min=0.02, t_max=0.98, t_schedule="linear", t_max_end=0.5, t_anneal_end=1500 / PAPER_STEPS, shared_t=True,
        depth_latent_p=0.2, flip_p=0.5, tv_weight=1.0, scale_mean_weight=1.0,
        lr_means=1.6e-4, lr_sh0=5e-3, lr_opacities=0.05, lr_scales=5e-3, lr_quats=1e-3,
        densify=True, densify_start=100, densify_every=100, densify_stop_frac=3000 / PAPER_STEPS,
        densify_grad=7.5e-4, densify_scale3d=0.003, opacity_reset_every=300, max_gaussians=40_000,
    )


@dataclass
class PlacidDreamerConfig(TextTo3DConfig):
    teacher: str = "shapeworld-unet"
    """text-to-image teacher (personalised, then distilled with BSD): shapeworld-unet, sd21-base, a folder..."""
    steps: int = 500
    """3DGS iterations (the paper runs 5000 on an A100; the schedules are scaled to this)"""
    image: str | None = None
    """reference image (RGB(A), object on white); None = sampled from the text-to-image teacher"""
    novel_view_teacher: str = "shapeworld-nv-exact"
    """Zero-1-to-3 family teacher: shapeworld-nv-exact (embedded default), zero123-xl, or a folder"""
    nv_steps: int = 50
    nv_guidance: float = 2.0
    latent_plane: str = "latent-plane"
    """Latent-Plane weights: a name in assets/ or a folder. The shipped plane is trained on ShapeWorld and
    reads the 8 generated ring *images* (so it serves any novel-view teacher); the official planes hook
    Zero123's 640-channel UNet features while the views are sampled: give a folder with the official
    coarse_*.pt / fine_*.pt"""
    latent_plane_steps: int = 45
    """with a plane that hooks the novel-view UNet (the official planes): active in the first this many of
    --nv-steps denoising steps"""
    enhance_views: bool = True
    """apply the Latent-Plane's fine plane inside the novel-view sampling (the paper's "enhanced" multi-view
    images, which then train the DreamBooth-LoRA): hooked into the UNet for the official planes, on the
    predicted ring images for the shipped plane (methods/placiddreamer/enhance.py). False = plain teacher views
    (the coarse plane still gives the init mesh)"""
    enhance_every: int = 15
    """shipped (image-reading) plane: run it at every this-many-th step of its active window (the first
    --latent-plane-steps of 50, scaled to --nv-steps), counted back from the window's last step; 1 = every step
    (one pass costs ~10-50 s on a 2-core CPU)"""
    enhance_samples: int | None = 16
    """samples per ray of the enhancing pass (the shipped plane was trained with 16; None = the plane's 32)"""
    init: Literal["latent_plane", "random"] = "latent_plane"
    init_points: int = 20_000
    """surface points of the initial Gaussians (the paper: 100k; 20k keeps a CPU run in minutes)"""
    personalize: bool = True
    dreambooth_steps: int = 400
    dreambooth_rank: int = 4
    dreambooth_lr: float = 1e-4
    distillation: Literal["bsd", "sds"] = "bsd"
    """bsd (the method) or sds (the paper's baseline, same stage otherwise)"""
    bsd_form: Literal["standard", "auto"] = "standard"
    bsd_lambda: float = 15.0
    """classifier : smoothing ratio, the saturation knob (larger = more saturated)"""
    bsd_global_alpha: bool = False
    """one alpha* for the batch (the official 2D toy) instead of one per view"""
    guidance_weight: float = 0.1
    """lambda_guidance: scale of the injected BSD gradient"""
    offset_noise: float = 0.0
    """per-channel offset noise std (official 3D code: 0.1; off by default)"""
    stage: GaussianStageConfig = field(default_factory=placid_stage)


class PlacidDreamerMethod(TextTo3DMethod):
    name = "placiddreamer"
    kind = "3d"
    description = "PlacidDreamer: Latent-Plane multi-view init, DreamBooth-LoRA teacher, Balanced Score Distillation"
    paper = "https://arxiv.org/abs/2407.13976"
    Config = PlacidDreamerConfig
    #: the default --guidance-scale serves only the SDS ablation (BSD has no CFG scale: lam plays that role)
    guidance_role = "sds"

    def __init__(self) -> None:
        self.init_model = None
        self.personal_teacher = None

    # -- steps 0-2 ---------------------------------------------------------------------------------
    def prepare(self, cfg: PlacidDreamerConfig, teacher, run_dir: Path, resume: bool, progress: bool = True) -> dict:
        info: dict = {}
        # 0. the reference image of the prompt
        t0 = time.perf_counter()
        ref = reference_image(cfg, teacher, run_dir, resume)
        info["reference_seconds"] = round(time.perf_counter() - t0, 2)
        # 1. 8 ring views from the novel-view teacher -> Latent-Plane density -> mesh -> initial Gaussians
        t0 = time.perf_counter()
        self.init_model, views, init_info = prepare_init(cfg, ref, run_dir, resume, progress)
        info.update(init_info)
        info["multiview_seconds"] = round(time.perf_counter() - t0, 2)
        # 2. DreamBooth-LoRA of the text-to-image teacher on the ring views outside the held-out azimuth sector
        #    (ring view k sits at azimuth 45 k from the reference's front view: the sector's views never train it)
        t0 = time.perf_counter()
        sector = heldout_sector(cfg)
        if sector is not None and views is not None and len(views) == RING_N:
            keep = ~azimuth_in_sector(torch.arange(RING_N, dtype=torch.float32) * (360.0 / RING_N), sector)
            views = views[keep]
            info["personalise_views_dropped_in_heldout_sector"] = int((~keep).sum())
        self.personal_teacher, p_info = personalise_teacher(cfg, teacher, views, run_dir, resume, progress)
        info.update(p_info)
        info["personalise_seconds"] = round(time.perf_counter() - t0, 2)
        return info

    # -- step 3 -----------------------------------------------------------------------------------
    def stages(self, cfg: PlacidDreamerConfig, teacher, stage_kwargs: dict) -> list:
        if cfg.bsd_lambda <= 0 or cfg.guidance_weight <= 0:
            raise UserError(f"--bsd-lambda and --guidance-weight must be > 0, got {cfg.bsd_lambda}, {cfg.guidance_weight}")
        stage_cfg = scale_schedules(cfg.stage, cfg.steps)
        student_teacher = self.personal_teacher or teacher

        def score(ctx: ScoreContext):
            if cfg.distillation == "sds":
                return sds(ctx.teacher, ctx.latents, ctx.cond, ctx.t, guidance_scale=ctx.guidance_scale,
                           camera=ctx.camera, generator=ctx.generator)
            return bsd(ctx.teacher, ctx.latents, ctx.cond, ctx.t, lam=cfg.bsd_lambda, form=cfg.bsd_form,
                       per_sample=not cfg.bsd_global_alpha, offset_noise=cfg.offset_noise,
                       scale=cfg.guidance_weight, camera=ctx.camera, generator=ctx.generator)

        return [GaussianDistillStage("gaussians", stage_cfg, student_teacher, cfg.prompt, score, seed=cfg.seed,
                                     model=self.init_model, **stage_kwargs)]


def scale_schedules(stage: GaussianStageConfig, steps: int) -> GaussianStageConfig:
    """The stage's curriculum fields (given for the paper's 5000 steps) scaled to ``steps``: camera radius /
    FoV intervals and densification start / interval (at least 10 steps, so gradient statistics
    accumulate). The opacity reset interval is *not* scaled: after a reset the opacities need a fixed
    number of steps at their learning rate to recover (300 at lr 0.05 moves a logit by up to 15), so a
    short run resets at most at the paper's absolute interval."""
    f = steps / PAPER_STEPS

    def sc(n: int, floor: int = 1) -> int:
        return max(floor, int(round(n * f))) if n > 0 else 0

    return dataclasses.replace(stage, radius_decay_every=sc(stage.radius_decay_every),
                               fovy_scale_every=sc(stage.fovy_scale_every), densify_start=sc(stage.densify_start, 10),
                               densify_every=sc(stage.densify_every, 10))
