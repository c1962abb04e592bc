"""Metrics of a personalised image edit (DreamSteerer, spec dreamsteerer.md 10.2), tensor-in / numbers-out.

Images are ``[B,3,H,W]`` in [0, 1]; masks ``[B,1,H,W]`` in {0, 1} (1 = the subject).

Paper metrics, computed here without pretrained networks:

* :func:`masked_ssim` -- SSIM against the source, averaged **outside** the subject mask (``kornia`` Gaussian
  window, RGB, per-pixel SSIM map; the paper's full-image SSIM is ``mask=None``).

ShapeWorld exact metrics (the edit has a known answer: the concept rendered at the source's camera, see
:func:`studio.world.concepts.edit_pair`), **not in the paper**:

* :func:`concept_error` -- RMSE inside the silhouette between the edit and the ground-truth concept render
  (concept fidelity, lower is better); :func:`concept_fidelity_exact` = ``1 - concept_error``;
* :func:`palette_distance` -- symmetric colour-space Chamfer distance between the edit's subject pixels and the
  ground-truth concept's pixels (pose-free concept transfer: a muddy average of the concept's colours scores badly
  because the concept's colours are missing from it, which the per-pixel RMSE rewards);
* :func:`background_error` -- RMSE outside the silhouette between the edit and the source (source
  preservation: background and pose; the concept keeps the base object's shape, so any change there is error).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(a: Tensor, b: Tensor, mask: Tensor | None) -> None:
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ValueError(f"images must both be [B,3,H,W], got {tuple(a.shape)} and {tuple(b.shape)}")
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != a.shape[-2:]):
        raise ValueError(f"mask must be [B,1,H,W] matching the images, got {tuple(mask.shape)}")


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A latent-resolution mask to image resolution (nearest), values in {0, 1} kept."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask.float(), size=size, mode="nearest")


def masked_rmse(a: Tensor, b: Tensor, weight: Tensor) -> Tensor:
    """``sqrt(sum(w (a - b)^2) / (3 sum(w)))`` per image ``[B]`` (0 where ``w`` is empty)."""
    _check(a, b, weight)
    w = weight.to(a)
    num = (w * (a - b) ** 2).sum((1, 2, 3))
    den = 3 * w.sum((1, 2, 3))
    return torch.where(den > 0, (num / den.clamp_min(1e-12)).sqrt(), torch.zeros_like(num))


def concept_error(edited: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """RMSE inside ``mask`` between the edit and the ground-truth concept render ``[B]``."""
    return masked_rmse(edited, target, mask)


def concept_fidelity_exact(edited: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``1 - concept_error`` (1 = exactly the concept's colours on the subject)."""
    return 1.0 - concept_error(edited, target, mask)


def background_error(edited: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """RMSE outside ``mask`` between the edit and the source ``[B]``."""
    return masked_rmse(edited, source, 1.0 - mask.float())


def masked_ssim(edited: Tensor, source: Tensor, mask: Tensor | None = None, window_size: int = 11) -> Tensor:
    """Mean SSIM ``[B]`` of the per-pixel SSIM map (RGB averaged), over pixels outside ``mask`` (all pixels
    without a mask)."""
    import kornia

    _check(edited, source, mask)
    small = min(edited.shape[-2:])
    ws = window_size if small > window_size else max(1, ((small - 1) // 2) * 2 - 1)
    m = kornia.metrics.ssim(edited.float().contiguous(), source.float().contiguous(), ws).mean(1, keepdim=True)
    w = torch.ones_like(m) if mask is None else 1.0 - mask.float()
    return (m * w).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp_min(1e-12)


def palette_distance(edited: Tensor, target: Tensor, mask: Tensor, target_mask: Tensor | None = None) -> Tensor:
    """``[B]``: ``(mean_a min_b |a - b| + mean_b min_a |a - b|) / 2`` over the RGB values ``a`` of ``edited`` inside
    ``mask`` and ``b`` of ``target`` inside ``target_mask`` (default ``mask``); 0 for identical colour sets."""
    _check(edited, target, mask)
    tm = mask if target_mask is None else target_mask
    out = []
    for i in range(edited.shape[0]):
        a = edited[i].permute(1, 2, 0)[mask[i, 0] > 0.5].float()
        b = target[i].permute(1, 2, 0)[tm[i, 0] > 0.5].float()
        if a.numel() == 0 or b.numel() == 0:
            out.append(torch.tensor(float("nan")))
            continue
        d = torch.cdist(a, b)
        out.append(0.5 * (d.min(1).values.mean() + d.min(0).values.mean()))
    return torch.stack(out)
