"""Balanced Score Distillation (PlacidDreamer, Huang et al., ACM MM 2024, arXiv 2407.13976) as a pure function.

The SDS residual splits into two directions, "classifier guidance" ``c`` and "smoothing guidance" ``s``.
BSD treats them as the gradients of two objectives and takes the MGDA min-norm (Pareto-stationary)
point of their convex hull::

    alpha* = clip(<s - c, s> / ||s - c||^2, 0, 1),        d = alpha* c + (1 - alpha*) s

``d`` is a common descent direction: ``<d, c> >= ||d||^2`` and ``<d, s> >= ||d||^2``.

Forms (spec section 2.4; reconstructed from the official code, see the notes below):

* ``standard`` (default): ``c = lam (eps_y - eps_neg)``, ``s = eps_neg`` (no ``-eps`` term),
  ``w = sqrt(abar_t)``. ``lam`` is the saturation knob (larger = more classifier push = more saturated).
  The official 3D code exposes ``--lambda_`` but ignores it and hard-codes 15; here it is a real
  parameter with default 15.
* ``auto``: ``c = eps_y - eps_neg``, ``s = k (eps_neg - eps)`` with ``k = auto_smoothing = 1.25`` (keeps
  ``-eps``), ``w = ||eps_neg - eps||_2 sqrt(1 - abar_t) / 50`` with the norm over the whole batch
  tensor (a data-dependent scalar per timestep), as ``train_step_BSD_auto``; ``lam`` multiplies ``c``
  here too (``lam = 1`` reproduces the official auto form).

``alpha*`` is computed per sample (per view, the official 3D behaviour and our default) or globally over
the batch (``per_sample=False``, the official 2D toy). ``eps_neg`` is the teacher's prediction for the
negative prompt in ``cond.negative_embeds`` (PlacidDreamer uses "unrealistic, blurry, low quality." in 3D
and the empty prompt in 2D; the caller chooses through ``cond``).

Degenerate case ``c == s`` (``||s - c|| = 0``): every alpha gives the same ``d = c = s``. The official
code divides by zero and ``nan_to_num`` silently zeroes the gradient; we define ``alpha* = 1/2`` so
``G = w c`` exactly (no NaN, no silent zero).

Offset noise (official 3D code only, probably not in the paper): ``eps = N(0, I) + offset N(0, 1)`` with
the offset per channel, shared across the batch and spatially constant. A flag, default off.

The result is injected with :func:`studio.distill.inject.inject_gradient` (``dL/dz = scale * G``;
PlacidDreamer's ``lambda_guidance = 0.1`` is the ``scale``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .inject import inject_gradient
from .sds import ScoreOutput

FORMS = ("standard", "auto")


@dataclass
class BSDOutput(ScoreOutput):
    alpha: Tensor = None  # [B] min-norm weights of the classifier direction
    logs: dict = field(default_factory=dict)


def min_norm_alpha(c: Tensor, s: Tensor, per_sample: bool = True) -> Tensor:
    """``alpha* = argmin_{a in [0,1]} ||a c + (1 - a) s||``: ``[B]`` (per sample) or ``[]`` (global).

    The degenerate case ``c == s`` returns 1/2 (any alpha is optimal; see the module doc).
    """
    if c.shape != s.shape:
        raise ValueError(f"c and s must have the same shape, got {tuple(c.shape)} and {tuple(s.shape)}")
    dims = tuple(range(1, c.dim())) if per_sample else tuple(range(c.dim()))
    c64, s64 = c.double(), s.double()
    diff = s64 - c64
    num = (diff * s64).sum(dims)
    den = (diff * diff).sum(dims)
    tiny = torch.finfo(torch.float64).tiny
    alpha = torch.where(den > tiny, num / den.clamp_min(tiny), torch.full_like(num, 0.5))
    return alpha.clamp(0.0, 1.0).to(c.dtype)


def combine(c: Tensor, s: Tensor, alpha: Tensor) -> Tensor:
    """``alpha c + (1 - alpha) s`` with ``alpha`` ``[B]`` or scalar broadcast over the sample dims."""
    a = alpha.reshape(-1, *([1] * (c.dim() - 1))) if alpha.dim() == 1 else alpha
    return a * c + (1 - a) * s


def offset_noise_like(latents: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """``N(0, I) + offset * N(0, 1)`` per channel (shared over batch and space); plain noise at ``offset=0``."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if offset:
        shape = [1, latents.shape[1]] + [1] * (latents.dim() - 2)
        noise = noise + offset * torch.randn(shape, generator=generator, dtype=latents.dtype)
    return noise.to(latents.device)


def bsd_direction(eps_y: Tensor, eps_neg: Tensor, noise: Tensor, abar: Tensor, *, lam: float = 15.0,
                  form: str = "standard", per_sample: bool = True, auto_smoothing: float = 1.25
                  ) -> tuple[Tensor, Tensor]:
    """``(G, alpha)`` from the teacher's two branches; ``abar`` is ``[B]`` (``alphas_cumprod[t]``)."""
    if form not in FORMS:
        raise ValueError(f"BSD form must be one of {FORMS}, got {form!r}")
    if not lam > 0:
        raise ValueError(f"BSD lambda must be > 0, got {lam}")
    view = (-1,) + (1,) * (eps_y.dim() - 1)
    abar = abar.to(eps_y.dtype).reshape(view)
    if form == "standard":
        c = lam * (eps_y - eps_neg)
        s = eps_neg
        w = abar.sqrt()
    else:
        c = lam * (eps_y - eps_neg)
        s = auto_smoothing * (eps_neg - noise)
        w = (eps_neg - noise).norm() * (1 - abar).sqrt() / 50.0
    alpha = min_norm_alpha(c, s, per_sample)
    return w * combine(c, s, alpha), alpha


def bsd(teacher, latents: Tensor, cond, t: Tensor, *, lam: float = 15.0, form: str = "standard",
        per_sample: bool = True, auto_smoothing: float = 1.25, offset_noise: float = 0.0, scale: float = 1.0,
        noise: Tensor | None = None, camera: Tensor | None = None,
        generator: torch.Generator | None = None) -> BSDOutput:
    """BSD gradient and loss for student ``latents [B,C,h,w]`` (teacher latent space).

    One batched teacher call gives ``eps_neg`` (``cond.negative_embeds``) and ``eps_y`` (``cond.embeds``)
    under ``no_grad``; ``d loss / d latents = scale * G``.
    """
    if noise is None:
        noise = offset_noise_like(latents, offset_noise, generator)
    sched = teacher.schedule
    with torch.no_grad():
        z_t = sched.add_noise(latents.detach(), noise, t)
        eps_neg, eps_y = teacher.predict_branches(z_t, t, cond, "epsilon", camera)
        abar = sched.alpha_cumprod(t, latents).reshape(-1)
        if abar.numel() == 1:
            abar = abar.expand(latents.shape[0])
        grad, alpha = bsd_direction(eps_y.to(latents.dtype), eps_neg.to(latents.dtype), noise, abar, lam=lam,
                                    form=form, per_sample=per_sample, auto_smoothing=auto_smoothing)
        grad = torch.nan_to_num(grad * scale, nan=0.0, posinf=0.0, neginf=0.0)
    alpha_b = alpha.expand(latents.shape[0]) if alpha.dim() == 0 else alpha
    logs = {"bsd_alpha": float(alpha_b.float().mean())}
    return BSDOutput(inject_gradient(latents, grad), grad, t, noise, eps_y, alpha=alpha_b, logs=logs)

