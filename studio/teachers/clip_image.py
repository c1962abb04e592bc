"""CLIP image metrics for personalised editing (DreamSteerer, spec dreamsteerer.md 10.2).

:class:`ClipImageScorer` wraps the real ``transformers.CLIPModel`` (``openai/clip-vit-base-patch32`` or
``openai/clip-vit-large-patch14`` for the paper's CLIP-I; any folder saved with ``save_pretrained``):

* :meth:`ClipImageScorer.clip_i` -- **CLIP-I** (paper metric): cosine of the L2-normalised image embeddings of
  the edit and each reference image of the concept, averaged over the references (spec 12.9: mean, not best
  match);
* :meth:`ClipImageScorer.feature_distance` -- an **LPIPS-style** distance (not in the paper; the paper's LPIPS
  needs the ``lpips`` package's AlexNet / VGG weights): LPIPS's formula -- unit-normalise each layer's features
  over channels, squared difference, spatial mean, mean over layers -- on the CLIP vision tower's hidden states
  (patch tokens), with uniform layer weights (LPIPS's learned linear heads are not available). Uncalibrated:
  compare values only within one model.

Preprocessing is CLIP's own (bicubic resize of the shorter side and centre crop to the vision tower's
``image_size``, CLIP mean / std), written out here so no processor file is needed.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .diffusers_sd import looks_local, short_error

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageScorer:
    def __init__(self, model) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.size = int(model.config.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> "ClipImageScorer":
        from transformers import CLIPModel

        src = os.fspath(id_or_path)
        try:
            model = CLIPModel.from_pretrained(src, local_files_only=looks_local(src) or None)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"CLIP model {src!r} could not be loaded: {short_error(e)}; give a folder saved with "
                            "CLIPModel.save_pretrained or an id such as openai/clip-vit-base-patch32") from None
        return cls(model.to(device))

    def preprocess(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W] in [0,1], got {tuple(images.shape)}")
        x = images.float()
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).reshape(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype).reshape(1, 3, 1, 1)
        dev = next(self.model.parameters()).device
        return ((x - mean) / std).to(dev)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[B, D]``."""
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        e = out if isinstance(out, Tensor) else out.pooler_output
        return F.normalize(e.float(), dim=-1)

    def clip_i(self, images: Tensor, references: Tensor) -> Tensor:
        """``[B]``: mean over references of ``cos(E(image), E(reference))``."""
        return (self.embed(images) @ self.embed(references).T).mean(1)

    @torch.no_grad()
    def feature_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS-style distance ``[B]`` on the vision tower's hidden states (module doc)."""
        if a.shape != b.shape:
            raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        vm = self.model.vision_model
        ha = vm(pixel_values=self.preprocess(a), output_hidden_states=True).hidden_states[1:]
        hb = vm(pixel_values=self.preprocess(b), output_hidden_states=True).hidden_states[1:]
        d = []
        for fa, fb in zip(ha, hb):
            fa, fb = F.normalize(fa[:, 1:].float(), dim=-1), F.normalize(fb[:, 1:].float(), dim=-1)
            d.append((fa - fb).pow(2).sum(-1).mean(-1))
        return torch.stack(d).mean(0)
