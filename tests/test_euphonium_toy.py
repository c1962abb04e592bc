"""GRPO through the real Euphonium stage on a toy Gaussian flow policy with an analytic reward (issue 19: locate why
GRPO does not raise the reward). The stage, the flow-SDE rollouts, the losses and the Trainer are the ones `studio
video rl` runs; only the policy is a 4-D Gaussian whose exact expected reward is known (tests/toy_flow_policy.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from toy_flow_policy import ToyGaussianFlowPolicy, train_toy  # noqa: E402

from studio.teachers.process_reward import GaussianWorldReward  # noqa: E402

BASE = -20.0  # E[-(x0 - 2)^2] summed over 4 elements for x0 ~ N(0, 1)


def test_toy_policy_velocity_is_the_exact_gaussian_flow():
    pol = ToyGaussianFlowPolicy(dim=3, mean=0.4, std=0.7, dtype=torch.float64)
    world = GaussianWorldReward(mean=0.4, std=0.7)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for s in (0.9, 0.5, 0.1):
        t = pol.schedule.timestep_from_sigma(torch.full((5,), s, dtype=torch.float64))
        torch.testing.assert_close(pol.predict(x, t), world.velocity(x, s))


@pytest.mark.parametrize("preset", ["dance-grpo", "flow-grpo"])
def test_outcome_grpo_raises_the_plain_samplers_reward(preset):
    """The shared GRPO path learns: 30 updates lift the exact expected reward of the plain sampler from -20 to
    about -8..-12 (measured, 3 seeds: docs/notes/issue19-locate.md)."""
    for seed in (0, 1):
        r = train_toy(steps=30, lr=0.05, seed=seed, shift=5.0, preset=preset)
        assert r["expected_before"] == pytest.approx(BASE)
        assert r["expected_after"] > -14.0, r


def test_process_advantages_credit_the_state_a_transition_produced():
    """Process-only GRPO (no outcome term, no guidance drift) with an exact PRM. Crediting transition i with the
    PRM score of its *input* state x_i (the release's alignment) gives a zero-signal term: the plain reward falls
    below the base policy's (measured -24 / -20 / -24). Crediting it with the score of x_{i+1} (the default) learns:
    -4.4 / -5.1 / -5.0. Fails when the default credit is the input state."""
    prm = GaussianWorldReward(0.0, 1.0, 2.0, 1.0)
    kw = dict(steps=30, lr=0.05, shift=5.0, preset="euphonium", guidance=0.0, advantage_mode="only",
              guidance_start=0, prm=prm)
    for seed in (0, 1):
        default = train_toy(seed=seed, **kw)
        assert default["expected_after"] > -10.0, default
        release = train_toy(seed=seed, process_credit="input", **kw)
        assert release["expected_after"] < BASE + 6.0, release
        assert default["expected_after"] > release["expected_after"] + 8.0
