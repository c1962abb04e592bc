"""GRPO on flow-SDE rollouts (Flow-GRPO, DanceGRPO) and Euphonium's Dual-Reward GRPO, as pure tensor functions.

Spec 1.4 and 4.4. A rollout (:func:`studio.teachers.sampling.flow_sde_rollout`) stores per step ``x_i``,
``x_{i+1}``, the behaviour log-probability ``logp_i`` and the process reward ``R_i``; the outcome reward scores
the final sample. Training recomputes ``log pi_theta(x_{i+1} | x_i)`` with
:func:`studio.teachers.sampling.flow_sde_step` (``sample=x_{i+1}``, the unguided mean) and calls the losses here:

* :func:`group_advantages` -- ``(r - mean_G) / (std_G + 1e-8)`` per group of ``G`` rollouts of one prompt
  (unbiased std; Flow-GRPO's ``global_std`` option);
* :func:`process_advantages` -- the same per sampler step on ``R [B, N]`` (steps without PRM: exactly 0);
* :func:`subsample_timesteps` -- the random ``floor(fraction * n)`` training steps per sample (0.6 of 15);
* :func:`grpo_clip_loss` -- ``mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))`` with ``A`` clipped to
  ``[-5, 5]``;
* :func:`dual_reward_grpo_loss` -- ``w_O L(A^O) + w_P L(A^P)`` (modes ``both`` / ``none`` / ``only``);
* :func:`velocity_kl` -- the optional KL-to-reference term of the released code;
* :func:`guidance_distill_loss` -- the explicit distillation objective of spec 4.6 (a reconstruction).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UserError

__all__ = [
    "ADVANTAGE_MODES", "dual_reward_grpo_loss", "grpo_clip_loss", "group_advantages", "guidance_distill_loss",
    "process_advantages", "subsample_timesteps", "velocity_kl",
]

#: Euphonium's ``process_reward_advantage_mode``: outcome and process (``both``), outcome only, process only
ADVANTAGE_MODES = ("both", "none", "only")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """``[P, G, ...]`` view of ``[P * G, ...]`` rewards (consecutive rows form a group)."""
    G = int(group_size)
    if G < 2:
        raise UserError(f"GRPO needs groups of at least 2 rollouts per prompt (the std of one is undefined), got "
                        f"group_size={group_size}")
    if rewards.shape[0] % G:
        raise UserError(f"{rewards.shape[0]} rewards do not split into groups of {G}; pass group_size * prompts rows")
    return rewards.reshape(rewards.shape[0] // G, G, *rewards.shape[1:])


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8, global_std: bool = False) -> Tensor:
    """GRPO advantages of ``rewards [P * G]`` (or ``[P * G, N]``: each column on its own), rows ``p * G ..
    p * G + G - 1`` being the ``G`` rollouts of prompt ``p``: ``A = (r - mean_group) / (std_group + eps)`` with
    the unbiased std (DanceGRPO / Euphonium). ``global_std``: one std over all rewards (Flow-GRPO's option).

    Zero mean per group; sample std ``1 - O(eps)``; invariant under ``r -> a r + b`` (``a > 0``); a group of equal
    rewards gives exactly 0.
    """
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    g = _grouped(r, group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = r.std(dim=0, unbiased=True).expand_as(g[:, :1]) if global_std else g.std(dim=1, unbiased=True, keepdim=True)
    # a constant group gives exactly 0 (its float mean may differ from its entries in the last bit)
    dev = torch.where(g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True), torch.zeros_like(g), g - mean)
    return (dev / (std + eps)).reshape(r.shape)


def process_advantages(process_rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """Per-step process advantages ``A^P [B, N]`` from the PRM scores ``R [B, N]`` of a rollout batch: each step
    normalised within each group (:func:`group_advantages` per column). Steps where the PRM was inactive hold
    ``R = 0`` for every sample and get ``A^P = 0`` exactly."""
    if process_rewards.dim() != 2:
        raise UserError(f"process rewards must be [B, steps], got {tuple(process_rewards.shape)}")
    return group_advantages(process_rewards, group_size, eps)


def subsample_timesteps(batch: int, num_steps: int, fraction: float = 0.6, generator: torch.Generator | None = None,
                        drop_last: bool = True) -> Tensor:
    """``[batch, k]`` long: each sample's training steps, a random permutation's first ``k = floor(fraction * n)``
    of the ``n`` transitions (``drop_last``: the final sampler step is not trained, DanceGRPO's convention, so
    ``n = num_steps - 1``; 16 steps at 0.6 -> 9 of 15). At least one step is kept."""
    n = int(num_steps) - (1 if drop_last else 0)
    if n < 1 or not 0 < float(fraction) <= 1:
        raise UserError(f"need at least one trainable step and 0 < fraction <= 1; got num_steps={num_steps}, "
                        f"fraction={fraction}")
    k = max(1, int(math.floor(float(fraction) * n + 1e-9)))
    return torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(int(batch))])


def grpo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
                   adv_clip_max: float = 5.0, normalizer: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO surrogate ``mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))) / normalizer``.

    ``rho = exp(log_prob - old_log_prob)`` per (sample, step) (any matching shapes; ``advantages`` broadcasts, e.g.
    ``[B, 1]`` outcome advantages against ``[B, k]`` steps); ``A`` is clipped to ``[-adv_clip_max,
    adv_clip_max]``; ``eps = clip_range`` (1e-4 in Flow-GRPO and Euphonium). ``normalizer``: the released code's
    ``accum * k``. At ``theta = theta_old`` ``rho = 1`` and the loss is ``-mean(A) / normalizer``; once ``rho``
    leaves ``[1 - eps, 1 + eps]`` in the direction ``A`` favours, the clipped branch wins and the gradient is 0.

    Returns ``(loss, {"ratio", "clipfrac", "approx_kl"})`` (the stats detached).
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.detach().clamp(-float(adv_clip_max), float(adv_clip_max))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - float(clip_range), 1.0 + float(clip_range))
    loss = torch.maximum(unclipped, clipped).mean() / float(normalizer)
    with torch.no_grad():
        info = {"ratio": ratio.detach(), "clipfrac": ((ratio - 1.0).abs() > float(clip_range)).float().mean(),
                "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean()}
    return loss, info


def dual_reward_grpo_loss(log_prob: Tensor, old_log_prob: Tensor, outcome_advantages: Tensor,
                          process_advantages: Tensor | None = None, mode: str = "both", outcome_weight: float = 1.0,
                          process_weight: float = 1.0, clip_range: float = 1e-4, adv_clip_max: float = 5.0,
                          normalizer: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Euphonium's Dual-Reward GRPO loss on the trained (sample, step) pairs (spec 4.4).

    ``log_prob`` / ``old_log_prob`` ``[B, k]``; ``outcome_advantages`` ``[B]`` (the same for every step of a
    sample); ``process_advantages`` ``[B, k]`` (already gathered at the trained steps). ``mode``: ``"both"`` ->
    ``w_O L(A^O) + w_P L(A^P)``; ``"none"`` -> outcome only (DanceGRPO / Flow-GRPO); ``"only"`` -> process only.
    Each ``L`` is :func:`grpo_clip_loss`. Returns ``(loss, {"outcome_loss", "process_loss", "ratio"})``.
    """
    if mode not in ADVANTAGE_MODES:
        raise UserError(f"advantage mode {mode!r} is not known; use one of {', '.join(ADVANTAGE_MODES)}")
    kw = dict(clip_range=clip_range, adv_clip_max=adv_clip_max, normalizer=normalizer)
    a_o = outcome_advantages.reshape(outcome_advantages.shape[0], *([1] * (log_prob.dim() - 1)))
    zero = log_prob.new_zeros(())
    l_o, info = grpo_clip_loss(log_prob, old_log_prob, a_o, **kw) if mode != "only" else (zero, {})
    l_p = zero
    if mode != "none":
        if process_advantages is None:
            raise UserError(f"advantage mode {mode!r} needs the process advantages")
        l_p, info_p = grpo_clip_loss(log_prob, old_log_prob, process_advantages, **kw)
        info = info or info_p
    loss = float(outcome_weight) * l_o + float(process_weight) * l_p
    return loss, {"outcome_loss": l_o.detach(), "process_loss": l_p.detach(), "ratio": info["ratio"]}


def velocity_kl(v: Tensor, v_ref: Tensor, sigma: float | Tensor, delta: float | Tensor, eta: float) -> Tensor:
    """``[B]``: the released code's optional KL-to-reference term ``||v - v_ref||^2 Delta / (2 eta^2 sigma^2)``
    (mean over the non-batch elements; multiply by ``kl_coef``, which the script sets to beta; off by default).
    ``v_ref`` is detached. (The exact KL of the two SDE steps would be ``||mu - mu_ref||^2 / (2 g^2 Delta)`` with
    ``mu - mu_ref = -Delta (1 + g^2 (1 - sigma) / (2 sigma)) (v - v_ref)``; the code's form is kept.)"""
    d = (v - v_ref.detach()) ** 2
    s = torch.as_tensor(sigma, dtype=v.dtype, device=v.device).reshape(-1)
    dt = torch.as_tensor(delta, dtype=v.dtype, device=v.device).reshape(-1)
    return d.reshape(d.shape[0], -1).mean(dim=1) * dt / (2.0 * float(eta) ** 2 * s * s)


def guidance_distill_loss(v: Tensor, v_old: Tensor, reward_grad: Tensor, guidance_scale: float,
                          weight: Tensor | float | None = None, sigma: float | Tensor | None = None,
                          noise_level: float | None = None) -> Tensor:
    """The explicit distillation objective of spec 4.6, ``mean_i w_i ||v_theta(x_i) - sg(v_old(x_i) - c_g grad
    R(x_i))||^2`` (mean over the elements, then over the batch): ``[B]`` per-sample values are averaged.

    **A reconstruction, not the released code.** The Euphonium release has no distillation loss (spec 4.6, 4.9):
    the guidance is internalised *implicitly* -- the PRM drift only shapes the rollouts while both the stored and
    the recomputed log-probabilities use the unguided mean, so GRPO raises the plain network's likelihood of
    transitions produced with guidance (``flow_sde_step(..., logprob_mean="base")`` +
    :func:`dual_reward_grpo_loss`: the implicit route). The paper's abstract speaks of a distillation objective
    that internalises the guidance; its body was not available. This explicit form follows from the velocity
    equivalence: adding ``c_g Delta G`` to the SDE mean equals sampling with ``v' = v - c_g G / (1 + g^2 (1 -
    sigma) / (2 sigma))``, ``~ v - c_g G`` for small ``g``, so regressing the plain network onto that target
    makes the unguided sampler follow the guided drift. Give ``sigma`` and ``noise_level`` (DanceGRPO's constant
    ``eta``) to use the exact denominator instead of the small-``g`` form. The per-step ``weight`` (``[B]`` or a
    float) is left to the caller: the paper's weighting is unknown.
    """
    G = reward_grad.detach().to(v.dtype)
    c = torch.as_tensor(float(guidance_scale), dtype=v.dtype, device=v.device)
    if sigma is not None and noise_level is not None:
        s = torch.as_tensor(sigma, dtype=v.dtype, device=v.device)
        s = s.reshape(-1, *([1] * (v.dim() - 1))) if s.numel() > 1 else s
        c = c / (1.0 + float(noise_level) ** 2 * (1.0 - s) / (2.0 * s))
    target = (v_old.detach().to(v.dtype) - c * G).detach()
    per = ((v - target) ** 2).reshape(v.shape[0], -1).mean(dim=1)
    if weight is not None:
        per = per * torch.as_tensor(weight, dtype=v.dtype, device=v.device)
    return per.mean()
