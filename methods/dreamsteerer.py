"""DreamSteerer (Yu, Yang, Zhang, NeurIPS 2024, arXiv 2410.11208): personalised image editing with Editability
Driven Score Distillation. No public code exists; this is the clean-room reconstruction of
``../shared/specs/dreamsteerer.md`` and every reconstructed choice is named below ([R] reconstruction, [S] studio
default, both config knobs).

Algorithm (spec 8.1), per source image ``x_src`` with source prompt ``y_src`` and subject noun:

    0. personalise (once per concept): Textual Inversion, DreamBooth-LoRA or Custom Diffusion on 3-8 reference
       images with the instance prompt "a <token> <noun>" (:func:`studio.train.personalize.personalize`), or load a
       saved personalisation; the pretrained model is the same teacher with its adapters off / K-V swapped back
    1. steer (``--steer``): z_src = encode(x_src); M = DDS-SM mask from the pretrained model's cross-attention on
       the subject token (:func:`studio.distill.dds.attention_subject_mask`); K spatial-feature-guided samples of
       the personalised model (DDIM with self-attention query/key matching to the source's DDIM inversion, spec
       7.2 variant A); then N_steer steps of EDSD (J = -I) + lambda_MS * DreamBooth loss on the guided samples,
       on a fresh steering LoRA (:class:`studio.train.edit_stages.SteerStage`)
    2. edit: DDS-SM with the steered model in the target branch and the pretrained model in the source branch,
       DDS's SGD (lr 0.1, loss x 2000 / (h w)) from z_src (:class:`studio.train.edit_stages.DDSEditStage`);
       decode

Presets (``--preset``): ``ti`` / ``db`` / ``cd`` (the baseline's personalised DDS-SM edit, no steering),
``ti-steered`` / ``db-steered`` / ``cd-steered`` (DreamSteerer on that baseline; ``dreamsteerer`` = ``db-steered``),
``no-mode-shift`` (DreamBooth, EDSD without the mode-shifting regulariser: the mode-trapping ablation).

Reconstructed choices: steering trains a new rank-4 LoRA for every baseline [S, spec 5.1]; EDSD evaluates the
personalised prediction at the refreshed edited latent with CFG 7.5 inside [R, spec 5.3]; the "slightly edited"
latent co-evolves with one DDS-SM step per steering step [R, spec 8.1 refresh_edit]; the mask is static,
computed once from 3 timesteps [S]; guided samples start from the source noised to the first DDIM timestep [S],
rho 2, tau 0.6 [S]; the mode-shift loss is conditional-only with t in [0, 1000) [R]; the target prompt inserts the
token before the subject noun [S]. On ``shapeworld-unet`` the learning rates and step counts are raised /
shortened for a CPU budget (:data:`TINY_DEFAULTS`); elsewhere the spec's values apply.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from studio.distill.dds import attention_subject_mask, token_indices
from studio.distill.edsd import (SelfAttentionFeatures, ddim_timesteps, feature_guided_ddim,
                                 source_feature_trajectory)
from studio.errors import UserError
from studio.runs.image_edit import EditJob, ImageEditConfig, ImageEditMethod, default_target_prompt
from studio.runs.skeleton import train_stages
from studio.train.edit_stages import (STEER_ADAPTER, DDSEditStage, GaussianDDSEditStage, SteerStage,
                                      lift_mask_to_gaussians)
from studio.train.personalize import (PersonalizeConfig, load_personalization, personalize,
                                      save_dreambooth_lora)

BASELINES = ("textual-inversion", "dreambooth-lora", "custom-diffusion")
_SHORT = {"ti": "textual-inversion", "db": "dreambooth-lora", "cd": "custom-diffusion"}
#: preset -> (baseline, steer, mode_shift)
PRESETS = {
    **{k: (v, False, False) for k, v in _SHORT.items()},
    **{f"{k}-steered": (v, True, True) for k, v in _SHORT.items()},
    "dreamsteerer": ("dreambooth-lora", True, True),
    "no-mode-shift": ("dreambooth-lora", True, False),
}
#: spec values (SD 1.x) and the CPU settings used on the tiny ShapeWorld teacher [S]
PAPER_DEFAULTS = {"personalize_steps": 400, "steer_steps": 200, "steer_lr": 1e-4, "edit_steps": 200}
TINY_DEFAULTS = {"personalize_steps": 150, "steer_steps": 40, "steer_lr": 1e-3, "edit_steps": 100,
                 "personalize_lr": {"textual-inversion": 2e-2, "dreambooth-lora": 1e-3, "custom-diffusion": 2e-4}}


@dataclass
class DreamSteererConfig(ImageEditConfig):
    preset: str = ""
    """ti | db | cd (baseline only) | ti-steered | db-steered | cd-steered | dreamsteerer | no-mode-shift; sets
    baseline / steer / mode_shift (empty: use those fields as given)"""
    baseline: Literal["textual-inversion", "dreambooth-lora", "custom-diffusion"] = "dreambooth-lora"
    """personalisation method when the concept is reference images (a saved personalisation brings its own)"""
    steer: bool = True
    """Stage 1 (EDSD steering); off = the baseline's personalised DDS-SM edit"""
    mode_shift: bool = True
    """the mode-shifting regulariser on spatial-feature-guided samples (off: the mode-trapping ablation)"""
    mask: bool = True
    """DDS-SM: restrict the edit to the automatic subject mask (off: DDS-S)"""
    source_correction: bool = True
    """DDS-S: the source branch uses the pretrained model (off: naive personalised DDS)"""
    personalize_steps: int | None = None
    """None: 400 (spec), 150 on shapeworld-unet"""
    personalize_lr: float | None = None
    """None: the baseline's diffusers default (TI 5e-4, DB 1e-4, CD 1e-5); raised on shapeworld-unet"""
    steer_steps: int | None = None
    """None: 200 [S], 40 on shapeworld-unet"""
    steer_lr: float | None = None
    """AdamW lr of the steering LoRA; None: 1e-4 [S], 1e-3 on shapeworld-unet"""
    steer_rank: int = 4
    lambda_ms: float = 1.0
    guided_samples: int = 4
    guided_steps: int = 10
    """DDIM steps of the spatial-feature-guided samples (spec: 50)"""
    guidance_rho: float = 2.0
    guidance_tau: float = 0.6
    edit_steps: int | None = None
    """DDS iterations; None: 200 (DDS official), 100 on shapeworld-unet"""
    edit_lr: float = 0.1
    guidance_scale: float = 7.5
    mask_threshold: float = 0.4
    mask_dilate: int | None = None
    """latent pixels of mask dilation; None: 1 (latent teachers), 0 (pixel-space shapeworld-unet)"""
    edit3d_steps: int = 150
    """3D sources (model.ply): multi-view DDS iterations on the Gaussians' colours"""
    edit3d_lr: float = 0.02
    """3D sources: Adam lr on the SH colour coefficients [S]"""
    edit3d_params: str = "sh0"
    """3D sources: the Gaussian parameters edited, comma-separated (sh0 = base colour; sh0,shN adds view-dependent
    colour); positions,
    scales, rotations and opacities never change"""


def _params3d(spec: str) -> tuple[str, ...]:
    ps = tuple(p.strip() for p in str(spec).split(",") if p.strip())
    bad = [p for p in ps if p not in ("sh0", "shN")]
    if not ps or bad:
        raise UserError(f"--edit3d-params {spec!r}: give sh0 or sh0,shN (only colours are edited; positions, "
                        "scales, rotations and opacities stay)")
    return ps


def _tiny(teacher_name: str) -> bool:
    return str(teacher_name) == "shapeworld-unet"


def _decoder_layers(unet) -> tuple[str, ...]:
    """Spec 7.2's layers (``up_blocks.1``, ``up_blocks.2``) when the UNet has self-attention there, else every
    decoder self-attention layer [S]."""
    names = [n for n in unet.attn_processors if ".attn1." in n]
    want = ("up_blocks.1", "up_blocks.2")
    return want if any(n.startswith(want) for n in names) else ("up_blocks",)


def guided_samples(teacher, source_teacher, z_src, cond, source_cond, *, k: int, steps: int, rho: float,
                   tau: float, guidance_scale: float, seed: int) -> torch.Tensor:
    """K spatial-feature-guided samples ``[K,C,h,w]`` of the (initial) personalised model (spec 7.2 variant A):
    source features along the pretrained model's DDIM inversion of ``z_src``, guided DDIM from the source noised
    to the first timestep with seeded noise [S]."""
    ts = ddim_timesteps(teacher.schedule, int(steps))
    out = []
    with SelfAttentionFeatures(teacher.unet, layers=_decoder_layers(teacher.unet)) as feats:
        src = source_feature_trajectory(source_teacher, z_src, source_cond, ts, feats)
        for j in range(int(k)):
            g = torch.Generator().manual_seed(int(seed) * 1000 + j)
            noise = torch.randn(z_src.shape, generator=g, dtype=z_src.dtype)
            t0 = torch.full((z_src.shape[0],), ts[0], dtype=torch.long)
            x_T = teacher.schedule.add_noise(z_src, noise, t0)
            out.append(feature_guided_ddim(teacher, x_T, cond, ts, guidance_scale=guidance_scale, rho=rho, tau=tau,
                                           features=feats, source_features=src))
    return torch.cat(out)


class DreamSteererMethod(ImageEditMethod):
    name = "dreamsteerer"
    description = ("DreamSteerer: personalised editing of a source image (TI / DreamBooth / Custom Diffusion "
                   "concept) with EDSD steering, mode shifting and masked DDS")
    paper = "https://arxiv.org/abs/2410.11208"
    Config = DreamSteererConfig
    default_for_verb = True

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.preset and cfg.preset not in PRESETS:
            raise UserError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
        for f in ("guided_samples", "guided_steps", "steer_rank"):
            if int(getattr(cfg, f)) < 1:
                raise UserError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(cfg, f)}")
        _params3d(cfg.edit3d_params)
        if int(cfg.edit3d_steps) < 1:
            raise UserError(f"--edit3d-steps must be >= 1, got {cfg.edit3d_steps}")
        for f in ("personalize_steps", "steer_steps", "edit_steps"):
            v = getattr(cfg, f)
            if v is not None and int(v) < (0 if f == "steer_steps" else 1):
                raise UserError(f"--{f.replace('_', '-')} must be positive, got {v}")

    def resolve(self, cfg):
        kw = {}
        if cfg.preset:
            b, s, ms = PRESETS[cfg.preset]
            kw.update(baseline=b, steer=s, mode_shift=ms)
        base = TINY_DEFAULTS if _tiny(cfg.teacher) else PAPER_DEFAULTS
        for f in ("personalize_steps", "steer_steps", "steer_lr", "edit_steps"):
            if getattr(cfg, f) is None:
                kw[f] = base[f]
        if cfg.mask_dilate is None:
            kw["mask_dilate"] = 0 if _tiny(cfg.teacher) else 1
        if cfg.personalize_lr is None and _tiny(cfg.teacher):
            kw["personalize_lr"] = TINY_DEFAULTS["personalize_lr"][kw.get("baseline", cfg.baseline)]
        return dataclasses.replace(cfg, **kw)

    def _stage01(self, cfg, job: EditJob) -> dict:
        """Stages 0 and 1, shared by the 2D edit and the 3D edit: personalise (or load), the DDS-SM mask of
        ``job.source`` and the steering stage (not yet run: it goes first in the one ``train_stages`` call)."""
        teacher, run_dir = job.teacher, job.run_dir
        if job.personalization_dir is not None:
            pz = load_personalization(teacher, job.personalization_dir)
        else:
            pcfg = PersonalizeConfig(method=cfg.baseline, steps=int(cfg.personalize_steps), lr=cfg.personalize_lr,
                                     seed=cfg.seed)
            prompt = f"a {pcfg.resolved_token()} {job.subject}"
            pz = personalize(teacher, job.references, prompt, pcfg, out=run_dir / "personalization",
                             resume=job.resume, progress=job.progress)
        target_prompt = default_target_prompt(job.source_prompt, job.subject, pz.token, job.target_prompt)
        src_view = pz.source_teacher()
        with torch.no_grad():
            z_src = teacher.encode(job.source.to(torch.float32))
        y, ys = teacher.encode_prompt(target_prompt), teacher.encode_prompt(job.source_prompt)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        tokens = token_indices(teacher.tokenizer, job.source_prompt, job.subject)
        mask, _ = attention_subject_mask(src_view, z_src, ys, tokens, guidance_scale=cfg.guidance_scale,
                                         threshold=cfg.mask_threshold, dilate=cfg.mask_dilate, generator=gen)
        steer = None
        if cfg.steer and int(cfg.steer_steps) > 0:
            guided = None
            if cfg.mode_shift and cfg.lambda_ms > 0:
                guided = guided_samples(teacher, src_view, z_src, y, ys, k=cfg.guided_samples, steps=cfg.guided_steps,
                                        rho=cfg.guidance_rho, tau=cfg.guidance_tau, guidance_scale=cfg.guidance_scale,
                                        seed=cfg.seed)
            steer = SteerStage(teacher, src_view, z_src, y, ys, steps=int(cfg.steer_steps), lr=float(cfg.steer_lr),
                               rank=cfg.steer_rank, lambda_ms=cfg.lambda_ms, guided=guided,
                               guidance_scale=cfg.guidance_scale, mask=mask if cfg.mask else None, seed=cfg.seed)
        return {"pz": pz, "target_prompt": target_prompt, "src_view": src_view, "z_src": z_src, "y": y, "ys": ys,
                "tokens": tokens, "mask": mask, "steer": steer}

    def _finish_steer(self, cfg, job: EditJob, ctx: dict, history: list, secs: float) -> dict:
        pz, steer = ctx["pz"], ctx["steer"]
        out = {"personalization": pz.method, "token": pz.token, "target_prompt": ctx["target_prompt"],
               "steered": steer is not None, "mode_shift": bool(steer is not None and steer.lambda_ms > 0),
               "train_seconds": round(secs, 3), "personalize_seconds": pz.summary.get("seconds")}
        if steer is not None:
            steer.finish()
            save_dreambooth_lora(job.teacher, job.run_dir / "steered", STEER_ADAPTER)
            rs = [r.get("edsd_residual_rms") for r in history if r.get("stage") == "steer" and "edsd_residual_rms" in r]
            if rs:
                out["edsd_residual_first"], out["edsd_residual_last"] = float(rs[0]), float(rs[-1])
        return out

    def edit(self, cfg, job: EditJob) -> dict:
        cfg = self.resolve(cfg)
        teacher, run_dir = job.teacher, job.run_dir
        ctx = self._stage01(cfg, job)
        z_src, mask = ctx["z_src"], ctx["mask"]
        stages = [ctx["steer"]] if ctx["steer"] is not None else []
        edit = DDSEditStage(teacher, z_src, ctx["y"], ctx["ys"],
                            source_teacher=ctx["src_view"] if cfg.source_correction else None,
                            mask=mask if cfg.mask else None, steps=int(cfg.edit_steps), lr=cfg.edit_lr,
                            guidance_scale=cfg.guidance_scale, seed=cfg.seed)
        stages.append(edit)
        history, secs = train_stages(stages, run_dir, seed=cfg.seed, callbacks=job.callbacks, resume=job.resume,
                                     progress=job.progress, checkpoint_every=0, preview_every=0,
                                     log_every=max(1, int(cfg.edit_steps) // 10))
        out = self._finish_steer(cfg, job, ctx, history, secs)
        with torch.no_grad():
            edited = teacher.decode(edit.latents().to(z_src.dtype))
        out.update(edited=edited, mask=mask, _pretrained=ctx["pz"].pretrained)
        return out

    def edit_3d(self, cfg, job: EditJob, model, *, sampler, mask_cameras) -> dict:
        """Issue 21 part 6 (beyond the paper): personalise and steer on ``job.source`` (a render of the asset),
        DDS-SM masks of the pretrained model on ``mask_cameras``' renders lifted to the Gaussians
        (:func:`~studio.train.edit_stages.lift_mask_to_gaussians`), then multi-view DDS-S(M) on the colours only
        (:class:`~studio.train.edit_stages.GaussianDDSEditStage`, random ``sampler`` cameras). ``model`` is
        edited in place. Returns the method's metrics plus ``mask`` (the source view's 2D mask) and
        ``gaussian_mask [N]``."""
        cfg = self.resolve(cfg)
        teacher, run_dir = job.teacher, job.run_dir
        ctx = self._stage01(cfg, job)
        gmask = None
        if cfg.mask:
            from studio.render.turntable import render_views

            g = {"means": model.means.detach(), "quats": model.quats.detach(), "scales": model.scales.detach(),
                 "opacities": model.opacities.detach(), "colors": model.colors.detach()}
            views = render_views(g, mask_cameras, sh_degree=model.active_sh_degree, backend="torch")
            masks = []
            for i in range(views.shape[0]):
                gen = torch.Generator().manual_seed(int(cfg.seed) + i)
                with torch.no_grad():
                    zi = teacher.encode(views[i:i + 1].permute(0, 3, 1, 2).contiguous())
                m, _ = attention_subject_mask(ctx["src_view"], zi, ctx["ys"], ctx["tokens"],
                                              guidance_scale=cfg.guidance_scale, threshold=cfg.mask_threshold,
                                              dilate=cfg.mask_dilate, generator=gen)
                masks.append(m.float())
            gmask = (lift_mask_to_gaussians(model, mask_cameras, torch.cat(masks)) > 0.5).float()
        stages = [ctx["steer"]] if ctx["steer"] is not None else []
        steps = int(cfg.edit3d_steps)
        edit = GaussianDDSEditStage(teacher, model, ctx["y"], ctx["ys"], sampler=sampler,
                                    source_teacher=ctx["src_view"] if cfg.source_correction else None,
                                    gaussian_mask=gmask, steps=steps, lr=cfg.edit3d_lr,
                                    guidance_scale=cfg.guidance_scale, params=_params3d(cfg.edit3d_params),
                                    seed=cfg.seed)
        stages.append(edit)
        history, secs = train_stages(stages, run_dir, seed=cfg.seed, callbacks=job.callbacks, resume=job.resume,
                                     progress=job.progress, checkpoint_every=0, preview_every=0,
                                     log_every=max(1, steps // 10))
        edit.finish()
        out = self._finish_steer(cfg, job, ctx, history, secs)
        out.update(mask=ctx["mask"], gaussian_mask=gmask, edit3d_params=list(_params3d(cfg.edit3d_params)),
                   _pretrained=ctx["pz"].pretrained)
        return out
