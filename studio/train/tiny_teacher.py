"""Helpers shared by the scripts that train ShapeWorld's tiny teachers (``scripts/train_shapeworld_*.py``):
an atomic folder write, a PNG grid writer and the tiny UNet / scheduler builders (their weight EMA is
:class:`studio.students.ema.EMA`)."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def write_folder_atomically(out: Path, write: Callable[[Path], None], keep: tuple[str, ...] = ("samples.png",
                                                                                                  "README.md")) -> None:
    """Call ``write(tmp)`` on a fresh temp folder next to ``out``, copy the files named in ``keep`` over from
    the old ``out``, then swap the temp folder in (the old one is removed)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}_", dir=out.parent))
    write(tmp)
    for f in keep:
        if (out / f).is_file() and not (tmp / f).exists():
            shutil.copy2(out / f, tmp / f)
    if out.exists():
        old = out.parent / f".{out.name}_old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    os.chmod(out, 0o755)


def save_grid(images: torch.Tensor, path: Path, ncol: int, scale: int = 2) -> None:
    """Write images ``[B,3,H,W]`` in [0, 1] as a PNG grid (``ncol`` columns, nearest upscaling by ``scale``)."""
    import numpy as np
    from PIL import Image

    imgs = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    B, _, H, W = imgs.shape
    nrow = math.ceil(B / ncol)
    grid = torch.ones(3, nrow * (H + 2), ncol * (W + 2))
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[:, r * (H + 2) + 1: r * (H + 2) + 1 + H, c * (W + 2) + 1: c * (W + 2) + 1 + W] = im.clamp(0, 1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def tiny_unet(resolution: int, in_channels: int, seed: int, out_channels: int = 3):
    """The ``UNet2DConditionModel`` of the tiny ShapeWorld teachers (blocks 32/64/96, cross-attention 64),
    built after ``torch.manual_seed(seed)`` so a seed gives the same initial weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, use_linear_projection=True,
    )


#: DDPM betas: Stable Diffusion's "scaled_linear" (the shipped tiny teachers) or pixel-DDPM "linear"
BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 0.02)}


def ddpm_scheduler(beta_schedule: str = "scaled_linear"):
    """The tiny teachers' ``DDPMScheduler`` (1000 steps, epsilon). ``scaled_linear`` leaves
    ``sqrt(abar_T) = 0.07`` of the image at ``t = T``: fine for latents, but in pixel space samples started
    from pure noise keep a faint tinted background; ``linear`` (``sqrt(abar_T) = 0.006``) is the
    pixel-space DDPM choice (untested here)."""
    from diffusers import DDPMScheduler

    lo, hi = BETAS[beta_schedule]
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=lo, beta_end=hi,
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)
