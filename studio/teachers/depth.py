"""Monocular depth through ``transformers`` (Depth Anything, DPT, ...): :class:`DepthEstimator`.

DreamScene4D's composition (spec 1.5) reads ``LiheYoung/depth-anything-small-hf`` through the depth-estimation
pipeline on frame 0 and treats the output as **disparity**: resized to the frame (nearest), median-filtered
(``H/64 x W/64``), ``depth = 1 / max(disp, 0.01)``, invalid where ``disp <= 0.01``. :meth:`DepthEstimator.depth` does
that (``output="disparity"``, the relative Depth-Anything / DPT heads); ``output="depth"`` takes the prediction as depth
(metric heads). Any ``AutoModelForDepthEstimation`` checkpoint loads, by hub id or local folder (the tests build a tiny
random Depth-Anything and load it back by path). Invalid pixels get depth 0.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .base import FrozenModule

DEPTH_ANYTHING_SMALL = "LiheYoung/depth-anything-small-hf"


def median_filter(x: Tensor, kh: int, kw: int) -> Tensor:
    """Median filter of ``[H,W]`` with a ``kh x kw`` window (odd sizes; replicate padding)."""
    kh, kw = max(1, kh | 1), max(1, kw | 1)
    if kh == 1 and kw == 1:
        return x
    p = F.pad(x[None, None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    patches = F.unfold(p, (kh, kw))  # [1, kh*kw, H*W]
    return patches.median(dim=1).values.reshape(x.shape)


class DepthEstimator(FrozenModule):
    """A frozen ``transformers`` depth model and its image processor."""

    def __init__(self, model, processor, *, output: str = "disparity", name: str = ""):
        super().__init__()
        if output not in ("disparity", "depth"):
            raise ValueError(f"output must be 'disparity' or 'depth', got {output!r}")
        self.model, self.processor, self.output, self.name = model, processor, output, name
        self.freeze()

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = DEPTH_ANYTHING_SMALL, *, output: str = "disparity",
                        local_files_only: bool | None = None) -> "DepthEstimator":
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        src = os.fspath(id_or_path)
        local = os.path.isdir(src) if local_files_only is None else local_files_only
        try:
            model = AutoModelForDepthEstimation.from_pretrained(src, local_files_only=local)
            proc = AutoImageProcessor.from_pretrained(src, local_files_only=local)
        except Exception as e:  # noqa: BLE001 - one message for every way a checkpoint can fail to load
            raise UserError(f"could not load the depth model {src!r} ({type(e).__name__}: {e}); give a folder or hub id "
                            f"of a transformers depth-estimation model, e.g. {DEPTH_ANYTHING_SMALL}") from None
        return cls(model.eval(), proc, output=output, name=src)

    @torch.no_grad()
    def predict(self, frames: Tensor) -> Tensor:
        """The raw prediction ``[B,H,W]`` at the frames' size (bilinear) for ``frames [B,H,W,3]`` in [0, 1]."""
        B, H, W = frames.shape[:3]
        imgs = [f.permute(2, 0, 1).float() for f in frames]
        inputs = self.processor(images=imgs, return_tensors="pt", do_rescale=False)
        dev = next(self.model.parameters()).device
        out = self.model(pixel_values=inputs["pixel_values"].to(dev)).predicted_depth
        if out.dim() == 4:
            out = out[:, 0]
        return F.interpolate(out[:, None].float().cpu(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]

    @torch.no_grad()
    def depth(self, frames: Tensor) -> Tensor:
        """Depth ``[B,H,W]`` (0 where invalid) following spec 1.5 (module doc)."""
        pred = self.predict(frames)
        H, W = pred.shape[-2:]
        out = []
        for p in pred:
            p = median_filter(p, max(1, H // 64), max(1, W // 64))
            if self.output == "disparity":
                out.append(torch.where(p > 0.01, 1.0 / p.clamp_min(0.01), torch.zeros(())))
            else:
                out.append(p.clamp_min(0))
        return torch.stack(out)


__all__ = ["DepthEstimator", "median_filter", "DEPTH_ANYTHING_SMALL"]
