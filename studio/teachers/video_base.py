"""The video teacher protocol: :class:`ImageTeacher` generalised to clips.

Shapes (one convention everywhere in the studio):

* **videos** (pixels): ``[B, F, 3, H, W]`` floats in [0, 1] -- frames first, like a list of images;
* **latents** (model space): ``[B, C, F', h, w]`` -- diffusers' video convention (``UNet3DConditionModel``,
  ``UNetMotionModel``, ``WanTransformer3DModel`` all take channels before frames). ``F' = F`` for frame-wise
  VAEs (ModelScope, AnimateDiff, pixel-space models) and ``F' = (F - 1) // t + 1`` for causal 3D VAEs with
  temporal compression ``t`` (Wan: 4).

Everything else is inherited unchanged from :class:`ImageTeacher`: prompt encoding with negative prompts and
caching, CFG (``predict``, epsilon space, ``w = 1`` runs one branch), both branches at once
(``predict_branches``), and the :class:`NoiseSchedule` that does all alpha / sigma / flow arithmetic and
prediction conversions (it broadcasts over any number of trailing dimensions, so it serves 5-D latents
as is). A video teacher's ``encode`` / ``decode`` take videos and latents in the shapes above (pixel videos
are checked by :func:`studio.world.clips.check_video`).

Subclasses set :attr:`num_frames` (the clip length the model was trained on),
:attr:`temporal_compression` and the :class:`ImageTeacher` attributes, and implement ``_embed_texts``,
``_forward`` (5-D ``x_t``), ``encode`` and ``decode``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..world.clips import check_video
from .base import ImageTeacher


def check_latents(latents: Tensor, channels: int, what: str = "latents") -> Tensor:
    """Validate model-space video latents ``[B,C,F,h,w]``."""
    if latents.dim() != 5 or latents.shape[1] != channels:
        raise ValueError(f"{what} must have shape [B,{channels},F,h,w] (channels before frames), "
                         f"got {tuple(latents.shape)}")
    return latents


def frames_to_batch(x: Tensor) -> Tensor:
    """``[B,C,F,h,w]`` -> ``[B*F,C,h,w]`` (frame-wise networks / VAEs)."""
    B, C, F, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B * F, C, h, w)


def batch_to_frames(x: Tensor, batch: int) -> Tensor:
    """``[B*F,C,h,w]`` -> ``[B,C,F,h,w]`` (inverse of :func:`frames_to_batch`)."""
    BF, C, h, w = x.shape
    return x.reshape(batch, BF // batch, C, h, w).permute(0, 2, 1, 3, 4)


class VideoTeacher(ImageTeacher):
    """Abstract frozen text-to-video teacher (``x_t``: ``[B,C,F',h,w]``; see the module doc).

    Attributes (beyond :class:`ImageTeacher`'s):
        num_frames: pixel frames of the clips the model was trained on (the default clip length).
        temporal_compression: pixel frames per latent frame of a causal 3D VAE (1 = frame-wise).
        frame_rate: frames per second for writing MP4s of its samples.
    """

    num_frames: int = 16
    temporal_compression: int = 1
    frame_rate: int = 8

    def latent_frames(self, num_frames: int | None = None) -> int:
        """Latent frames ``F'`` for ``num_frames`` pixel frames."""
        F = int(num_frames or self.num_frames)
        tc = int(self.temporal_compression)
        if tc == 1:
            return F
        if (F - 1) % tc:
            raise ValueError(f"{self.name}: a causal VAE with temporal compression {tc} needs num_frames = "
                             f"{tc}k + 1 (e.g. {tc * ((F - 1) // tc) + 1} or {tc * ((F - 1) // tc + 1) + 1}), got {F}")
        return (F - 1) // tc + 1

    def latent_shape(self, num_frames: int | None = None, size: int | tuple[int, int] | None = None) -> tuple[int, ...]:
        """``(C, F', h, w)`` of the latents of a clip of ``num_frames`` frames at ``size`` pixels."""
        h, w = self.latent_size(size if size is not None else self.native_resolution)
        return (self.latent_channels, self.latent_frames(num_frames), h, w)

    def noise(self, batch: int, num_frames: int | None = None, size: int | tuple[int, int] | None = None,
              seed: int = 0) -> Tensor:
        """Seeded standard-normal latents ``[B,C,F',h,w]`` on the teacher's device and dtype (CPU generator,
        so the same seed gives the same clip on every device)."""
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn((int(batch),) + self.latent_shape(num_frames, size), generator=gen)
        return x.to(self.device, self.dtype)

    def encode(self, video: Tensor) -> Tensor:  # noqa: D401 - documented in the module
        """Videos ``[B,F,3,H,W]`` in [0, 1] -> latents ``[B,C,F',h,w]`` (differentiable w.r.t. ``video``)."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B,C,F',h,w]`` -> videos ``[B,F,3,H,W]`` in [0, 1]."""
        raise NotImplementedError


class PixelVideoMixin:
    """``encode`` / ``decode`` of pixel-space video teachers: ``x = 2 * video - 1`` with frames moved behind
    the channels, resized to :attr:`native_resolution` on the way in."""

    latent_channels = 3
    vae_scale_factor = 1
    is_latent = False

    def encode(self, video: Tensor) -> Tensor:
        video = check_video(video)
        B, F = video.shape[:2]
        x = video.reshape(B * F, *video.shape[2:])
        r = self.native_resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return batch_to_frames(x * 2 - 1, B)

    def decode(self, latents: Tensor) -> Tensor:
        latents = check_latents(latents, self.latent_channels)
        return ((latents + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
