"""The dense, obviously-correct torch twin of ``rasterize_to_pixels``.

Every pixel looks at every Gaussian of its camera (sorted by depth), so there is no tiling to get
wrong. Memory is bounded by evaluating pixels in chunks of about ``max_elems`` pixel-Gaussian pairs,
each chunk under ``torch.utils.checkpoint`` so the backward pass recomputes rather than stores the
``[pixels, N]`` intermediates. Slow by design; it is what the fast backends are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._common import ALPHA_MAX, ALPHA_MIN, T_EPS


def _blend_chunk(pix: Tensor, means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor):
    """Blend sorted Gaussians ``[M,...]`` at pixel centres ``pix [P,2]``: returns ``[P,D]`` and ``[P]``."""
    d = pix[:, None, :] - means2d[None, :, :]  # [P,M,2]
    dx, dy = d[..., 0], d[..., 1]
    a, b, c = conics[:, 0], conics[:, 1], conics[:, 2]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp(opacities[None, :] * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where((alpha >= ALPHA_MIN) & (sigma >= 0), alpha, torch.zeros_like(alpha))
    one_minus = 1.0 - alpha
    running = torch.cumprod(one_minus, dim=1)
    alpha = torch.where(running > T_EPS, alpha, torch.zeros_like(alpha))  # early termination
    trans = torch.cumprod(1.0 - alpha, dim=1)
    t_before = torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], dim=1)
    weights = alpha * t_before
    return weights @ colors, trans[:, -1]


def rasterize_to_pixels_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    *,
    max_elems: int = 1 << 21,
) -> tuple[Tensor, Tensor]:
    """Dense reference blend. Shapes: ``means2d [C,N,2]``, ``conics [C,N,3]``, ``colors [C,N,D]``,
    ``opacities [C,N]``, ``radii [C,N,2]``, ``depths [C,N]``, ``backgrounds [C,D]`` or None.
    Returns ``(render [C,H,W,D], alphas [C,H,W,1])``."""
    C, N = opacities.shape
    D = colors.shape[-1]
    dev, dt = means2d.device, means2d.dtype
    ys, xs = torch.meshgrid(
        torch.arange(height, device=dev, dtype=dt) + 0.5,
        torch.arange(width, device=dev, dtype=dt) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [H*W,2]
    renders, alphas = [], []
    for ci in range(C):
        vis = (radii[ci] > 0).all(dim=-1)
        idx = torch.nonzero(vis).squeeze(1)
        order = idx[torch.sort(depths[ci, idx].detach(), stable=True).indices]
        m, q, col, op = means2d[ci, order], conics[ci, order], colors[ci, order], opacities[ci, order]
        M = order.numel()
        if M == 0:
            img = torch.zeros(height * width, D, device=dev, dtype=colors.dtype) + 0 * colors.sum()
            t_final = torch.ones(height * width, device=dev, dtype=dt)
        else:
            step = max(1, max_elems // M)
            parts_c, parts_t = [], []
            for s in range(0, pix.shape[0], step):
                p = pix[s : s + step]
                if torch.is_grad_enabled():
                    cc, tt = checkpoint(_blend_chunk, p, m, q, col, op, use_reentrant=False)
                else:
                    cc, tt = _blend_chunk(p, m, q, col, op)
                parts_c.append(cc)
                parts_t.append(tt)
            img, t_final = torch.cat(parts_c), torch.cat(parts_t)
        if backgrounds is not None:
            img = img + t_final[:, None] * backgrounds[ci][None, :]
        renders.append(img.reshape(height, width, D))
        alphas.append((1.0 - t_final).reshape(height, width, 1))
    return torch.stack(renders), torch.stack(alphas)
