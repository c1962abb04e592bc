"""Stream-R1's reward weighting of the DMD surrogate, as pure functions (spec ``video_methods.md`` 3.3).

Reward axes are ordered :data:`AXES` = ``("vq", "mq", "ta")`` (visual quality, motion quality, text
alignment), scores z-normalised by the reward model (``studio.teachers.rewards``).

* **Inter-Reliability** (:func:`inter_reliability`): ``exp(beta r)`` per rollout -- computed **per sample**
  (the official code uses sample 0 for the whole batch, spec 3.7), never normalised across rollouts.
* **Base reward** (:func:`base_reward`): ``balanced`` = mean of the three axes (``BalancedOverall``), or one
  axis (``mq`` is Reward Forcing's Re-DMD).
* **Balance penalty** (:func:`balance_penalty`, state in :class:`BalanceTracker`): over a window of past
  per-axis scores split into an early and a recent half (``early = h[:n // 2]``, ``recent = h[n // 2:]``),
  ``penalty = lam * std_unbiased_d(mean(recent_d) - mean(early_d))``, 0 before ``warmup`` calls or with
  fewer than ``min_history`` = 4 entries. The tracker appends the current rollout's scores, counts the
  call, then computes the penalty (one entry and one call per rollout).
* **Intra-Perplexity** (:func:`fuse_saliency`, :func:`intra_perplexity_weights`): per-axis pixel saliency
  ``S_m >= 0`` (on the latent grid, :func:`saliency_to_latent_grid`) fused with ``softmax_m(-r_m / T)``
  (``adaptive``; ``mean``, ``max``), then ``W = w_t[f] w_s[f,h,w]`` from a temporal factor (frame means,
  min-max, strength ``k_t``, floor ``tau_min``, mean 1 over frames) and per-frame spatial factors (min-max,
  strength ``k_s``, floor ``sigma_min``, mean 1 per frame), divided by its global mean. Flat inputs give
  ones. ``temporal=False`` is the ablation: one global min-max -> strength -> floor -> mean 1.
* :func:`reward_weighted_dmd_loss` wires them onto :func:`studio.distill.dmd.dmd_generator_loss`:
  ``L = 0.5 exp(beta r_final) mean(W (x - sg(x - g))^2)``, ``dL/dx = exp(beta r_final) W g / N``.
  Rewards and saliency enter as **detached numbers** only: no gradient of the reward model reaches the
  generator. :data:`PRESETS`: ``stream-r1`` (beta 2, balanced reward, balance penalty, W), ``reward-forcing``
  (beta 2, motion-quality reward, no W, no penalty), ``dmd`` (beta 0, W = 1: plain Self-Forcing DMD).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .dmd import dmd_generator_loss

AXES: tuple[str, ...] = ("vq", "mq", "ta")
REWARD_MODES = ("balanced", "vq", "mq", "ta")
FUSIONS = ("adaptive", "mean", "max")


# ------------------------------------------------------------------------------------------ per rollout
def inter_reliability(r: Tensor, beta: float = 2.0) -> Tensor:
    """``exp(beta r)`` per sample (``r``: ``[B]``), detached; ``beta = 0`` gives exactly 1."""
    r = torch.as_tensor(r).detach()
    if beta == 0:
        return torch.ones_like(r)
    return torch.exp(beta * r)


def base_reward(rewards: Tensor, mode: str = "balanced") -> Tensor:
    """``[B,3]`` per-axis z-scores -> ``[B]``: their mean (``balanced``) or one axis (``vq``/``mq``/``ta``)."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    rewards = _axes(rewards)
    return rewards.mean(-1) if mode == "balanced" else rewards[:, AXES.index(mode)]


def _axes(rewards: Tensor) -> Tensor:
    rewards = torch.as_tensor(rewards).detach()
    if rewards.dim() == 1:
        rewards = rewards[None]
    if rewards.dim() != 2 or rewards.shape[-1] != len(AXES):
        raise ValueError(f"rewards must be [B,{len(AXES)}] ({', '.join(AXES)}), got {tuple(rewards.shape)}")
    return rewards


# ------------------------------------------------------------------------------------------ balance
def balance_penalty(history: Tensor, lam: float = 0.5, *, min_history: int = 4) -> Tensor:
    """``lam * std_unbiased(Delta)`` over axes, ``Delta_d = mean(recent half) - mean(early half)`` of the
    ``[N, D]`` history (oldest first); 0 with fewer than ``min_history`` entries."""
    h = torch.as_tensor(history, dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] < max(int(min_history), 2) or h.shape[1] < 2:
        return torch.zeros((), dtype=torch.float64)
    half = h.shape[0] // 2
    delta = h[half:].mean(0) - h[:half].mean(0)
    return lam * delta.std(unbiased=True)


@dataclass
class BalanceTracker:
    """Per-process state of the adaptive balance penalty (a deque of ``window`` per-axis scores and a
    call counter; the official code keeps it per rank, unsynchronised)."""

    window: int = 50
    warmup: int = 50
    lam: float = 0.5
    min_history: int = 4
    calls: int = 0
    history: deque = field(default_factory=deque)

    def update(self, rewards: Tensor) -> Tensor:
        """Append each rollout's ``[3]`` scores (``rewards [B,3]``, in order), count one call per rollout and
        return the ``[B]`` penalties (each after its own append)."""
        rewards = _axes(rewards).to(torch.float64)
        out = []
        for row in rewards:
            self.history.append(row.clone())
            while len(self.history) > self.window:
                self.history.popleft()
            self.calls += 1
            if self.calls >= self.warmup and len(self.history) >= self.min_history:
                out.append(balance_penalty(torch.stack(list(self.history)), self.lam, min_history=self.min_history))
            else:
                out.append(torch.zeros((), dtype=torch.float64))
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "history": [h.tolist() for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.history = deque(torch.tensor(h, dtype=torch.float64) for h in state["history"])


# ------------------------------------------------------------------------------------------ saliency
def fusion_weights(rewards: Tensor, mode: str = "adaptive", temperature: float = 1.0) -> Tensor:
    """``[B,3]`` weights of the per-axis saliencies: ``softmax(-r / T)`` (``adaptive``: the weaker axis
    weighs more), ``1/3`` each (``mean``). ``max`` has no weights (see :func:`fuse_saliency`)."""
    r = _axes(rewards).to(torch.float64)
    if mode == "mean":
        return torch.full_like(r, 1.0 / r.shape[-1])
    if mode != "adaptive":
        raise ValueError(f"fusion_weights: mode must be 'adaptive' or 'mean', got {mode!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.softmax(-r / float(temperature), dim=-1)


def fuse_saliency(saliency: Tensor, rewards: Tensor | None = None, mode: str = "adaptive",
                  temperature: float = 1.0) -> Tensor:
    """Fuse per-axis saliency ``[B,3,F,H,W]`` into ``[B,F,H,W]`` (``adaptive`` needs the raw per-axis
    z-scores ``rewards [B,3]``)."""
    if mode not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {mode!r}")
    s = saliency.detach()
    if s.dim() != 5 or s.shape[1] != len(AXES):
        raise ValueError(f"saliency must be [B,{len(AXES)},F,H,W], got {tuple(s.shape)}")
    if mode == "max":
        return s.amax(1)
    if mode == "mean":
        return s.mean(1)
    if rewards is None:
        raise ValueError("adaptive fusion needs the per-axis rewards")
    w = fusion_weights(rewards, "adaptive", temperature).to(s.dtype)
    return (w[:, :, None, None, None] * s).sum(1)


def saliency_to_latent_grid(saliency: Tensor, size: Sequence[int]) -> Tensor:
    """Trilinear resize of ``[B,M,F,H,W]`` pixel saliency onto the latent grid ``(F', h, w)`` (spec 3.7:
    the pixel -> latent frame alignment is a plain resize), clamped at 0."""
    s = saliency.detach()
    if tuple(s.shape[-3:]) == tuple(size):
        return s.clamp_min(0)
    return F.interpolate(s, size=tuple(int(v) for v in size), mode="trilinear", align_corners=False).clamp_min(0)


def _minmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    rng = hi - lo
    flat = rng <= 1e-12 * hi.abs().clamp_min(1.0)
    return torch.where(flat, torch.ones_like(x), (x - lo) / torch.where(flat, torch.ones_like(rng), rng))


def temporal_factor(saliency: Tensor, k_t: float = 1.0, tau_min: float = 0.2) -> Tensor:
    """``[B,F]``: frame means of ``S [B,F,H,W]``, min-max over frames (ones if flat),
    ``(1 - k_t) + k_t p``, floored at ``tau_min``, divided by the mean over frames."""
    p = _minmax(saliency.mean((-2, -1)), (1,))
    w = ((1 - k_t) + k_t * p).clamp_min(tau_min)
    return w / w.mean(1, keepdim=True)


def spatial_factor(saliency: Tensor, k_s: float = 1.0, sigma_min: float = 0.15) -> Tensor:
    """``[B,F,H,W]``: per frame, min-max of ``S`` (ones if flat), ``(1 - k_s) + k_s S~``, floored at
    ``sigma_min``, divided by the frame's spatial mean (mean 1 per frame)."""
    s = _minmax(saliency, (-2, -1))
    w = ((1 - k_s) + k_s * s).clamp_min(sigma_min)
    return w / w.mean((-2, -1), keepdim=True)


def intra_perplexity_weights(saliency: Tensor, *, k_t: float = 1.0, k_s: float = 1.0, tau_min: float = 0.2,
                             sigma_min: float = 0.15, temporal: bool = True) -> Tensor:
    """Stream-R1's element weights ``W [B,F,H,W]`` (mean 1 per sample, > 0) from fused saliency
    ``S [B,F,H,W] >= 0``; broadcast over channels as ``W[:, None]`` for ``[B,C,F,h,w]`` latents."""
    s = torch.as_tensor(saliency).detach()
    if s.dim() != 4:
        raise ValueError(f"saliency must be [B,F,H,W], got {tuple(s.shape)}")
    if temporal:
        W = temporal_factor(s, k_t, tau_min)[:, :, None, None] * spatial_factor(s, k_s, sigma_min)
    else:
        n = _minmax(s, (1, 2, 3))
        W = ((1 - k_s) + k_s * n).clamp_min(sigma_min)
    return W / W.mean((1, 2, 3), keepdim=True)


# ------------------------------------------------------------------------------------------ the loss
@dataclass(frozen=True)
class RewardWeighting:
    """Knobs of the reward weighting (Stream-R1's shipped values by default; see :data:`PRESETS`)."""

    beta: float = 2.0
    reward_mode: str = "balanced"
    balance: bool = True
    spatial: bool = True
    temporal: bool = True
    fusion: str = "adaptive"
    temperature: float = 1.0
    k_t: float = 1.0
    k_s: float = 1.0
    tau_min: float = 0.2
    sigma_min: float = 0.15
    balance_window: int = 50
    balance_warmup: int = 50
    balance_lambda: float = 0.5

    def tracker(self) -> BalanceTracker:
        return BalanceTracker(self.balance_window, self.balance_warmup, self.balance_lambda)


PRESETS: dict[str, RewardWeighting] = {
    "stream-r1": RewardWeighting(),
    "reward-forcing": RewardWeighting(reward_mode="mq", balance=False, spatial=False),
    "dmd": RewardWeighting(beta=0.0, balance=False, spatial=False),
}


def preset(name: str, **overrides) -> RewardWeighting:
    if name not in PRESETS:
        raise ValueError(f"unknown reward-weighting preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


@dataclass
class WeightedLoss:
    loss: Tensor                 # scalar generator loss
    sample_weight: Tensor        # [B] exp(beta r_final)
    element_weight: Tensor | None  # [B,1,F,h,w] W, or None (W = 1)
    r_final: Tensor              # [B]
    penalty: Tensor              # [B] balance penalty subtracted


def reward_weighted_dmd_loss(latents: Tensor, grad: Tensor, cfg: RewardWeighting = PRESETS["stream-r1"], *,
                             rewards: Tensor | None = None, saliency: Tensor | None = None,
                             tracker: BalanceTracker | None = None, mask: Tensor | None = None) -> WeightedLoss:
    """Stream-R1's generator loss on latents ``[B,C,F,h,w]`` with DMD gradient ``grad``.

    ``rewards``: ``[B,3]`` z-scored per-axis rewards (needed unless ``beta = 0`` and no W); ``saliency``:
    ``[B,3,F',H',W']`` per-axis saliency (resized to the latent grid; needed when ``cfg.spatial``);
    ``tracker``: the balance state (updated when ``cfg.balance``). Both are used as numbers only."""
    B = latents.shape[0]
    dtype = torch.float64
    penalty = torch.zeros(B, dtype=dtype)
    if cfg.beta == 0 and not cfg.spatial:
        r_final = torch.zeros(B, dtype=dtype) if rewards is None else base_reward(rewards, cfg.reward_mode).to(dtype)
        sw = torch.ones(B, dtype=dtype)
    else:
        if rewards is None:
            raise ValueError("reward weighting with beta != 0 or spatial weights needs rewards [B,3]")
        r = _axes(rewards).to(dtype)
        if r.shape[0] != B:
            raise ValueError(f"got rewards for {r.shape[0]} rollouts and a batch of {B}")
        r_final = base_reward(r, cfg.reward_mode)
        if cfg.balance and cfg.reward_mode == "balanced":
            if tracker is None:
                raise ValueError("the balance penalty needs a BalanceTracker (cfg.tracker())")
            penalty = tracker.update(r)
            r_final = r_final - penalty
        sw = inter_reliability(r_final, cfg.beta)
    W = None
    if cfg.spatial:
        if saliency is None:
            raise ValueError("spatial weights need saliency [B,3,F,H,W]")
        s = saliency_to_latent_grid(saliency.to(dtype), latents.shape[-3:])
        fused = fuse_saliency(s, rewards, cfg.fusion, cfg.temperature)
        W = intra_perplexity_weights(fused, k_t=cfg.k_t, k_s=cfg.k_s, tau_min=cfg.tau_min,
                                     sigma_min=cfg.sigma_min, temporal=cfg.temporal)[:, None]
    loss = dmd_generator_loss(latents, grad, sample_weight=sw.to(latents.dtype),
                              element_weight=None if W is None else W.to(latents.dtype), mask=mask)
    return WeightedLoss(loss, sw, W, r_final, penalty)
