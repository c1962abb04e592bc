"""``shapeworld-unet``: a tiny *trained* text-to-image diffusion model of ShapeWorld (tier 2).

The same classes as Stable Diffusion (``UNet2DConditionModel``, ``CLIPTextModel`` + ``CLIPTokenizer``,
``DDPMScheduler`` scaled_linear / epsilon) in pixel space (no VAE, ``x = image * 2 - 1`` at 32x32),
trained on renders of the 14 ShapeWorld objects with view-dependent captions ("a red cube, back view";
see ``scripts/train_shapeworld_unet.py``). The weights ship in ``assets/shapeworld-unet`` (safetensors)
and load through the ordinary :meth:`DiffusersTeacher.from_pretrained` path::

    teacher = load_teacher("shapeworld-unet")          # = DiffusersTeacher.from_pretrained(<assets>/shapeworld-unet)
    images = ddim_sample(teacher, ["a red cube, front view"], steps=25, guidance_scale=4.0)

The assets folder is ``<repo>/assets`` (next to the ``studio`` package of an editable install) or
``$STUDIO_ASSETS`` when set (:mod:`studio.assets`). The name is registered in :mod:`studio.teachers.registry`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..assets import shipped_model_path
from .sampling import ddim_sample  # noqa: F401  (re-exported: the sampler used with this teacher)

NAME = "shapeworld-unet"


def shapeworld_unet_path() -> Path:
    """Folder of the shipped ``shapeworld-unet`` weights (``UserError`` naming the fix when missing)."""
    return shipped_model_path(NAME, "train_shapeworld_unet.py")


def make_shapeworld_unet(**kw: Any):
    """``DiffusersTeacher.from_pretrained(<assets>/shapeworld-unet, **kw)`` (device, dtype, lora, ...)."""
    from .diffusers_sd import DiffusersTeacher

    teacher = DiffusersTeacher.from_pretrained(shapeworld_unet_path(), **kw)
    teacher.name = NAME
    return teacher


def foreground_mean(images: Tensor, threshold: float = 0.12, background: str | float | Tensor = "border") -> Tensor:
    """Mean colour ``[B,3]`` of the foreground of ``[B,3,H,W]`` images in [0, 1]: the pixels that differ from
    the background by more than ``threshold`` in some channel. ``background``: ``"border"`` (per image,
    the per-channel median of the outermost pixel frame; robust to a tinted sample background),
    ``"white"`` or a value / ``[3]`` / ``[B,3]`` tensor. Images without foreground give the background."""
    B, C = images.shape[:2]
    if isinstance(background, str):
        if background == "white":
            bg = torch.ones(B, C, dtype=images.dtype, device=images.device)
        elif background == "border":
            frame = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]],
                              dim=-1)
            bg = frame.median(dim=-1).values
        else:
            raise ValueError(f"background must be 'border', 'white' or a colour, got {background!r}")
    else:
        bg = torch.as_tensor(background, dtype=images.dtype, device=images.device).expand(B, C)
    mask = ((images - bg[:, :, None, None]).abs().amax(1, keepdim=True) > threshold).to(images.dtype)
    n = mask.sum((2, 3))
    mean = (images * mask).sum((2, 3)) / n.clamp_min(1)
    return torch.where(n > 0, mean, bg)
