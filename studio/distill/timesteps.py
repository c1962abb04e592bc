"""Timestep samplers for score distillation (threestudio conventions, fractions of the schedule).

``TimestepSampler(t_min, t_max, mode)`` returns integer timesteps for a training step:

* ``uniform``: t ~ U[t_min, t_max] (threestudio ``min/max_step_percent``, defaults 0.02 / 0.98);
* ``linear``: t_max anneals linearly from ``t_max`` to ``t_max_end`` between ``anneal_start`` and
  ``anneal_end`` (fractions of training; the "scheduled max" of ProlificDreamer and PlacidDreamer);
* ``dreamgaussian``: a single t per step decreasing linearly with progress from t_max to t_min
  (DreamGaussian's anneal, plus optional jitter);
* ``sqrt``: HiFA's anneal, ``t = t_max - (t_max - t_min) * sqrt(progress)``, one t per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("uniform", "linear", "dreamgaussian", "sqrt")


@dataclass
class TimestepSampler:
    t_min: float = 0.02
    t_max: float = 0.98
    mode: str = "uniform"
    t_max_end: float = 0.5
    anneal_start: float = 0.0
    anneal_end: float = 1.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"timestep mode must be one of {MODES}, got {self.mode!r}")
        if not (0.0 <= self.t_min <= self.t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")

    def bounds(self, progress: float) -> tuple[float, float]:
        """The (t_min, t_max) fractions in force at ``progress`` in [0,1]."""
        p = min(max(progress, 0.0), 1.0)
        if self.mode == "linear":
            span = max(self.anneal_end - self.anneal_start, 1e-12)
            q = min(max((p - self.anneal_start) / span, 0.0), 1.0)
            return self.t_min, max(self.t_min, self.t_max + (self.t_max_end - self.t_max) * q)
        return self.t_min, self.t_max

    def sample(self, n: int, progress: float, schedule, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` long timesteps at training ``progress`` in [0,1] for a ``NoiseSchedule``."""
        T = schedule.num_train_timesteps
        lo, hi = schedule.timestep_range(*self.bounds(progress))
        if self.mode in ("uniform", "linear"):
            return torch.randint(lo, hi + 1, (n,), generator=generator).clamp(0, T - 1)
        p = min(max(progress, 0.0), 1.0)
        frac = (p if self.mode == "dreamgaussian" else math.sqrt(p))
        t = hi - (hi - lo) * frac
        if self.jitter > 0:
            t = t + self.jitter * T * (torch.rand((), generator=generator).item() * 2 - 1)
        t = int(round(min(max(t, lo), hi)))
        return torch.full((n,), t, dtype=torch.long).clamp(0, T - 1)
