"""Domain Score Distillation (DreamPolish, arXiv 2411.01602) as the general score-combination family.

All predictions at the same ``z_t = alpha_t z + sigma_t eps`` and ``t``, under ``no_grad``:

    G = w(t) [ lam_base (eps_y - eps) + lam_cfg (eps_y - eps_null) + lam_var (eps_y - eps_lora) ]

* ``eps_y`` / ``eps_null``: the frozen teacher on the (view-dependent) prompt and on
  ``cond.negative_embeds`` (the empty prompt or a negative prompt: the caller's choice);
* ``eps_lora``: the variational score (a :class:`~studio.students.lora_score.LoRAScore`, epsilon
  output, camera-conditioned), trained online on the renders with :meth:`LoRAScore.lora_loss`;
* ``w(t)``: ``"sds"`` = 1 - abar (default), ``"uniform"``, ``"fantasia3d"``.

Presets (exact identities, tested): ``(1, s - 1, 0)`` = SDS with CFG ``s``; ``(0, s - 1, 1)`` = VSD with
teacher CFG ``s`` and LoRA CFG 1; ``(0, lam, 0)`` = classifier score distillation (CSD). **Reconstructed**
(spec 3.4, the paper's coefficients are not public): DSD is read as *unlocking* the CFG and the
variational strengths that VSD ties together (``lam_var = 1``, ``lam_cfg = s - 1``); the default here,
``(0, 7.5 - 1, 1)``, starts at the VSD preset, and methods choose their own (constants or schedules).
With ``lam_var == 0`` the LoRA is not called; with ``lam_base == lam_cfg == 0`` the null branch is not
evaluated (only the conditional one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .inject import inject_gradient
from .sds import WEIGHTINGS
from .vsd import VSDOutput, lora_embeddings

PRESETS = {"sds": lambda s: (1.0, s - 1.0, 0.0), "vsd": lambda s: (0.0, s - 1.0, 1.0), "csd": lambda s: (0.0, s, 0.0)}


@dataclass
class DSDOutput(VSDOutput):
    pass


def dsd_preset(name: str, scale: float) -> tuple[float, float, float]:
    """``(lam_base, lam_cfg, lam_var)`` of a preset: ``sds`` / ``vsd`` (CFG ``scale``) or ``csd`` (``scale``)."""
    if name not in PRESETS:
        raise ValueError(f"DSD preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name](float(scale))


def dsd(teacher, latents: Tensor, cond, t: Tensor, *, lam_base: float = 0.0, lam_cfg: float = 6.5,
        lam_var: float = 1.0, lora_score=None, lora_cond=None, camera_c2w: Tensor | None = None,
        lora_guidance_scale: float = 1.0, weighting: str = "sds", grad_clip: float | None = None,
        noise: Tensor | None = None, camera: Tensor | None = None,
        generator: torch.Generator | None = None) -> DSDOutput:
    """DSD gradient and loss for student ``latents [B,C,h,w]`` (teacher latent space); ``d loss / d z = G``.

    ``lora_score`` (anything with ``predict_eps(x_t, t, text_embeds, camera_c2w, guidance_scale)``) is
    required when ``lam_var != 0``; ``lora_cond`` / ``camera_c2w`` as in :func:`~studio.distill.vsd.vsd`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if lam_var != 0 and lora_score is None:
        raise ValueError("lam_var != 0 needs a lora_score (the variational score)")
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    sched = teacher.schedule
    dt = latents.dtype
    with torch.no_grad():
        z_t = sched.add_noise(latents.detach(), noise, t)
        if lam_cfg != 0:
            eps_null, eps_y = teacher.predict_branches(z_t, t, cond, "epsilon", camera)
            eps_null, eps_y = eps_null.to(dt), eps_y.to(dt)
        else:
            eps_y = teacher.predict(z_t, t, cond, guidance_scale=1.0, output="epsilon", camera=camera).to(dt)
            eps_null = None
        total = torch.zeros_like(latents)
        if lam_base != 0:
            total = total + lam_base * (eps_y - noise)
        if lam_cfg != 0:
            total = total + lam_cfg * (eps_y - eps_null)
        eps_lora = None
        if lam_var != 0:
            eps_lora = lora_score.predict_eps(z_t, t, lora_embeddings(cond, lora_cond), camera_c2w,
                                              guidance_scale=lora_guidance_scale).to(dt)
            total = total + lam_var * (eps_y - eps_lora)
        w = sched.weight(t, weighting, latents).to(dt)
        grad = torch.nan_to_num(w * total, nan=0.0, posinf=0.0, neginf=0.0)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
    return DSDOutput(inject_gradient(latents, grad), grad, t, noise, eps_y, eps_lora)
