"""Samplers for any :class:`~studio.teachers.base.ImageTeacher` and :class:`~studio.teachers.video_base.VideoTeacher`.

One module, four samplers, all driven by the model's :class:`~studio.teachers.schedule.NoiseSchedule` (every
noise level, noising and prediction conversion goes through it) and the teacher protocol (``predict`` with CFG,
``noise`` / ``latent_shape`` for video latents ``[B,C,F,h,w]``, ``decode``):

* :func:`ddim_sample` -- deterministic DDIM (eta = 0) for images and videos, any schedule;
* :func:`flow_euler_sample` -- the flow-matching Euler ODE (optionally a marginal-preserving SDE) on the
  sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler``;
* :func:`lcm_sample` -- multistep consistency sampling exactly as diffusers' ``LCMScheduler``;
* :func:`causal_block_rollout` -- Self-Forcing's autoregressive block-by-block few-step generation.

A student (:class:`~studio.students.video_lora.VideoLoRAStudent`) satisfies the same protocol, so every
sampler takes a student wherever it takes a teacher.

Conventions shared by all samplers:

* ``prompts_or_cond``: a prompt, a list of prompts or a precomputed :class:`TextCond` (one sample per entry;
  ``negative`` is then ignored).
* Timesteps are the schedule's index convention (``[0, T-1]``, floats allowed; see
  :mod:`~studio.teachers.schedule`); ``callback(k, t)`` runs before the ``k``-th network call at timestep ``t``.
* Determinism: the initial noise is ``model.noise(B, num_frames, size, seed)`` for video models (a CPU
  generator seeded with ``seed``; image teachers: the same draw of shape ``[B,C,h,w]``); every *fresh* noise a
  sampler draws later (LCM re-noising, SDE steps, rollout re-noising) comes, in order, from the CPU generator
  :func:`noise_generator` ``(seed, 1)``, and rollout context noise from ``noise_generator(seed, 2)``. The same seed
  gives the same sample on every device.
* Output: decoded videos ``[B,F,3,H,W]`` (images ``[B,3,H,W]`` for image teachers) in [0, 1], float32, unless
  ``output="latents"`` (model space ``x0``). :func:`causal_block_rollout` returns latents by default (it is the
  generator side of DMD training).

Causal block protocol (:func:`causal_block_rollout`). A model may implement::

    forward_block(x_block, t, cond, context_frames, cache) -> x0_block

``x_block`` ``[B,C,f,h,w]`` is the noisy current block at timestep ``t`` (``[B]``, index convention);
``context_frames`` ``[B,C,F_ctx,h,w]`` all previously generated clean latent frames (detached; ``None`` for the first
block; ``F_ctx`` is also the block's start frame); ``cache`` the object the caller passed as ``kv_cache`` or that
``model.init_block_cache(batch, num_latent_frames, cond)`` returned (``None`` when neither exists). It returns the
block's ``x0`` prediction (CFG, if any, is the model's business: ``guidance_scale`` is passed as a keyword only when
it differs from 1). As in Self-Forcing, a call may write the block's keys / values into the cache at the block's
position, each call overwriting the previous one; after a block is finished the rollout calls ``forward_block``
once more under ``no_grad`` on the block's clean output re-noised to ``context_noise`` (output discarded), which
leaves the cache holding the finished block.

Models without ``forward_block`` get the generic fallback, which re-runs the whole context every call:

* ``model.frame_timesteps == True`` (its ``_forward`` accepts one timestep per latent frame, ``t`` of shape
  ``[B, F]``, as diffusion-forcing / causal Wan models do): the input is ``[context, x_block]`` along frames with
  timesteps ``[t_ctx] * F_ctx + [t] * f``; the context is the clean output of earlier blocks, re-noised *once per
  block* to ``context_noise`` (the same frames a KV cache would hold; ``context_noise = 0``: the clean frames,
  presented at timestep index 0, the smallest training noise level). CFG is applied to the raw outputs (affine
  in the prediction, so it equals epsilon-space CFG), then only the block's frames are converted to ``x0``.
* otherwise (a bidirectional model with one shared timestep, e.g. ModelScope, AnimateDiff, Wan T2V) the
  *replacement* method of video diffusion (Ho et al. 2022): at every call the context is re-noised with fresh
  noise to the block's current timestep ``t``, the concatenation runs through ``model.predict`` at ``t`` and only
  the block's frames are kept. ``context_noise`` does not apply (a shared-timestep model cannot be told that some
  frames are cleaner).

Cost of the fallback: block ``b`` (0-based) makes ``len(denoising_steps)`` calls on ``min(b * block_size, W) +
block_size`` frames (``W = context_window``, default all), i.e. O(blocks^2) frame-evaluations for a whole clip,
against O(blocks) plus one cache write per block for a KV-cache ``forward_block``. Gradients never flow
through the context (it is detached, as Self-Forcing's cache is written under ``no_grad``).
"""
from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from .base import TextCond
from .schedule import NoiseSchedule

__all__ = [
    "causal_block_rollout", "consistency_scalings", "consistency_solver_timesteps", "ddim_sample",
    "flow_euler_sample", "flow_euler_timesteps", "lcm_sample", "lcm_timesteps", "noise_generator",
    "rollout_timesteps",
    # flow SDE with log-probabilities and reward-gradient guidance (Flow-GRPO, DanceGRPO, Euphonium; spec 1.4, 4.3)
    "SDE_FORMS", "FlowSDEStep", "flow_sde_diffusion", "flow_sde_logprob", "flow_sde_rollout", "flow_sde_step",
    "guidance_active", "shared_noise_groups", "shifted_sigmas", "tilted_guidance_scale",
]

#: odd 64-bit constant (golden ratio) separating the noise streams of one seed
_STREAM_STRIDE = 0x9E3779B97F4A7C15
_DECODED = ("decoded", "video", "videos", "image", "images")


# --------------------------------------------------------------------------------------- shared helpers
def noise_generator(seed: int, stream: int = 1) -> torch.Generator:
    """The CPU generator of noise stream ``stream`` of ``seed`` (stream 0 would be the initial noise, which
    ``model.noise`` draws itself; 1: fresh sampler noise; 2: rollout context noise)."""
    return torch.Generator().manual_seed((int(seed) + int(stream) * _STREAM_STRIDE) % (2 ** 63))


def _randn(shape: Sequence[int], gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(tuple(shape), generator=gen).to(like.device, like.dtype)


def _as_cond(model, prompts_or_cond, negative) -> TextCond:
    if isinstance(prompts_or_cond, TextCond):
        return prompts_or_cond
    prompts = [prompts_or_cond] if isinstance(prompts_or_cond, str) else list(prompts_or_cond)
    return model.encode_prompt(prompts, negative)


def _is_video(model) -> bool:
    return hasattr(model, "latent_shape") and hasattr(model, "noise")


def _initial_noise(model, batch: int, seed: int, num_frames: int | None, size) -> Tensor:
    """Seeded start noise: ``model.noise`` for video models, the same CPU draw of ``[B,C,h,w]`` for images."""
    if _is_video(model):
        return model.noise(batch, num_frames, size, seed=seed)
    if num_frames is not None:
        raise UserError(f"num_frames={num_frames} was given for the image teacher {getattr(model, 'name', model)!r}; "
                        "drop num_frames or use a video teacher")
    h, w = model.latent_size(size if size is not None else model.native_resolution)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(batch, model.latent_channels, h, w, generator=gen).to(model.device, model.dtype)


def _finish(model, x: Tensor, output: str) -> Tensor:
    key = str(output).lower()
    if key == "latents":
        return x
    if key in _DECODED:
        return model.decode(x).float()
    raise UserError(f"output={output!r} is not known; use 'latents' (model space) or 'decoded' (pixels in [0, 1])")


def _t_tensor(t: float | Tensor, batch: int, device) -> Tensor:
    """``[B]`` timesteps: long for integer steps, float64 otherwise (no float32 round-off of flow timesteps)."""
    if isinstance(t, Tensor):
        t = t.item()
    if isinstance(t, int):
        return torch.full((batch,), int(t), dtype=torch.long, device=device)
    return torch.full((batch,), float(t), dtype=torch.float64, device=device)


def _sigmas64(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """``sigma(t)`` in float64 for a 1-D tensor of (float) timesteps."""
    t = torch.as_tensor(t).reshape(-1)
    return schedule.sigma(t, torch.empty(t.numel(), dtype=torch.float64))


# --------------------------------------------------------------------------------------- DDIM
@torch.no_grad()
def ddim_sample(teacher, prompts: str | Sequence[str] | TextCond, steps: int = 25, guidance_scale: float = 4.0,
                seed: int = 0, negative: str | Sequence[str] | None = None, clip_x0: bool = True,
                prior_mean: float | Tensor | None = None, callback=None, num_frames: int | None = None,
                size: int | tuple[int, int] | None = None, output: str = "decoded") -> Tensor:
    """Deterministic DDIM (eta = 0) samples from any :class:`ImageTeacher` / :class:`VideoTeacher` with CFG:
    images ``[B,3,H,W]`` or videos ``[B,F,3,H,W]`` in [0, 1] (``output="latents"``: model space).

    ``callback(k, t)``, if given, runs before the ``k``-th network call (timestep ``t``), e.g. to switch a
    feature hook on or off for some of the steps.

    Starts from seeded Gaussian noise at the native resolution (video teachers: ``teacher.noise`` with
    ``num_frames`` pixel frames, default the teacher's clip length), steps over ``steps`` evenly spaced integer
    timesteps from ``T-1`` to 0 and finally to ``x0``: ``x_prev = alpha(t_prev) x0 + sigma(t_prev) eps`` with
    ``(x0, eps)`` the guided prediction at ``(x_t, t)`` -- the DDIM update for variance-preserving schedules and,
    on a flow schedule (``alpha = 1 - sigma``), exactly the flow Euler step. ``clip_x0`` clamps the predicted
    ``x0`` to [-1, 1] (pixel-space models; ignored for latent teachers). Decodes with ``teacher.decode``.
    ``prompts`` may also be an already encoded condition (a :class:`TextCond`, e.g. from a novel-view teacher's
    ``encode_view``; ``negative`` is then ignored): one sample per entry.

    ``prior_mean``: start from ``alpha(T-1) * prior_mean + sigma(T-1) * noise`` instead of pure noise
    (model space, e.g. ``1.0`` = a white image for pixel models). SD's scaled_linear schedule keeps
    ``sqrt(abar_T) = 0.068`` of the image at ``t = T``, so a model trained on white backgrounds reads pure
    noise (mean 0) as a grey image and samples grey / tinted backgrounds; ``prior_mean=1.0`` matches
    ShapeWorld's training distribution at ``t = T``.
    """
    cond = _as_cond(teacher, prompts, negative)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sched = teacher.schedule
    T = int(sched.num_train_timesteps)
    x = _initial_noise(teacher, len(cond), seed, num_frames, size)
    if prior_mean is not None:
        prior = torch.as_tensor(prior_mean, dtype=x.dtype, device=x.device).expand_as(x)
        x = sched.add_noise(prior, x, T - 1)
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    for k, t in enumerate(ts):
        if callback is not None:
            callback(k, t)
        x0 = teacher.predict(x, t, cond, guidance_scale=guidance_scale, output="sample")
        if clip_x0 and not teacher.is_latent:
            x0 = x0.clamp(-1, 1)
        if k + 1 < len(ts):
            x0, eps = sched.to_x0_eps(x0, x, t, "sample")
            x = sched.add_noise(x0, eps, ts[k + 1]).to(x.dtype)
        else:
            x = x0.to(x.dtype)
    return _finish(teacher, x, output)


# --------------------------------------------------------------------------------------- flow Euler
def flow_euler_timesteps(schedule: NoiseSchedule, steps: int, shift: float | None = None,
                         timesteps: Sequence[float] | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(t [n], sigmas [n+1])`` (float64) of the flow Euler sampler: model timesteps in the schedule's index
    convention and the noise levels they sit at, with the terminal ``sigma = 0`` appended.

    Default (``timesteps=None``): the sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(shift).
    set_timesteps(steps)``: ``u_k = linspace(1, sigma_min, steps)`` with ``sigma_min = sigma(0)`` the smallest
    *shifted* training sigma, then shifted again, ``sigma_k = shift u_k / (1 + (shift - 1) u_k)`` (diffusers
    feeds its already shifted ``sigma_min`` through the shift a second time; reproduced for parity). ``shift``
    defaults to the schedule's; another shift is placed on the model's own timestep axis with
    :meth:`NoiseSchedule.timestep_from_sigma`. ``timesteps``: explicit descending timesteps (index convention).
    """
    if not schedule.is_flow:
        raise UserError(f"flow_euler_sample needs a flow-matching model (prediction_type='flow'), got {schedule!r}; "
                        "use ddim_sample or lcm_sample for diffusion models")
    T = schedule.num_train_timesteps
    if timesteps is not None:
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        if t.numel() < 1 or bool((t[1:] >= t[:-1]).any()):
            raise UserError(f"timesteps must be a non-empty strictly descending list, got {t.tolist()}")
        sig = _sigmas64(schedule, t)
    else:
        if int(steps) < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        ref = schedule if shift is None or float(shift) == schedule.shift else NoiseSchedule.flow(float(shift), T)
        sigma_min = float(_sigmas64(ref, torch.tensor([0]))[0])
        u = torch.linspace(1.0, sigma_min, int(steps), dtype=torch.float64)
        t_ref = u * T - 1
        sig = _sigmas64(ref, t_ref)
        t = t_ref if ref is schedule else schedule.timestep_from_sigma(sig)
    return t, torch.cat([sig, sig.new_zeros(1)])


@torch.no_grad()
def flow_euler_sample(model, prompts_or_cond: str | Sequence[str] | TextCond, steps: int = 30,
                      guidance_scale: float = 5.0, seed: int = 0, num_frames: int | None = None,
                      shift: float | None = None, timesteps: Sequence[float] | Tensor | None = None,
                      sde_noise_level: float = 0.0, negative: str | Sequence[str] | None = None,
                      size: int | tuple[int, int] | None = None, callback: Callable | None = None,
                      output: str = "decoded") -> Tensor:
    """Flow-matching Euler sampler from ``sigma = 1`` to 0 (Wan / SD3 style) with CFG.

    Rectified flow ``x_s = (1 - s) x0 + s eps`` with velocity ``v = eps - x0 = dx/ds``; each step is
    ``x <- x + (s_next - s) v(x, t)`` with ``v`` the guided prediction converted by the schedule, computed in
    float32 as diffusers' ``FlowMatchEulerDiscreteScheduler.step`` does; the sigmas are that scheduler's
    (:func:`flow_euler_timesteps`). The last step lands on ``x0_hat``.

    ``sde_noise_level`` (``a``, default 0 = the ODE): Flow-GRPO's marginal-preserving SDE
    (spec 1.4): with ``Delta = s - s_next``, diffusion ``g = a sqrt(s / (1 - s'))`` (``s' = s`` except
    ``sigmas[1]`` at ``s = 1``), score ``s_hat = -(x + (1 - s) v) / s``,
    ``x <- x - Delta v + (g^2 / 2) s_hat Delta + g sqrt(Delta) xi``. Unlike Flow-GRPO's sampler the final step
    (to ``s = 0``) stays deterministic, so the output carries no injected noise. Log-probabilities for RL are
    not computed here.
    """
    cond = _as_cond(model, prompts_or_cond, negative)
    sched = model.schedule
    ts, sig = flow_euler_timesteps(sched, steps, shift, timesteps)
    x = _initial_noise(model, len(cond), seed, num_frames, size)
    a = float(sde_noise_level or 0.0)
    if a < 0:
        raise UserError(f"sde_noise_level must be >= 0, got {sde_noise_level}")
    gen = noise_generator(seed, 1) if a > 0 else None
    B = len(cond)
    for k in range(len(ts)):
        t = float(ts[k])
        if callback is not None:
            callback(k, t)
        v = model.predict(x, _t_tensor(t, B, x.device), cond, guidance_scale=guidance_scale, output="flow")
        s, s_next = float(sig[k]), float(sig[k + 1])
        xf, vf = x.float(), v.float()
        if a > 0 and s_next > 0:
            xf = flow_sde_step(xf, vf, s, s_next, form="flow-grpo", noise_level=a,
                               sigma_max=float(sig[1]) if len(sig) > 2 else s, noise=_randn(x.shape, gen, xf)).sample
        else:
            xf = xf + (s_next - s) * vf
        x = xf.to(x.dtype)
    return _finish(model, x, output)


# --------------------------------------------------------------------------------------- flow SDE for RL
#: the two diffusion forms of spec 1.4: Flow-GRPO's ``g = a sqrt(sigma / (1 - sigma))`` and DanceGRPO's ``g = eta``
SDE_FORMS = ("flow-grpo", "dance-grpo")


class FlowSDEStep(NamedTuple):
    """One step of :func:`flow_sde_step` (all tensors shaped like ``x`` unless said otherwise)."""

    sample: Tensor
    """``x_{i+1}`` (detached when it was given as ``sample=``)."""
    mean: Tensor
    """the mean the log-probability is measured against (``mean_base`` unless ``logprob_mean="guided"``)."""
    std: float | Tensor
    """``g sqrt(Delta)`` (a float, or ``[B,1,...]`` for per-sample sigmas)."""
    log_prob: Tensor | None
    """``[B]``: ``log N(sample; mean, std^2 I)`` averaged over the non-batch elements; ``None`` when ``std = 0``."""
    mean_base: Tensor
    """the unguided SDE mean ``x - Delta v + (g^2 / 2) s_hat Delta``."""
    shift: Tensor | None
    """the guidance term added to the mean, ``c_g Delta G`` (``None`` without a reward gradient)."""


def _sde_form(form: str) -> str:
    key = str(form).lower().replace("_", "-")
    if key not in SDE_FORMS:
        raise UserError(f"SDE form {form!r} is not known; use one of {', '.join(SDE_FORMS)}")
    return key


def _per_sample(value: float | Tensor, x: Tensor) -> float | Tensor:
    """A float stays a float (the arithmetic of :func:`flow_euler_sample`); a ``[B]`` tensor becomes
    ``[B,1,...]`` in ``x``'s dtype."""
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return float(value)
        return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return float(value)


def shifted_sigmas(steps: int = 16, shift: float = 5.0) -> Tensor:
    """``[steps + 1]`` float64 noise levels ``shift(u) = shift u / (1 + (shift - 1) u)`` of ``u = linspace(1, 0,
    steps + 1)``: the grid of DanceGRPO / Euphonium (16 steps, shift 5; spec 4.3), ending at 0."""
    if int(steps) < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
    return float(shift) * u / (1.0 + (float(shift) - 1.0) * u)


def flow_sde_diffusion(sigma: float | Tensor, form: str = "dance-grpo", noise_level: float = 0.25,
                       sigma_max: float | None = None) -> float | Tensor:
    """The diffusion coefficient ``g_sigma`` of the flow SDE (spec 1.4).

    ``"dance-grpo"``: ``g = noise_level`` (eta, Euphonium uses 0.25). ``"flow-grpo"``: ``g = a sqrt(sigma / (1 -
    sigma'))`` with ``a = noise_level`` (Flow-GRPO's default 0.7) and ``sigma' = sigma`` except at ``sigma >= 1``,
    where ``sigma' = sigma_max`` (Flow-GRPO passes ``sigmas[1]``; required there). ``1 - sigma'`` is floored at
    1e-12.
    """
    form = _sde_form(form)
    a = float(noise_level)
    if a < 0:
        raise UserError(f"the SDE noise level must be >= 0, got {noise_level}")
    if form == "dance-grpo":
        return a
    at_top = bool((torch.as_tensor(sigma) >= 1.0).any())
    if at_top and sigma_max is None:
        raise UserError("the Flow-GRPO diffusion at sigma = 1 needs sigma_max (Flow-GRPO uses sigmas[1])")
    if isinstance(sigma, Tensor):
        den = torch.where(sigma >= 1.0, torch.as_tensor(float(sigma_max or 0.0), dtype=sigma.dtype), sigma)
        return a * torch.sqrt(sigma / (1.0 - den).clamp_min(1e-12))
    den = float(sigma_max) if sigma >= 1.0 else float(sigma)
    return a * math.sqrt(float(sigma) / max(1.0 - den, 1e-12))


def tilted_guidance_scale(sigma: float | Tensor, g: float | Tensor, beta: float) -> float | Tensor:
    """The reward-gradient scale under which the guided SDE samples the KL-tilted target ``p(x0) exp(R0(x0) /
    beta)`` exactly (in the limit Delta -> 0) when ``R`` is the exact soft value ``beta log E[exp(R0 / beta) |
    x_sigma]``: ``(sigma / (1 - sigma) + g^2 / 2) / beta``.

    Derivation: the tilted marginals are ``p*_sigma = p_sigma exp(R / beta) / Z``, so their score is ``s + grad R /
    beta`` and, through ``s = -(x + (1 - sigma) v) / sigma``, their velocity is ``v - sigma grad R / (beta (1 -
    sigma))``. Putting both into the SDE mean ``x - Delta v + (g^2 / 2) s Delta`` adds ``(sigma / (1 - sigma) +
    g^2 / 2) grad R Delta / beta``. Euphonium's "KL mode" ``g^2 / (2 beta)`` (``kl_beta`` of
    :func:`flow_sde_step`) keeps only the second part, i.e. it tilts the stochastic part of the drift but not the
    probability-flow part; ``tests/test_euphonium_parts.py`` measures the difference in a Gaussian world.
    ``1 - sigma`` is floored at 1e-12 (an exact value's gradient vanishes at ``sigma = 1``).
    """
    one_minus = (1.0 - sigma).clamp_min(1e-12) if isinstance(sigma, Tensor) else max(1.0 - float(sigma), 1e-12)
    return (sigma / one_minus + g * g / 2.0) / float(beta)


def flow_sde_logprob(sample: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """``[B]``: the Gaussian log-density ``log N(sample; mean, std^2 I)`` *averaged* over the non-batch elements,
    constants included (DanceGRPO / Euphonium; Flow-GRPO's "sde" mode). ``sample`` is detached, so the gradient
    reaches the policy through ``mean`` only."""
    if not isinstance(std, Tensor) and float(std) <= 0:
        raise UserError("the log-probability of a deterministic step (std = 0, e.g. eta = 0: the ODE) is undefined; "
                        "use a noise level > 0")
    std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    z = (sample.detach() - mean) / std_t
    lp = -0.5 * z * z - torch.log(std_t) - 0.5 * math.log(2 * math.pi)
    return lp.reshape(lp.shape[0], -1).mean(dim=1)


def flow_sde_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, *,
                  form: str = "dance-grpo", noise_level: float = 0.25, sigma_max: float | None = None,
                  noise: Tensor | None = None, generator: torch.Generator | None = None, sample: Tensor | None = None,
                  reward_grad: Tensor | None = None, guidance_scale: float | Tensor = 0.0, kl_beta: float | None = None,
                  normalize_grad: bool = False, scale_by_delta: bool = True,
                  logprob_mean: str = "base") -> FlowSDEStep:
    """One Euler-Maruyama step of the marginal-preserving flow SDE from ``sigma`` to ``sigma_next < sigma``, with
    its log-probability and, optionally, a reward gradient in the drift (Flow-GRPO / DanceGRPO / Euphonium;
    spec 1.4 and 4.3). A pure tensor function: the velocity ``v = v(x, sigma)`` (``eps - x0``) comes from the caller.

    With ``Delta = sigma - sigma_next``, ``g`` = :func:`flow_sde_diffusion` ``(sigma, form, noise_level,
    sigma_max)`` and the score ``s_hat = -(x + (1 - sigma) v) / sigma``::

        mean_base = x - Delta v + (g^2 / 2) s_hat Delta
        shift     = c_g * Delta * G             (G = reward_grad, or G / ||G|| with normalize_grad)
        sample    = mean_base + shift + g sqrt(Delta) xi

    ``c_g`` is ``guidance_scale``, or ``g^2 / (2 kl_beta)`` when ``kl_beta`` is given (Euphonium's KL mode, which
    the released code selects with a negative scale; see :func:`tilted_guidance_scale` for the exact tilt).
    ``scale_by_delta=False`` drops the ``Delta`` of the shift (``use_delta_t_for_gradient_scaling``); the norm of
    ``normalize_grad`` runs over the whole batch tensor, as in the released code. With ``G = 0`` (or ``None``) the
    step is Flow-GRPO's (``form="flow-grpo"``) or DanceGRPO's; with ``g = 0`` it is the Euler ODE step
    ``x - Delta v`` exactly and the log-probability is ``None``.

    Noise: ``noise`` (``xi``, shaped like ``x``), else a draw from ``generator`` (the global RNG when ``None``).
    ``sample``: score a given ``x_{i+1}`` instead of drawing one (the GRPO recompute under the current policy;
    it is detached). ``logprob_mean``: ``"base"`` (default; the released code: the guidance is the behaviour
    policy's business, the policy's likelihood uses the unguided mean) or ``"guided"``.
    Per-sample noise levels: ``sigma`` / ``sigma_next`` may be ``[B]`` tensors.
    """
    if logprob_mean not in ("base", "guided"):
        raise UserError(f"logprob_mean must be 'base' or 'guided', got {logprob_mean!r}")
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    delta = s - s_next
    if bool(torch.as_tensor(delta <= 0).any()) or bool(torch.as_tensor(s <= 0).any()):
        raise UserError(f"the flow SDE steps down in noise: need sigma > sigma_next >= 0, got {sigma}, {sigma_next}")
    g = flow_sde_diffusion(s, form, noise_level, sigma_max)
    if isinstance(g, float) and g == 0.0:
        mean_base = x - delta * v  # the ODE, exactly (no 0 * score term)
    else:
        score = -(x + (1.0 - s) * v) / s
        mean_base = x - delta * v + 0.5 * g * g * score * delta
    shift = None
    mean_guided = mean_base
    if reward_grad is not None:
        G = reward_grad.to(x.dtype)
        if normalize_grad:
            G = G / G.norm().clamp_min(torch.finfo(G.dtype).tiny)
        c = g * g / (2.0 * float(kl_beta)) if kl_beta is not None else guidance_scale
        if isinstance(c, Tensor):
            c = _per_sample(c, x)
        shift = c * (delta if scale_by_delta else 1.0) * G
        mean_guided = mean_base + shift
    std = g * math.sqrt(delta) if isinstance(g, float) and isinstance(delta, float) else g * torch.sqrt(
        torch.as_tensor(delta, dtype=x.dtype, device=x.device))
    deterministic = isinstance(std, float) and std == 0.0
    if sample is None:
        if deterministic:
            sample = mean_guided
        else:
            xi = noise if noise is not None else (
                _randn(x.shape, generator, x) if generator is not None else torch.randn_like(x))
            sample = mean_guided + std * xi
    else:
        sample = sample.detach()
    mean_lp = mean_base if logprob_mean == "base" else mean_guided
    log_prob = None if deterministic else flow_sde_logprob(sample, mean_lp, std)
    return FlowSDEStep(sample, mean_lp, std, log_prob, mean_base, shift)


def guidance_active(step: int, num_steps: int, start: int = 12, end: int = -1, interval: int = 1) -> bool:
    """Whether the process-reward guidance acts at sampler step ``step`` (0-based of ``num_steps``): ``start <=
    step <= end`` (``end`` inclusive; negative counts from the last step, -1 = the last) on every ``interval``-th
    step from ``start``. Euphonium's default (16 steps, start 12, end -1, interval 1) is steps 12..15."""
    n = int(num_steps)
    last = int(end) if int(end) >= 0 else n + int(end)
    if int(interval) < 1:
        raise UserError(f"the guidance interval must be >= 1, got {interval}")
    return int(start) <= int(step) <= last and (int(step) - int(start)) % int(interval) == 0


def shared_noise_groups(noise: Tensor, group_size: int) -> Tensor:
    """``[P * G, ...]``: each of the ``P`` initial noises ``noise [P, ...]`` repeated for the ``G = group_size``
    rollouts of its prompt, consecutively (Euphonium's ``use_same_noise``: a group differs only through the
    SDE noise and the guidance). Rows ``p * G .. p * G + G - 1`` are identical copies of ``noise[p]``."""
    if int(group_size) < 1:
        raise UserError(f"group_size must be >= 1, got {group_size}")
    return noise.repeat_interleave(int(group_size), dim=0)


def flow_sde_rollout(velocity: Callable[[Tensor, float], Tensor], x: Tensor, sigmas: Sequence[float] | Tensor, *,
                     form: str = "dance-grpo", noise_level: float = 0.25,
                     generator: torch.Generator | None = None,
                     process_reward: Callable[[Tensor, float], tuple[Tensor, Tensor]] | None = None,
                     guidance_scale: float = 0.0, kl_beta: float | None = None,
                     window: tuple[int, int, int] = (12, -1, 1), normalize_grad: bool = False, scale_by_delta: bool = True,
                     logprob_mean: str = "base") -> dict[str, Tensor]:
    """A whole rollout of :func:`flow_sde_step` on ``sigmas`` (descending, ``[N + 1]``, e.g.
    :func:`shifted_sigmas`), recording what GRPO trains on (spec 4.3, 4.5). Runs under ``no_grad`` except for
    the reward gradient.

    ``velocity(x, sigma) -> v`` is the policy (a teacher / student wrapped with its condition and CFG).
    ``process_reward(x, sigma) -> (R [B], grad R)``, if given, is queried on the steps where
    :func:`guidance_active` ``(i, N, *window)`` holds and its gradient enters the drift (``guidance_scale`` /
    ``kl_beta`` / ``normalize_grad`` / ``scale_by_delta`` as in :func:`flow_sde_step`); elsewhere ``R = 0``. The
    Flow-GRPO form uses ``sigma_max = sigmas[1]`` at ``sigma = 1``. With ``noise_level = 0`` the rollout is the
    Euler ODE and ``log_probs`` is ``None``.

    Returns ``{"latents": [B, N + 1, ...] (x_0 .. x_N), "log_probs": [B, N], "process_rewards": [B, N],
    "guided": [N] bool, "sigmas": [N + 1] float64}``.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if sig.numel() < 2 or bool((sig[1:] >= sig[:-1]).any()):
        raise UserError(f"sigmas must be a strictly descending list of at least 2 levels, got {sig.tolist()}")
    n = sig.numel() - 1
    B = x.shape[0]
    lats, lps, rews, guided = [x.detach()], [], [], []
    sigma_max = float(sig[1])
    for i in range(n):
        s, s_next = float(sig[i]), float(sig[i + 1])
        grad = None
        r = x.new_zeros(B)
        on = process_reward is not None and guidance_active(i, n, *window)
        if on:
            r, grad = process_reward(x, s)
            r, grad = r.detach().to(x.dtype).reshape(B), grad.detach()
        with torch.no_grad():
            v = velocity(x, s)
            out = flow_sde_step(x, v, s, s_next, form=form, noise_level=noise_level, sigma_max=sigma_max,
                                generator=generator, reward_grad=grad, guidance_scale=guidance_scale, kl_beta=kl_beta,
                                normalize_grad=normalize_grad, scale_by_delta=scale_by_delta,
                                logprob_mean=logprob_mean)
        x = out.sample
        lats.append(x)
        lps.append(out.log_prob)
        rews.append(r)
        guided.append(on)
    log_probs = None if any(lp is None for lp in lps) else torch.stack(lps, dim=1)
    return {"latents": torch.stack(lats, dim=1), "log_probs": log_probs, "process_rewards": torch.stack(rews, dim=1),
            "guided": torch.tensor(guided), "sigmas": sig}


# --------------------------------------------------------------------------------------- LCM
def consistency_scalings(t: Tensor | float, timestep_scaling: float = 10.0,
                         sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """LCM's boundary-condition scalings ``(c_skip, c_out)`` at timestep ``t`` (float64 tensors shaped like ``t``).

    ``c_skip = sd^2 / ((lam t)^2 + sd^2)``, ``c_out = lam t / sqrt((lam t)^2 + sd^2)`` with ``sd = sigma_data``
    (0.5) and ``lam = timestep_scaling`` (diffusers' ``LCMScheduler`` default 10; MCM's scripts use 4). The
    consistency function is ``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)``: ``f(x, 0) = x`` exactly. Shared
    by :func:`lcm_sample` and the consistency-distillation loss.
    """
    lt = torch.as_tensor(t, dtype=torch.float64) * float(timestep_scaling)
    sd2 = float(sigma_data) ** 2
    return sd2 / (lt * lt + sd2), lt / torch.sqrt(lt * lt + sd2)


def consistency_solver_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> list[int]:
    """The skipping-DDIM solver grid of latent consistency distillation, ascending:
    ``tau_i = k (i + 1) - 1`` for ``i = 0..N-1`` with ``k = T // N`` (T = 1000, N = 50: ``19, 39, ..., 999``)."""
    N = int(num_ddim_timesteps)
    if not 1 <= N <= int(num_train_timesteps):
        raise UserError(f"original_steps / num_ddim_timesteps must lie in [1, {num_train_timesteps}], got {N}")
    k = int(num_train_timesteps) // N
    return [k * (i + 1) - 1 for i in range(N)]


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> list[int]:
    """The timesteps of diffusers' ``LCMScheduler.set_timesteps(steps, original_inference_steps=original_steps)``:
    ``steps`` entries of the descending solver grid at indices ``floor(linspace(0, N, steps, endpoint=False))``
    (T = 1000, N = 50: 1 -> [999]; 2 -> [999, 499]; 4 -> [999, 759, 499, 259])."""
    grid = consistency_solver_timesteps(num_train_timesteps, original_steps)[::-1]
    n = int(steps)
    if not 1 <= n <= len(grid):
        raise UserError(f"LCM steps must lie in [1, original_steps={len(grid)}], got {steps}")
    return [grid[(i * len(grid)) // n] for i in range(n)]


@torch.no_grad()
def lcm_sample(model, prompts_or_cond: str | Sequence[str] | TextCond, steps: int = 4, seed: int = 0,
               num_frames: int | None = None, guidance_scale: float = 1.0,
               timesteps: Sequence[int] | None = None, original_steps: int = 50, *,
               timestep_scaling: float = 10.0, sigma_data: float = 0.5, negative: str | Sequence[str] | None = None,
               clip_x0: bool = False, size: int | tuple[int, int] | None = None, callback: Callable | None = None,
               output: str = "decoded") -> Tensor:
    """Multistep latent-consistency sampling, step for step as diffusers' ``LCMScheduler``.

    Timesteps: :func:`lcm_timesteps` (``steps`` of the 50-step skipping-DDIM grid; usually 1, 2, 4 or 8) or an
    explicit descending list. From seeded noise, at each timestep ``t``: ``x0_hat`` = the (guided) model's
    ``x0`` prediction (schedule conversion), ``denoised = c_skip(t) x + c_out(t) x0_hat``
    (:func:`consistency_scalings`); then, except at the last step, re-noise to the next timestep with fresh noise
    from :func:`noise_generator` ``(seed, 1)``: ``x = alpha(t_next) denoised + sigma(t_next) z``. Returns the last
    ``denoised``. ``guidance_scale`` is 1 for CFG-distilled students (MCM); ``clip_x0`` clamps ``x0_hat`` to
    [-1, 1] (diffusers' ``clip_sample``, off by default).
    """
    cond = _as_cond(model, prompts_or_cond, negative)
    sched = model.schedule
    T = int(sched.num_train_timesteps)
    if timesteps is None:
        ts = lcm_timesteps(steps, T, original_steps)
    else:
        ts = [int(t) for t in timesteps]
        if not ts or any(b >= a for a, b in itertools.pairwise(ts)) or ts[0] >= T or ts[-1] < 0:
            raise UserError(f"timesteps must be a non-empty strictly descending list in [0, {T - 1}], got {ts}")
    x = _initial_noise(model, len(cond), seed, num_frames, size)
    gen = noise_generator(seed, 1)
    denoised = x
    for k, t in enumerate(ts):
        if callback is not None:
            callback(k, t)
        x0 = model.predict(x, t, cond, guidance_scale=guidance_scale, output="sample")
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        c_skip, c_out = consistency_scalings(t, timestep_scaling, sigma_data)
        denoised = (float(c_out) * x0.float() + float(c_skip) * x.float()).to(x.dtype)
        if k + 1 < len(ts):
            x = sched.add_noise(denoised, _randn(x.shape, gen, x), ts[k + 1])
    return _finish(model, denoised, output)


# --------------------------------------------------------------------------------------- causal rollout
def rollout_timesteps(schedule: NoiseSchedule, denoising_steps: Sequence[int | float],
                      warp_denoising_step: bool = True) -> list[int | float]:
    """Self-Forcing's ``denoising_step_list`` (values in ``(0, T]``, e.g. ``[1000, 750, 500, 250]``) as timesteps
    in the schedule's index convention.

    With ``warp_denoising_step`` (Self-Forcing's default for Wan) a step ``k`` is looked up in the shifted
    scheduler's timestep table: its noise level is ``sigma = shift(k / T)``, which is exactly the schedule's
    integer timestep ``k - 1`` (``[1000, 750, 500, 250]`` at shift 5 -> sigmas ``[1, 0.9375, 0.8333, 0.625]``).
    Without warping a flow step ``k`` is a raw network timestep, ``sigma = k / T``, placed on the model's axis by
    :meth:`NoiseSchedule.timestep_from_sigma`. Diffusion (non-flow) models always use ``k - 1``.
    """
    T = schedule.num_train_timesteps
    out: list[int | float] = []
    for k in denoising_steps:
        k = float(k)
        if not 0 < k <= T:
            raise UserError(f"denoising steps must lie in (0, {T}] (Self-Forcing's convention, e.g. [1000, 750, 500, "
                            f"250]), got {list(denoising_steps)}")
        if schedule.is_flow and not warp_denoising_step:
            out.append(float(schedule.timestep_from_sigma(k / T)))
        else:
            out.append(int(k) - 1 if k.is_integer() else k - 1)
    if any(b >= a for a, b in itertools.pairwise(out)):
        raise UserError(f"denoising steps must be strictly descending, got {list(denoising_steps)}")
    return out


def causal_denoising_steps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``steps`` evenly spaced Self-Forcing denoising steps from ``T`` down: 4 -> ``[1000, 750, 500, 250]`` (the
    list a 4-step causal student is trained with), 2 -> ``[1000, 500]``, 1 -> ``[1000]``."""
    n, T = int(steps), int(num_train_timesteps)
    if n < 1 or n > T:
        raise UserError(f"steps must be in [1, {T}], got {steps}")
    return [round(T * (n - i) / n) for i in range(n)]


def _guided_raw(model, x: Tensor, t: Tensor, cond: TextCond, guidance_scale: float) -> Tensor:
    """Raw ``_forward`` output with CFG on the raw prediction (per-frame ``t`` ``[B, F]``)."""
    B = x.shape[0]
    cond = cond.expand(B).to(device=x.device)
    if float(guidance_scale) == 1.0:
        return model._forward(x, t, cond.embeds, None, cond.extra)
    extra = {k: torch.cat([cond.negative_extra[k], cond.extra[k]]) for k in cond.extra if k in cond.negative_extra}
    raw = model._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond.negative_embeds, cond.embeds]),
                         None, extra)
    u, c = raw[:B], raw[B:]
    return u + float(guidance_scale) * (c - u)


def _fallback_block_x0(model, xb: Tensor, t, cond: TextCond, context: Tensor | None, t_ctx, guidance_scale: float,
                       ctx_gen: torch.Generator) -> Tensor:
    """x0 of the block from a model without ``forward_block`` (see the module doc)."""
    sched = model.schedule
    B, f = xb.shape[0], xb.shape[2]
    tb = _t_tensor(t, B, xb.device)
    if context is None or context.shape[2] == 0:
        return model.predict(xb, tb, cond, guidance_scale=guidance_scale, output="sample")
    if getattr(model, "frame_timesteps", False):
        Fc = context.shape[2]
        tc = _t_tensor(t_ctx, B, xb.device)
        dt = torch.promote_types(tb.dtype, tc.dtype)
        t_frames = torch.cat([tc.to(dt)[:, None].expand(B, Fc), tb.to(dt)[:, None].expand(B, f)], dim=1)
        raw = _guided_raw(model, torch.cat([context, xb], dim=2), t_frames, cond, guidance_scale)
        return sched.convert(raw[:, :, -f:].to(xb.dtype), xb, tb, sched.prediction_type, "sample")
    ctx = sched.add_noise(context, _randn(context.shape, ctx_gen, context), tb)
    x0 = model.predict(torch.cat([ctx, xb], dim=2), tb, cond, guidance_scale=guidance_scale, output="sample")
    return x0[:, :, -f:]


def causal_block_rollout(model, cond: str | Sequence[str] | TextCond, num_frames: int | None = None,
                         block_size: int = 3, denoising_steps: Sequence[int | float] = (1000, 750, 500, 250),
                         seed: int = 0, context_noise: int = 0, kv_cache: Any = None,
                         grad_exit_step: int | Sequence[int] | str | None = None, *,
                         warp_denoising_step: bool = True, guidance_scale: float = 1.0,
                         negative: str | Sequence[str] | None = None, context_window: int | None = None,
                         noise: Tensor | None = None, size: int | tuple[int, int] | None = None,
                         callback: Callable | None = None, output: str = "latents",
                         return_trajectory: bool = False, on_block: Callable | None = None):
    """Self-Forcing autoregressive generation: latent frames in blocks of ``block_size``, each block denoised
    few-step conditioned on the frames already generated (see the module doc for the model protocol).

    ``num_frames``: *pixel* frames as everywhere else (default: the model's clip length); the latent clip of
    ``F' = model.latent_frames(num_frames)`` frames is cut into blocks of ``block_size`` latent frames (the last
    block may be shorter). Each block starts from its slice of the initial noise (``noise`` ``[B,C,F',h,w]`` if
    given, else ``model.noise(B, num_frames, size, seed)``) and runs over ``denoising_steps``
    (:func:`rollout_timesteps`; Self-Forcing's ``[1000, 750, 500, 250]`` warped through the flow shift): at each
    step predict ``x0``, then re-noise it to the next level with fresh noise, ``x = alpha x0 + sigma z``; the
    block's output is the last ``x0``. ``context_noise``: the step (same convention, 0 = clean) the finished
    frames are re-noised to before they serve as context / are written to the cache.

    ``grad_exit_step`` (spec 1.3): ``None`` runs every step under ``no_grad`` (inference). An int ``k`` (or one
    per block; ``"random"``: one index drawn from :func:`noise_generator` ``(seed, 3)``, shared by all blocks like
    ``same_step_across_blocks``) makes every block run its steps ``0..k-1`` under ``no_grad``, then step ``k``
    with grad enabled; that step's ``x0`` prediction is the block's output (later steps are skipped), so the graph
    reaches the parameters only through the exit-step calls. Context and cache writes are always detached /
    ``no_grad``. In distributed training draw the index once and broadcast it.

    Returns the clean latents ``[B,C,F',h,w]`` (``output="decoded"``: decoded videos), plus, with
    ``return_trajectory``, a list of per-call records ``{"block", "step", "t", "x_t", "x0"}`` (detached).
    ``callback(k, t)`` runs before each denoising call (``k`` = step index within the block).
    ``on_block(b, frames)`` runs once each block ``b`` is finished, with its clean latents ``[B,C,f,h,w]``
    (detached), before the next block starts: what a streaming writer consumes (frames as they come).
    """
    if not _is_video(model):
        raise UserError("causal_block_rollout needs a video model (latents [B,C,F,h,w]); got "
                        f"{type(model).__name__}")
    cond = _as_cond(model, cond, negative)
    sched = model.schedule
    B = len(cond)
    ts = rollout_timesteps(sched, denoising_steps, warp_denoising_step)
    if context_noise:
        t_ctx = rollout_timesteps(sched, [context_noise], warp_denoising_step)[0]
    else:
        t_ctx = 0
    if noise is None:
        x_all = model.noise(B, num_frames, size, seed=seed)
    else:
        x_all = noise.to(model.device, model.dtype)
        if x_all.dim() != 5 or x_all.shape[0] != B:
            raise UserError(f"noise must be [B={B},C,F,h,w] latents, got {tuple(x_all.shape)}")
    Fl = x_all.shape[2]
    bs = int(block_size)
    if bs < 1:
        raise UserError(f"block_size must be >= 1 latent frame, got {block_size}")
    blocks = [(s, min(s + bs, Fl)) for s in range(0, Fl, bs)]
    n_steps = len(ts)
    if grad_exit_step is None:
        exits = [None] * len(blocks)
    else:
        if isinstance(grad_exit_step, str):
            if grad_exit_step != "random":
                raise UserError("grad_exit_step must be an int, a list of ints, 'random' or None; got "
                                f"{grad_exit_step!r}")
            grad_exit_step = int(torch.randint(n_steps, (), generator=noise_generator(seed, 3)))
        try:  # one index (int, numpy / 0-d tensor integer) for every block, or a sequence of them
            exits = [operator.index(grad_exit_step)] * len(blocks)
        except TypeError:
            exits = list(grad_exit_step)
        if len(exits) != len(blocks) or any(not 0 <= int(e) < n_steps for e in exits):
            raise UserError(f"grad_exit_step must be one index (or one per block, {len(blocks)} blocks) in "
                            f"[0, {n_steps - 1}], got {grad_exit_step!r}")
        exits = [int(e) for e in exits]
    window = None if context_window is None else int(context_window)
    if window is not None and window < 0:
        raise UserError(f"context_window must be >= 0 latent frames (or None for all), got {context_window}")

    use_block = hasattr(model, "forward_block")
    cache = kv_cache
    if use_block and cache is None and hasattr(model, "init_block_cache"):
        cache = model.init_block_cache(B, Fl, cond)
    block_kw = {} if float(guidance_scale) == 1.0 else {"guidance_scale": float(guidance_scale)}
    gen = noise_generator(seed, 1)
    ctx_gen = noise_generator(seed, 2)
    clean: list[Tensor] = []     # finished blocks, detached (what the model is conditioned on)
    ctx_frames: list[Tensor] = []  # the same, re-noised once to context_noise (the "cache contents")
    outputs: list[Tensor] = []
    trajectory: list[dict] = []
    for b, (f0, f1) in enumerate(blocks):
        xb = x_all[:, :, f0:f1]
        context_full = torch.cat(clean, dim=2) if clean else None
        # the fallback's context: frames re-noised once to context_noise for per-frame-timestep models, the clean
        # frames (re-noised to t at every call) for shared-timestep models
        src = ctx_frames if getattr(model, "frame_timesteps", False) else clean
        ctx = torch.cat(src, dim=2) if src else None
        if ctx is not None and window is not None:
            ctx = ctx[:, :, ctx.shape[2] - min(window, ctx.shape[2]):]
        x0 = xb
        for k, t in enumerate(ts):
            is_exit = exits[b] is not None and k == exits[b]
            if callback is not None:
                callback(k, t)
            with torch.set_grad_enabled(is_exit):
                if use_block:
                    x0 = model.forward_block(xb, _t_tensor(t, B, xb.device), cond, context_full, cache, **block_kw)
                else:
                    x0 = _fallback_block_x0(model, xb, t, cond, ctx, t_ctx, guidance_scale, ctx_gen)
            if return_trajectory:
                trajectory.append({"block": b, "step": k, "t": t, "x_t": xb.detach(), "x0": x0.detach()})
            if is_exit or k + 1 == n_steps:
                break
            with torch.no_grad():
                xb = sched.add_noise(x0.detach(), _randn(xb.shape, gen, xb), ts[k + 1])
        outputs.append(x0)
        done = x0.detach()
        clean.append(done)
        if on_block is not None:
            on_block(b, done)
        with torch.no_grad():
            ctx_in = done if not context_noise else sched.add_noise(done, _randn(done.shape, ctx_gen, done), t_ctx)
            ctx_frames.append(ctx_in)
            if use_block:
                model.forward_block(ctx_in, _t_tensor(t_ctx, B, done.device), cond, context_full, cache, **block_kw)
    latents = torch.cat(outputs, dim=2)
    result = latents if str(output).lower() == "latents" else _finish(model, latents, output)
    return (result, trajectory) if return_trajectory else result
