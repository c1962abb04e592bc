"""A toy flow policy for the GRPO / flow-SDE code path of ``methods.euphonium`` (issue 19, locating why GRPO does
not raise the reward on the video testbed).

The policy is the exact rectified-flow velocity of a Gaussian ``x0 ~ N(m, exp(log_std)^2 I)`` in ``dim``
dimensions, with ``m`` and ``log_std`` learnable: the plain flow sampler of the policy samples exactly that
Gaussian, the SDE of :func:`studio.teachers.sampling.flow_sde_step` keeps its marginals, and a reward
``-(x0 - target)^2`` has a known optimum (``m -> target``, ``std -> 0``). It exposes what
:class:`methods.euphonium.EuphoniumStage` asks of a policy (``schedule``, ``predict(..., output="flow")``,
``encode_prompt``, ``noise``, ``decode``, ``trainable_parameters``, ``denoiser``), so the *same* stage, losses and
:class:`~studio.train.loop.Trainer` run on it as on the video model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from studio.teachers.schedule import NoiseSchedule


class ToyGaussianFlowPolicy(torch.nn.Module):
    def __init__(self, dim: int = 4, mean: float = 0.0, std: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dim = int(dim)
        self.m = torch.nn.Parameter(torch.full((self.dim,), float(mean), dtype=dtype))
        self.log_std = torch.nn.Parameter(torch.full((self.dim,), float(torch.log(torch.tensor(std))), dtype=dtype))
        self.schedule = NoiseSchedule.flow(shift=1.0)

    @property
    def denoiser(self) -> "ToyGaussianFlowPolicy":
        return self  # what a full fine-tune's checkpoint reads (the whole toy trains)

    def trainable_parameters(self) -> list[Tensor]:
        return [self.m, self.log_std]

    def encode_prompt(self, prompts):
        return list(prompts)

    def noise(self, batch: int, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(int(batch), self.dim, generator=g).to(self.m.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    def velocity(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``E[eps - x0 | x_sigma]`` of the policy's Gaussian (differentiable in ``m`` and ``log_std``)."""
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        var0 = torch.exp(2.0 * self.log_std)
        a = 1.0 - s
        prec = 1.0 / var0 + a * a / (s * s)
        mu = (self.m / var0 + a * x / (s * s)) / prec
        return (x - a * mu) / s - mu

    def predict(self, x: Tensor, t, cond=None, guidance_scale: float = 1.0, output: str = "flow") -> Tensor:
        if output != "flow":
            raise ValueError(f"the toy policy predicts the flow velocity only, not {output!r}")
        s = self.schedule.sigma(torch.as_tensor(t, dtype=torch.float64)).reshape(-1)
        if s.numel() == 1:
            s = s.expand(x.shape[0])
        return self.velocity(x, s.to(x.dtype))


class QuadraticReward:
    """Outcome reward ``-(x0 - target)^2`` summed over the elements (``[B]`` float64), the prompts ignored."""

    def __init__(self, target: float = 2.0):
        self.target = float(target)

    def __call__(self, videos: Tensor, prompts) -> Tensor:
        return -((videos.double() - self.target) ** 2).reshape(videos.shape[0], -1).sum(1)


def train_toy(steps: int = 40, lr: float = 0.05, seed: int = 0, out_dir=None, dim: int = 4, target: float = 2.0,
              prm=None, **cfg_kw) -> dict:
    """GRPO on the toy policy through ``EuphoniumStage`` and the one Trainer; returns the per-step history, the
    final mean / std of the policy and the exact expected reward before / after."""
    import tempfile
    from pathlib import Path

    from methods.euphonium import EuphoniumConfig, EuphoniumStage
    from studio.runs.skeleton import train_stages

    torch.manual_seed(seed)
    policy = ToyGaussianFlowPolicy(dim=dim)
    reward = QuadraticReward(target)

    def expected(p) -> float:  # exact E[-(x0 - c)^2] of the plain sampler
        with torch.no_grad():
            return float(-(((p.m - target) ** 2) + torch.exp(2 * p.log_std)).sum())

    base = {"preset": "dance-grpo", "steps": steps, "sampling_steps": 8, "group_size": 4, "prompts_per_step": 2,
            "lr": lr, "guidance_scale": 1.0, "seed": seed, "checkpoint_every": 10_000}
    base.update(cfg_kw)
    cfg = EuphoniumConfig(**base)
    before = expected(policy)
    stage = EuphoniumStage(cfg, policy, policy, reward, ["p0", "p1", "p2"], prm=prm)
    with tempfile.TemporaryDirectory() as tmp:
        history, _ = train_stages([stage], Path(out_dir or tmp), seed=seed, progress=False,
                                  max_grad_norm=cfg.max_grad_norm, checkpoint_every=10_000,
                                  preview_every=0)
    return {"expected_before": before, "expected_after": expected(policy),
            "mean": policy.m.detach().tolist(), "std": torch.exp(policy.log_std).detach().tolist(),
            "train_reward": [h.get("reward") for h in history]}
