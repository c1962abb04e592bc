"""Distribution Matching Distillation (DMD / DMD2 as Self-Forcing, Reward Forcing and Stream-R1 run it).

Pure functions over tensors and score objects (spec ``video_methods.md`` section 1.2):

* :func:`dmd_timesteps` -- the shifted timestep sampler: ``t ~ U{0..999}``, ``u = t / 1000``,
  ``t <- 1000 s u / (1 + (s - 1) u)`` with ``s = shift`` (5), clamped to ``[min_t, max_t]`` = ``[20, 980]``,
  one ``t`` per sample shared by all frames. Those values are Self-Forcing's *model* timesteps, i.e.
  ``1000 * sigma`` of a flow path; :func:`dmd_timesteps` also returns the same noise levels as (float)
  timesteps on any :class:`~studio.teachers.schedule.NoiseSchedule`'s own axis
  (``schedule.timestep_from_sigma(t / 1000)`` for flow schedules, the fraction ``t / 1000`` of the axis
  for variance-preserving ones), so noising always goes through the schedule.
* :func:`normalized_dmd_gradient` -- the pure tensor core: ``g = (f_fake - f_real) / n`` with
  ``n = mean |x - f_real|`` over all non-batch dimensions, **per sample**; non-finite entries -> 0.
  Scale-free: scaling both offsets ``x - f_real`` and ``x - f_fake`` by ``c > 0`` leaves ``g`` unchanged.
* :func:`dmd_gradient` -- draws ``t`` and ``eps``, noises ``x_t = schedule.add_noise(x, eps, t)`` under
  no-grad, asks the real score (with CFG) and the fake score (conditional) for x0 predictions and returns
  the normalised ``g``. Scores are anything with ``predict(x_t, t, cond, guidance_scale=..., output=...)``
  and a ``schedule`` (the teacher protocol; ``VideoLoRAStudent`` too). CFG follows the house convention
  ``pred = u + w (c - u)``: Stream-R1's ``guidance_scale = 3`` (``c + g (c - u)``) is ``w = 4`` here,
  and its ``fake_guidance_scale = 0`` is ``w = 1`` (conditional only).
* :func:`dmd_generator_loss` -- the surrogate ``L = 0.5 mean(w_b W (x - sg(x - g))^2)`` whose gradient is
  ``dL/dx = w_b W g / N`` exactly (``N`` = elements averaged over, ``w_b`` a per-sample weight such as
  Stream-R1's ``exp(beta r)``, ``W`` an element-wise weight). The gradient is injected with the one helper
  :func:`studio.distill.inject.inject_gradient`; the returned value is the paper's logged value.
* :func:`dmd_critic_loss` -- the fake score's denoising loss on a detached generator sample: fresh ``t``
  and ``eps`` from the same sampler, ``mean((pred - target)^2)`` in the flow parameterisation by default
  (``v = eps - x0``, Self-Forcing's ``denoising_loss_type: flow``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .inject import inject_gradient

CRITIC_LOSS_TYPES = ("flow", "sample", "epsilon", "v_prediction")


@dataclass
class DMDTimesteps:
    dmd_t: Tensor     # [B] float64: Self-Forcing model timesteps (1000 * sigma) in [min_t, max_t]
    t: Tensor         # [B] float64: the same noise levels on the schedule's own timestep axis


@dataclass
class DMDOutput:
    grad: Tensor      # g, detached, shape of the latents (normalised per sample)
    t: Tensor         # [B] timesteps on the real score's schedule
    dmd_t: Tensor     # [B] Self-Forcing timesteps (1000 * sigma)
    noise: Tensor     # eps used
    x_t: Tensor       # the noised latents
    x0_real: Tensor   # CFG real-score x0 prediction
    x0_fake: Tensor   # fake-score x0 prediction


@dataclass
class CriticOutput:
    loss: Tensor      # scalar, differentiable w.r.t. the fake score's parameters
    t: Tensor
    dmd_t: Tensor
    noise: Tensor


def shift_timesteps(t: Tensor, shift: float = 5.0, num_train_timesteps: int = 1000) -> Tensor:
    """``T s u / (1 + (s - 1) u)`` with ``u = t / T``: the timestep shift of Self-Forcing's sampler."""
    T = float(num_train_timesteps)
    u = t.to(torch.float64) / T
    return T * shift * u / (1 + (shift - 1) * u)


def schedule_timesteps(dmd_t: Tensor, schedule: Any, num_train_timesteps: int = 1000) -> Tensor:
    """Self-Forcing timesteps (``1000 sigma``) -> float timesteps on ``schedule``'s own axis."""
    frac = dmd_t.to(torch.float64) / float(num_train_timesteps)
    if getattr(schedule, "is_flow", False):
        return schedule.timestep_from_sigma(frac).to(torch.float64)
    T = schedule.num_train_timesteps
    return (frac * T).clamp(0, T - 1)


def dmd_timesteps(n: int, schedule: Any = None, *, shift: float = 5.0, min_t: float = 20.0, max_t: float = 980.0,
                  num_train_timesteps: int = 1000, generator: torch.Generator | None = None) -> DMDTimesteps:
    """``n`` DMD timesteps (one per sample): uniform integers in ``[0, T)``, shifted, clamped to
    ``[min_t, max_t]``; with ``schedule`` also mapped onto its axis (else ``t`` is ``dmd_t``)."""
    if not (0 <= min_t <= max_t <= num_train_timesteps):
        raise ValueError(f"need 0 <= min_t <= max_t <= {num_train_timesteps}, got min_t={min_t}, max_t={max_t}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    raw = torch.randint(0, int(num_train_timesteps), (int(n),), generator=generator)
    dmd_t = shift_timesteps(raw, shift, num_train_timesteps).clamp(float(min_t), float(max_t))
    t = dmd_t if schedule is None else schedule_timesteps(dmd_t, schedule, num_train_timesteps)
    return DMDTimesteps(dmd_t, t)


def _sample_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def normalized_dmd_gradient(latents: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """``(f_fake - f_real) / mean|x - f_real|`` per sample (mean over every non-batch dim), detached,
    non-finite entries (a sample with ``x == f_real`` exactly) set to 0."""
    x, r, f = latents.detach(), x0_real.detach().to(latents.dtype), x0_fake.detach().to(latents.dtype)
    norm = (x - r).abs().mean(dim=_sample_dims(x), keepdim=True)
    g = (f - r) / norm
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_gradient(real: Any, fake: Any, latents: Tensor, cond: Any, *, fake_cond: Any = None,
                 guidance_scale: float = 4.0, fake_guidance_scale: float = 1.0, t: Tensor | None = None,
                 noise: Tensor | None = None, shift: float = 5.0, min_t: float = 20.0, max_t: float = 980.0,
                 generator: torch.Generator | None = None) -> DMDOutput:
    """The normalised DMD gradient ``g`` for generated latents ``x`` (``[B, ...]``).

    ``real`` / ``fake``: score objects (``predict(x_t, t, cond, guidance_scale, output)`` + ``schedule``);
    ``cond`` / ``fake_cond`` (default ``cond``) their text conditions; ``guidance_scale`` the real score's
    CFG in the house convention (4 = Stream-R1's 3), ``fake_guidance_scale`` 1 = conditional only.
    ``t`` (on the real score's schedule axis) and ``noise`` override the sampler. Everything runs under
    ``no_grad``; ``x`` is detached."""
    x = latents.detach()
    sched = real.schedule
    B = x.shape[0]
    if t is None:
        ts = dmd_timesteps(B, sched, shift=shift, min_t=min_t, max_t=max_t, generator=generator)
        t, dmd_t = ts.t, ts.dmd_t
    else:
        t = torch.as_tensor(t)
        dmd_t = t.to(torch.float64)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.no_grad():
        x_t = sched.add_noise(x, noise, t)
        x0_real = real.predict(x_t, t, cond, guidance_scale=guidance_scale, output="sample").to(x.dtype)
        x0_fake = fake.predict(x_t, t, cond if fake_cond is None else fake_cond,
                               guidance_scale=fake_guidance_scale, output="sample").to(x.dtype)
        g = normalized_dmd_gradient(x, x0_real, x0_fake)
    return DMDOutput(g, t, dmd_t, noise, x_t, x0_real, x0_fake)


def _bcast(w: Tensor, like: Tensor, what: str) -> Tensor:
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    if w.dim() == 0:
        return w
    if w.dim() == 1:
        if w.shape[0] != like.shape[0]:
            raise ValueError(f"{what} has {w.shape[0]} entries for a batch of {like.shape[0]}")
        return w.reshape((-1,) + (1,) * (like.dim() - 1))
    try:
        torch.broadcast_shapes(w.shape, like.shape)
    except RuntimeError as e:
        raise ValueError(f"{what} of shape {tuple(w.shape)} does not broadcast to the latents "
                         f"{tuple(like.shape)}") from e
    return w


def dmd_generator_loss(latents: Tensor, grad: Tensor, *, sample_weight: Tensor | float | None = None,
                       element_weight: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The DMD surrogate ``L = 0.5 mean_{masked}(w_b W (x - sg(x - g))^2)`` with
    ``dL/dx = w_b W g / N`` exactly (``N`` = number of masked-in elements, all by default).

    ``sample_weight``: scalar or ``[B]`` (e.g. ``exp(beta r)``); ``element_weight``: broadcastable to the
    latents (e.g. Stream-R1's ``W`` as ``[B,1,F,h,w]``); ``mask``: boolean, broadcastable (Self-Forcing's
    ``gradient_mask``). Weights are detached. The gradient goes through :func:`inject_gradient`; the
    value is the spec's (so ``w = 1, W = 1`` logs ``0.5 mean(g^2)``, Self-Forcing's number)."""
    if grad.shape != latents.shape:
        raise ValueError(f"grad must have the shape of the latents {tuple(latents.shape)}, got {tuple(grad.shape)}")
    g = torch.nan_to_num(grad.detach().to(latents.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    w = torch.ones((), dtype=latents.dtype, device=latents.device)
    if sample_weight is not None:
        w = w * _bcast(torch.as_tensor(sample_weight).detach(), latents, "sample_weight")
    if element_weight is not None:
        w = w * _bcast(element_weight.detach(), latents, "element_weight")
    if mask is not None:
        m = torch.as_tensor(mask, device=latents.device).to(torch.bool)
        if m.dim() == 1:
            m = m.reshape((-1,) + (1,) * (latents.dim() - 1))
        try:
            m = m.expand(latents.shape)
        except RuntimeError as e:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the latents "
                             f"{tuple(latents.shape)}") from e
    else:
        m = torch.ones(latents.shape, dtype=torch.bool, device=latents.device)
    n = int(m.sum())
    if n == 0:
        return (latents * 0).sum()
    G = torch.where(m, w * g, torch.zeros_like(g)) / n
    injected = inject_gradient(latents, G)
    value = 0.5 * torch.where(m, w * g * g, torch.zeros_like(g)).sum() / n
    return injected + (value - injected).detach()


def dmd_critic_loss(fake: Any, latents: Tensor, cond: Any, *, t: Tensor | None = None, noise: Tensor | None = None,
                    loss_type: str = "flow", guidance_scale: float = 1.0, schedule: Any = None, shift: float = 5.0,
                    min_t: float = 20.0, max_t: float = 980.0,
                    generator: torch.Generator | None = None) -> CriticOutput:
    """The fake score's denoising loss on generator samples ``latents`` (detached; no reward weighting):
    ``mean((fake(x_t) - target)^2)`` with ``x_t = schedule.add_noise(x, eps, t)``, fresh ``t`` from
    :func:`dmd_timesteps` and fresh ``eps``; the prediction and target are in ``loss_type`` (``flow``:
    ``v = eps - x0``, i.e. ``(x_t - x0_fake) / sigma``; ``sample``, ``epsilon``, ``v_prediction``), all
    conversions through the schedule (``schedule`` defaults to ``fake.schedule``)."""
    if loss_type not in CRITIC_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {CRITIC_LOSS_TYPES}, got {loss_type!r}")
    x = latents.detach()
    sched = schedule if schedule is not None else fake.schedule
    if t is None:
        ts = dmd_timesteps(x.shape[0], sched, shift=shift, min_t=min_t, max_t=max_t, generator=generator)
        t, dmd_t = ts.t, ts.dmd_t
    else:
        t = torch.as_tensor(t)
        dmd_t = t.to(torch.float64)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.no_grad():
        x_t = sched.add_noise(x, noise, t)
        target = sched.target(x, noise, t, loss_type)
    pred = fake.predict(x_t, t, cond, guidance_scale=guidance_scale, output=loss_type)
    loss = ((pred.to(target.dtype) - target) ** 2).mean()
    return CriticOutput(loss, t, dmd_t, noise)
