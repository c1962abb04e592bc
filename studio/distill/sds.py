"""Score Distillation Sampling (DreamFusion), with threestudio's options, as a pure function.

``G = w(t) * (eps_cfg(z_t; y, t) - eps)`` with ``z_t = sqrt(abar) z + sqrt(1 - abar) eps`` and the
teacher under ``no_grad``; weighting ``sds`` = 1 - abar (default), ``uniform`` = 1, ``fantasia3d`` =
sqrt(abar) (1 - abar). Non-finite entries are zeroed, then an optional element-wise clamp to
``+-grad_clip``. The loss is ``inject_gradient(z, G)``: d loss / d z = G exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .inject import inject_gradient

WEIGHTINGS = ("sds", "uniform", "fantasia3d")


@dataclass
class ScoreOutput:
    loss: Tensor  # scalar; d loss / d latents = grad
    grad: Tensor  # G, detached, shape of latents
    t: Tensor  # [B] timesteps used
    noise: Tensor  # eps used
    pred: Tensor  # teacher's (CFG) epsilon prediction


def sds(teacher, latents: Tensor, cond, t: Tensor, *, guidance_scale: float = 100.0, weighting: str = "sds",
        grad_clip: float | None = None, noise: Tensor | None = None, camera: Tensor | None = None,
        generator: torch.Generator | None = None) -> ScoreOutput:
    """SDS gradient and loss for student ``latents [B,C,h,w]`` (already in the teacher's latent space)."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    sched = teacher.schedule
    with torch.no_grad():
        z_t = sched.add_noise(latents.detach(), noise, t)
        eps = teacher.predict(z_t, t, cond, guidance_scale=guidance_scale, output="epsilon", camera=camera)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        w = sched.weight(t, weighting, latents).to(latents.dtype)
        grad = torch.nan_to_num(w * (eps.to(latents.dtype) - noise), nan=0.0, posinf=0.0, neginf=0.0)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
    return ScoreOutput(inject_gradient(latents, grad), grad, t, noise, eps)
