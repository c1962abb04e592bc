"""Per-object mask tracks for video-to-4D (DreamScene4D spec 1.2; issue 20 part 2): one ``MaskSource`` interface.

A ``MaskSource`` turns a clip ``frames [T,H,W,3]`` (float in [0, 1]) into per-object mask tracks
``[K,T,H,W]`` bool (visible masks, object order fixed by the source) with ``tracks(frames)``, and names its
objects in ``object_names``. Implementations:

* :class:`FileMasks` -- mask folders or mask videos on disk (``studio.world.scenes4d.load_mask_tracks``: one
  PNG folder or mask video per object, the DreamScene4D ``Annotations/<video>/<001..>`` layout);
* :class:`GroundTruthMasks` -- a ``Scene4D``'s ground truth (visible or amodal);
* :class:`SamTrackerMasks` -- the real-model tier: a ``transformers`` ``SamModel`` (SAM / HQ-SAM-class mask
  decoder, loaded by hub id such as ``facebook/sam-vit-base`` or a local folder) prompted with one box per
  object on the first frame and *tracked by box propagation*: frame t is prompted with the box of frame
  t-1's mask (grown by ``margin``), the best of SAM's three masks by predicted IoU is kept. DreamScene4D uses
  DEVA (Grounding-DINO + HQ-SAM + XMem-style propagation, not in transformers); this is the simple
  propagate-by-box substitute. Frames are resized to the model's square input (no padding) and normalised
  with the preprocessor's mean / std (ImageNet defaults when the folder has no ``preprocessor_config.json``);
  mask logits are upsampled bilinearly to the frame and thresholded at 0.

``mask_source(spec, ...)`` picks one: ``"gt"`` (with ``scene=``), a mask folder / video path, or a SAM model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..world.scenes4d import Scene4D, load_mask_tracks

__all__ = ["MaskSource", "FileMasks", "GroundTruthMasks", "SamTrackerMasks", "mask_source", "masks_to_boxes"]


@runtime_checkable
class MaskSource(Protocol):
    """``tracks(frames [T,H,W,3]) -> [K,T,H,W] bool``; ``object_names`` (K names, may be generic)."""

    object_names: list[str]

    def tracks(self, frames: Tensor) -> Tensor: ...


def _check_frames(frames: Tensor) -> Tensor:
    if not isinstance(frames, Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        raise UserError(f"frames must be a tensor [T,H,W,3] in [0,1], got {getattr(frames, 'shape', type(frames))}")
    return frames.float()


class FileMasks:
    """Mask tracks read from disk (see ``load_mask_tracks`` for the accepted layouts)."""

    def __init__(self, masks: str | os.PathLike | Sequence[str | os.PathLike]):
        self.source = masks
        entries = [Path(masks)] if isinstance(masks, (str, os.PathLike)) else [Path(p) for p in masks]
        self.object_names = [p.stem for p in entries]

    def tracks(self, frames: Tensor) -> Tensor:
        T, H, W = _check_frames(frames).shape[:3]
        out = load_mask_tracks(self.source, T, H, W)
        if isinstance(self.source, (str, os.PathLike)) and Path(self.source).is_dir():
            d = Path(self.source)
            subs = sorted(p.stem for p in d.iterdir() if (p.is_dir() and not p.name.startswith(".")) or p.is_file()
                          and p.suffix.lower() in (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"))
            self.object_names = subs if len(subs) == out.shape[0] else [f"{k + 1:03d}" for k in range(out.shape[0])]
        return out


class GroundTruthMasks:
    """A ``Scene4D``'s own masks (``amodal=True``: the amodal ones)."""

    def __init__(self, scene: Scene4D, *, amodal: bool = False):
        self.scene, self.amodal = scene, bool(amodal)
        self.object_names = list(scene.object_names)

    def tracks(self, frames: Tensor) -> Tensor:
        frames = _check_frames(frames)
        m = self.scene.amodal_masks if self.amodal else self.scene.masks
        if tuple(frames.shape[:3]) != tuple(m.shape[1:]):
            raise UserError(f"ground-truth masks are {tuple(m.shape[1:])} (T,H,W) but the frames are "
                            f"{tuple(frames.shape[:3])}; use the scene's own frames")
        return m.clone()


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes ``[...,4]`` ``(x0, y0, x1, y1)`` in pixels (pixel edges) of masks ``[...,H,W]``; an empty mask
    gives ``(0, 0, 0, 0)``."""
    H, W = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)
    ar_h, ar_w = torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32)
    big = 1e9
    y0 = torch.where(rows, ar_h, big).amin(-1)
    y1 = torch.where(rows, ar_h + 1, -big).amax(-1)
    x0 = torch.where(cols, ar_w, big).amin(-1)
    x1 = torch.where(cols, ar_w + 1, -big).amax(-1)
    box = torch.stack([x0, y0, x1, y1], -1)
    empty = ~rows.any(-1)
    return torch.where(empty[..., None], torch.zeros_like(box), box)


class SamTrackerMasks:
    """SAM prompted by boxes, tracked by box propagation (module doc). ``boxes [K,4]`` (x0, y0, x1, y1 pixels of
    the first frame) or ``first_masks [K,H,W]`` (their tight boxes are used); ``margin``: box growth per side as a
    fraction of its size (motion between frames)."""

    def __init__(self, model: str | os.PathLike, *, boxes: Tensor | None = None, first_masks: Tensor | None = None,
                 margin: float = 0.15, device: str | torch.device | None = None, object_names: Sequence[str] | None = None):
        from transformers import SamModel

        if (boxes is None) == (first_masks is None):
            raise UserError("SamTrackerMasks needs exactly one of boxes= (one [x0,y0,x1,y1] per object on the first "
                            "frame) or first_masks= ([K,H,W] first-frame masks)")
        src = os.fspath(model)
        local = os.path.isdir(os.path.expanduser(src))
        try:
            self.model = SamModel.from_pretrained(os.path.expanduser(src) if local else src,
                                                  local_files_only=local).eval()
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not load segmentation model {src!r}: {first[:300]}; give a folder saved with "
                            "transformers SamModel.save_pretrained or a hub id such as facebook/sam-vit-base") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device)
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
        pre = Path(os.path.expanduser(src)) / "preprocessor_config.json"
        if local and pre.is_file():
            cfg = json.loads(pre.read_text())
            scale = 255.0 if float(cfg.get("rescale_factor", 1 / 255)) < 0.5 else 1.0
            mean = [m * scale for m in cfg.get("image_mean", [m / 255 for m in mean])] if "image_mean" in cfg else mean
            std = [s * scale for s in cfg.get("image_std", [s / 255 for s in std])] if "image_std" in cfg else std
        self.mean = torch.tensor(mean).reshape(1, 3, 1, 1) / 255.0
        self.std = torch.tensor(std).reshape(1, 3, 1, 1) / 255.0
        self.boxes0 = boxes.float() if boxes is not None else None
        self.first_masks = first_masks.bool() if first_masks is not None else None
        self.margin = float(margin)
        K = (self.boxes0 if self.boxes0 is not None else self.first_masks).shape[0]
        self.object_names = list(object_names) if object_names is not None else [f"{k + 1:03d}" for k in range(K)]

    @torch.no_grad()
    def segment(self, frame: Tensor, boxes: Tensor) -> Tensor:
        """One frame ``[H,W,3]`` and boxes ``[K,4]`` (pixels) -> masks ``[K,H,W]`` bool."""
        H, W = frame.shape[:2]
        x = F.interpolate(frame.permute(2, 0, 1)[None], size=(self.size, self.size), mode="bilinear",
                          align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(self.device)
        sx, sy = self.size / W, self.size / H
        b = boxes.float() * torch.tensor([sx, sy, sx, sy])
        out = self.model(pixel_values=x, input_boxes=b[None].to(self.device), multimask_output=True)
        logits = out.pred_masks[0].float().cpu()  # [K,3,h,w]
        best = out.iou_scores[0].float().cpu().argmax(-1)  # [K]
        pick = logits[torch.arange(logits.shape[0]), best]
        up = F.interpolate(pick[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        return up > 0

    def tracks(self, frames: Tensor) -> Tensor:
        frames = _check_frames(frames)
        T, H, W = frames.shape[:3]
        if self.first_masks is not None:
            if tuple(self.first_masks.shape[1:]) != (H, W):
                raise UserError(f"first_masks are {tuple(self.first_masks.shape[1:])} but frames are {(H, W)}; give "
                                "first-frame masks at the frame size")
            boxes = masks_to_boxes(self.first_masks)
        else:
            boxes = self.boxes0.clone()
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise UserError(f"boxes must be [K,4] (x0, y0, x1, y1 pixels), got {tuple(boxes.shape)}")
        out = torch.zeros(boxes.shape[0], T, H, W, dtype=torch.bool)
        lim = torch.tensor([W, H, W, H], dtype=torch.float32)
        for t in range(T):
            out[:, t] = self.segment(frames[t], boxes)
            nb = masks_to_boxes(out[:, t])
            ok = (nb[:, 2] > nb[:, 0]) & (nb[:, 3] > nb[:, 1])
            grow = (nb[:, 2:] - nb[:, :2]).repeat(1, 2) * self.margin * torch.tensor([-1.0, -1.0, 1.0, 1.0])
            nb = torch.minimum(torch.clamp_min(nb + grow, 0), lim)
            boxes = torch.where(ok[:, None], nb, boxes)  # an object lost this frame keeps its last box
        return out


def mask_source(spec: str | os.PathLike | Sequence[str | os.PathLike] | MaskSource, *, scene: Scene4D | None = None,
                **kw) -> MaskSource:
    """A ``MaskSource`` from ``"gt"`` / ``"gt-amodal"`` (needs ``scene``), a mask folder / video / list of them,
    a SAM model folder or hub id (``boxes=`` or ``first_masks=`` in ``kw``), or an existing source."""
    if isinstance(spec, MaskSource):
        return spec
    if isinstance(spec, str) and spec in ("gt", "gt-amodal"):
        if scene is None:
            raise UserError(f"mask source {spec!r} reads a ShapeWorld scene's ground truth: pass scene=")
        return GroundTruthMasks(scene, amodal=spec == "gt-amodal")
    if isinstance(spec, (list, tuple)):
        return FileMasks(spec)
    p = Path(os.path.expanduser(os.fspath(spec)))
    if p.is_dir() and (p / "config.json").is_file():
        return SamTrackerMasks(p, **kw)
    if p.exists():
        return FileMasks(p)
    s = os.fspath(spec)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and " " not in s:
        return SamTrackerMasks(s, **kw)
    raise UserError(f"mask source {s!r} is not 'gt', an existing mask folder / video, nor a SAM model folder or hub "
                    "id; pass --masks DIR with one PNG folder or mask video per object")
