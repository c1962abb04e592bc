"""Samplers for any :class:`~studio.teachers.base.ImageTeacher` (text-to-image or novel-view)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .base import TextCond


@torch.no_grad()
def ddim_sample(teacher, prompts: str | Sequence[str] | TextCond, steps: int = 25, guidance_scale: float = 4.0,
                seed: int = 0, negative: str | Sequence[str] | None = None, clip_x0: bool = True,
                prior_mean: float | Tensor | None = None, callback=None) -> Tensor:
    """Deterministic DDIM (eta = 0) samples ``[B,3,H,W]`` in [0, 1] from any :class:`ImageTeacher` with CFG.

    ``callback(k, t)``, if given, runs before the ``k``-th network call (timestep ``t``), e.g. to switch a
    feature hook on or off for some of the steps.

    Starts from seeded Gaussian noise at the native resolution, steps over ``steps`` evenly spaced
    timesteps from ``T-1`` to 0; ``clip_x0`` clamps the predicted ``x0`` to [-1, 1] (pixel-space
    models; ignored for latent teachers). Decodes with ``teacher.decode``. ``prompts`` may also be an
    already encoded condition (a :class:`TextCond`, e.g. from a novel-view teacher's ``encode_view``;
    ``negative`` is then ignored): one sample per entry.

    ``prior_mean``: start from ``sqrt(abar_T) * prior_mean + sqrt(1 - abar_T) * noise`` instead of pure noise
    (model space, e.g. ``1.0`` = a white image for pixel models). SD's scaled_linear schedule keeps
    ``sqrt(abar_T) = 0.068`` of the image at ``t = T``, so a model trained on white backgrounds reads pure
    noise (mean 0) as a grey image and samples grey / tinted backgrounds; ``prior_mean=1.0`` matches
    ShapeWorld's training distribution at ``t = T``.
    """
    if isinstance(prompts, TextCond):
        cond = prompts
    else:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = teacher.encode_prompt(prompts, negative)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sched = teacher.schedule
    T = int(sched.num_train_timesteps)
    h, w = teacher.latent_size(teacher.native_resolution)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(len(cond), teacher.latent_channels, h, w, generator=gen).to(teacher.device, teacher.dtype)
    abar = sched.alphas_cumprod.to(torch.float64)
    if prior_mean is not None:
        a_T = float(abar[T - 1])
        x = math.sqrt(a_T) * torch.as_tensor(prior_mean, dtype=x.dtype, device=x.device) + math.sqrt(1 - a_T) * x
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    for k, t in enumerate(ts):
        if callback is not None:
            callback(k, t)
        x0 = teacher.predict(x, t, cond, guidance_scale=guidance_scale, output="sample")
        if clip_x0 and not teacher.is_latent:
            x0 = x0.clamp(-1, 1)
        a_t = float(abar[t])
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        a_prev = float(abar[ts[k + 1]]) if k + 1 < len(ts) else 1.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return teacher.decode(x).float()
