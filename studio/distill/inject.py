"""The one gradient-injection helper of score distillation.

Every score-distillation loss produces a gradient ``G`` with the shape of the student's latent ``z``
(computed under ``no_grad`` from frozen networks). ``inject_gradient(z, G)`` returns a scalar loss
``L = 0.5 * sum((z - sg(z - G))^2)`` whose gradient is **exactly** ``dL/dz = G`` — no division by the
batch size (threestudio divides by B; DreamFusion's ``SpecifyGradient`` does not; we follow the latter
and let methods scale ``G`` explicitly). The value ``0.5 * ||G||^2`` is what gets logged.
"""
from __future__ import annotations

import torch
from torch import Tensor


def inject_gradient(z: Tensor, grad: Tensor, scale: float = 1.0) -> Tensor:
    """Scalar loss with ``d loss / d z = scale * grad`` (``grad`` is detached; non-finite entries -> 0)."""
    if grad.shape != z.shape:
        raise ValueError(f"grad must have the shape of z {tuple(z.shape)}, got {tuple(grad.shape)}")
    g = torch.nan_to_num(grad.detach().to(z.dtype), nan=0.0, posinf=0.0, neginf=0.0) * scale
    target = (z - g).detach()
    return 0.5 * ((z - target) ** 2).sum()
