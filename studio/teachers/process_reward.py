"""Process reward models: noise-aware rewards ``R(x_sigma, sigma, prompt)`` and their gradients w.r.t. ``x_sigma``.

Euphonium (spec 4.1-4.3) steers the flow SDE of an RL rollout with ``grad_x R`` of a latent, noise-aware
process reward model (PRM) and credits each step with the PRM's score. This module holds the protocol and the
exact PRMs of the studio's analytic worlds:

* :class:`ProcessReward` -- the protocol: ``reward(x, sigma, prompts) -> [B]`` and ``reward_and_grad`` (by
  autograd unless a subclass has a closed form); :meth:`ProcessReward.bind` gives the ``(x, sigma) -> (R, G)``
  callable :func:`~studio.teachers.sampling.flow_sde_rollout` takes.
* :class:`GaussianWorldReward` -- a Gaussian world ``x0 ~ N(m, s0^2 I)`` on rectified flow with the quadratic
  outcome reward ``R0(x0) = -(lam / 2) ||x0 - c||^2``; everything is closed form: the exact velocity, the PRM
  as the expected outcome reward ``E[R0 | x_sigma]`` or as the soft value ``beta log E[exp(R0 / beta) | x_sigma]``
  (the KL-tilt value function of spec 4.1), its gradient, and the moments of the tilted target
  ``p(x0) exp(R0 / beta)``. The tests of the Euphonium parts run on it.
* :class:`ShapeWorldVideoProcessReward` -- the exact process reward of ShapeWorld video: the posterior over the
  exact video teacher's reference clips given ``x_sigma``, each clip scored by the ground-truth checks
  (:func:`studio.world.video_metrics.motion_accuracy` by default): the expected outcome reward.

``sigma`` is the flow noise level (``x_sigma = (1 - sigma) x0 + sigma eps``), a float or ``[B]``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["GaussianWorldReward", "ProcessReward", "ShapeWorldVideoProcessReward"]


def _col(value: float | Tensor, x: Tensor) -> Tensor:
    """``value`` as a tensor broadcasting against ``x`` (``[B]`` -> ``[B,1,...]``)."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.numel() > 1 else t.reshape(())


def _batch_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


class ProcessReward:
    """The process-reward protocol. Subclasses implement :meth:`reward`; :meth:`reward_and_grad` differentiates
    it with autograd (override it where the gradient has a closed form)."""

    name = "process-reward"

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        """``[B]`` rewards of the noisy samples ``x`` (``[B, ...]``) at noise level ``sigma``."""
        raise NotImplementedError

    def reward_and_grad(self, x: Tensor, sigma: float | Tensor,
                        prompts: str | Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """``(R [B], dR/dx [B, ...])``, both detached (one forward and backward; each sample's reward depends on
        its own row only, so the gradient of the sum is the per-sample gradient)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            r = self.reward(xg, sigma, prompts)
            (g,) = torch.autograd.grad(r.sum(), xg)
        return r.detach(), g.detach()

    def bind(self, prompts: str | Sequence[str] | None = None) -> Callable[[Tensor, float], tuple[Tensor, Tensor]]:
        """``(x, sigma) -> (R, grad R)`` for the given prompts, the form a rollout queries."""
        return lambda x, sigma: self.reward_and_grad(x, sigma, prompts)


class GaussianWorldReward(ProcessReward):
    """An exactly solvable world for the Euphonium parts (see the module doc).

    Data ``x0 ~ N(mean, std^2 I)`` (every element independent), rectified flow ``x_sigma = (1 - sigma) x0 + sigma
    eps``, outcome reward ``R0(x0) = -(sharpness / 2) ||x0 - target||^2`` (summed over the elements). Given
    ``x_sigma`` the posterior of ``x0`` is ``N(mu, V)`` per element with precision ``P = 1 / std^2 + (1 - sigma)^2
    / sigma^2``, ``mu = (mean / std^2 + (1 - sigma) x / sigma^2) / P`` and ``V = 1 / P``.

    ``beta=None``: the PRM is the expected outcome reward ``E[R0 | x_sigma] = -(lam / 2) sum((mu - c)^2 + V)``;
    ``beta > 0``: the soft value ``beta log E[exp(R0 / beta) | x_sigma] = sum(-(beta / 2) log(1 + lam V / beta) -
    beta lam (mu - c)^2 / (2 (beta + lam V)))``, whose gradient ``/ beta`` is the exact score correction of the
    tilted target. Both gradients are closed form (the tests check them against autograd).
    """

    name = "gaussian-world"

    def __init__(self, mean: float = 0.0, std: float = 1.0, target: float = 1.0, sharpness: float = 1.0,
                 beta: float | None = None):
        if std <= 0 or sharpness < 0 or (beta is not None and beta <= 0):
            raise UserError(f"the Gaussian world needs std > 0, sharpness >= 0 and beta > 0 (or None); got std={std}, "
                            f"sharpness={sharpness}, beta={beta}")
        self.mean, self.std, self.target = float(mean), float(std), float(target)
        self.sharpness = float(sharpness)
        self.beta = None if beta is None else float(beta)

    # ------------------------------------------------------------------ the world
    def posterior(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu, V, dmu/dx)`` of ``x0 | x_sigma`` (each element independent; ``sigma > 0``)."""
        s = _col(sigma, x)
        if bool((s <= 0).any()):
            raise UserError("the posterior at sigma = 0 is a point mass; query sigma > 0")
        a = 1.0 - s
        prec = 1.0 / self.std ** 2 + a * a / (s * s)
        mu = (self.mean / self.std ** 2 + a * x / (s * s)) / prec
        return mu, (1.0 / prec).expand_as(x), (a / (s * s) / prec).expand_as(x)

    def velocity(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The exact flow velocity ``E[eps - x0 | x_sigma]``."""
        s = _col(sigma, x)
        mu = self.posterior(x, sigma)[0]
        return (x - (1.0 - s) * mu) / s - mu

    def sample_x0(self, shape: Sequence[int], generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64) -> Tensor:
        return self.mean + self.std * torch.randn(tuple(shape), generator=generator, dtype=dtype)

    def outcome_reward(self, x0: Tensor) -> Tensor:
        """``[B]``: ``R0(x0) = -(lam / 2) ||x0 - c||^2``."""
        return -0.5 * self.sharpness * _batch_sum((x0 - self.target) ** 2)

    def tilted_moments(self, beta: float | None = None) -> tuple[float, float]:
        """Mean and variance (per element) of the tilted target ``p(x0) exp(R0(x0) / beta)`` (default: this
        world's ``beta``)."""
        b = self.beta if beta is None else float(beta)
        if b is None:
            raise UserError("tilted_moments needs beta")
        prec = 1.0 / self.std ** 2 + self.sharpness / b
        return (self.mean / self.std ** 2 + self.sharpness * self.target / b) / prec, 1.0 / prec

    # ------------------------------------------------------------------ the PRM
    def _value(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        mu, V, dmu = self.posterior(x, sigma)
        lam, d = self.sharpness, mu - self.target
        if self.beta is None:
            return -0.5 * lam * _batch_sum(d * d + V), -lam * d * dmu
        b = self.beta
        r = -0.5 * b * torch.log1p(lam * V / b) - b * lam * d * d / (2.0 * (b + lam * V))
        return _batch_sum(r), -b * lam * d / (b + lam * V) * dmu

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        return self._value(x, sigma)[0]

    def reward_and_grad(self, x: Tensor, sigma: float | Tensor,
                        prompts: str | Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        r, g = self._value(x.detach(), sigma)
        return r, g


class ShapeWorldVideoProcessReward(ProcessReward):
    """The exact process reward of ShapeWorld video: ``R(x_sigma, prompt) = sum_i w_i(x_sigma) r_i``.

    The exact video teacher's data for a prompt is the mixture ``1/k sum_i N(ref_i, s^2 I)`` of its reference clips
    (model space ``2 video - 1``); at ``x_sigma = (1 - sigma) x0 + sigma eps`` the posterior weight of clip ``i``
    is ``softmax_i(-||x_sigma - (1 - sigma) ref_i||^2 / (2 ((1 - sigma)^2 s^2 + sigma^2)))``. Each reference clip
    is scored once by ``clip_reward(videos [k,F,3,H,W] in [0, 1], prompts) -> [k]``, the ground-truth check
    (default: :func:`~studio.world.video_metrics.motion_accuracy` per clip), so ``R`` is the expected outcome
    reward of the clip ``x_sigma`` will denoise to. Its gradient is exact (autograd through the softmax).
    Flow schedule (``sigma``) only; ``teacher`` is a :class:`~studio.teachers.shapeworld_video.
    ShapeWorldVideoExactTeacher`.
    """

    name = "shapeworld-video-exact-prm"

    def __init__(self, teacher, clip_reward: Callable[[Tensor, list[str]], Tensor] | None = None):
        if not teacher.schedule.is_flow:
            raise UserError("the ShapeWorld process reward is defined on the flow schedule; load the exact video "
                            "teacher with schedule='flow'")
        self.teacher = teacher
        self.clip_reward = clip_reward
        self._scores: dict[str, Tensor] = {}

    def _reference_scores(self, prompt: str) -> tuple[Tensor, Tensor]:
        from ..world.clips import parse_video_prompt, video_prompt

        key = video_prompt(*parse_video_prompt(prompt))
        refs = self.teacher.references(key)  # [k,3,F,H,W] float64
        if key not in self._scores:
            videos = ((refs.permute(0, 2, 1, 3, 4) + 1) / 2).float().clamp(0, 1)  # [k,F,3,H,W]
            if self.clip_reward is None:
                from ..world.video_metrics import motion_accuracy
                scores = motion_accuracy(videos, [key] * refs.shape[0], per_clip=True)
            else:
                scores = self.clip_reward(videos, [key] * refs.shape[0])
            self._scores[key] = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        return refs, self._scores[key]

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        if prompts is None:
            raise UserError("the ShapeWorld process reward needs the prompt of each sample")
        plist = [prompts] * x.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(plist) != x.shape[0]:
            raise UserError(f"{len(plist)} prompts for {x.shape[0]} samples; give one prompt per sample (or one)")
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = []
        for b, p in enumerate(plist):
            refs, scores = self._reference_scores(p)
            a, sb = 1.0 - s[b], s[b]
            var = a * a * self.teacher.smoothing ** 2 + sb * sb
            d2 = ((x[b].to(torch.float64)[None] - a * refs.to(x.device)) ** 2).reshape(refs.shape[0], -1).sum(1)
            w = torch.softmax(-d2 / (2 * var), dim=0)
            out.append((w * scores.to(x.device)).sum())
        return torch.stack(out).to(x.dtype)
