"""MCM's adversarial parts (spec 2.2, 2.4 steps 7-9): a projected, text-conditioned frame discriminator on frozen
features, its losses, gradient penalty and the frame samplers that feed it.

**Feature backbones** (:class:`FeatureBackbone` protocol): a frozen network mapping images ``[N,3,H,W]`` in [0, 1]
to a list of token features ``[N, C_i, L_i]``, one per "block" (``channels[i] = C_i``). Gradients flow to the
*images* (the generator's adversarial path), never into the backbone's weights.

* :class:`Dinov2Backbone` -- transformers' ``Dinov2Model`` loaded by path or id (MCM: DINOv2 ViT-S/14, blocks
  ``[2, 5, 8, 11]``): images resized (bilinear) to ``resolution`` (224, a multiple of the patch size), normalised
  with the ImageNet mean / std, and the hidden states *after* the configured transformer blocks (before the final
  layer norm; class token first, then the patch tokens) are the features. Layers after the last configured block
  are dropped at load time (they would never be used).
* :class:`ShapeWorldFeatureBackbone` -- the embedded default: a fixed, seeded, frozen random conv net (3x3
  convolutions + LeakyReLU at strides 1, 2, 2: "blocks" are scales; every pixel / feature-map cell is a token).
  Random conv features are the classic cheap baseline of projected discriminators. It is deliberately *not*
  :func:`~studio.world.video_metrics.frame_features`, which blurs away exactly the blur, noise and block artefacts
  that separate ShapeWorld's low-quality clips (:func:`~studio.world.clips.degrade`) from its high-quality images
  (:func:`~studio.world.clips.hq_images`).

**Discriminator** (:class:`ProjectedDiscriminator`, StyleGAN-T style, written from the description in spec 2.2):
one head per block, ``head_i = Conv1d_k1 -> Residual(Conv1d_k9)`` over tokens (each conv spectrally normalised,
followed by a local batch norm over virtual batches of 8 and LeakyReLU(0.2); the residual block returns
``(x + f(x)) / sqrt(2)``), then a spectral-norm 1x1 projection to ``cmap_dim`` channels. Text conditioning: a linear
map of the text embedding ``c`` ``[N, text_dim]`` (MCM: OpenCLIP ViT-g/14, 1024-d) to ``cmap`` ``[N, cmap_dim]``,
and the per-token logit is ``<feat_l, cmap> / sqrt(cmap_dim)``; the logits of all heads are concatenated,
``[N, sum_i L_i]``. ``text_dim=None`` gives an unconditional discriminator (a 1-channel projection). The input is
augmented with DiffAugment (:func:`diff_augment`: colour, translation, cutout; seeded) while training.

**Losses** (``logits`` are the concatenated per-token logits; means over all of them):

* ``"wgan"`` as MCM implements it, a *floored* WGAN: ``L_D = mean(max(-1, -D(real))) + mean(max(-1, D(fake)))``
  (bounded below by -2; a real logit above 1 or a fake one below -1 gets no gradient); ``L_G = -mean(D(fake))``.
* ``"hinge"``: ``L_D = mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``, ``L_G = -mean(D(fake))``.
* ``"bce"`` (non-saturating): ``L_D = mean(softplus(-D(real))) + mean(softplus(D(fake)))``,
  ``L_G = mean(softplus(-D(fake)))``.

**Gradient penalty** (:func:`gradient_penalty`; MCM's flag says R1, but it is WGAN-GP-like on features):
``x = a real + (1 - a) fake`` with ``a ~ U(0, 1)`` per image; the backbone features of ``x`` (no augmentation, no
grad) are made leaves requiring grad; the penalty is ``mean_images((||d sum(D) / d feats||_2 - 1)^2)``, the norm
taken per image over all blocks' features concatenated (reconstructed: "over the concatenated hooks"). Weight
1e-5, raised x5 by :class:`AdaptiveGPWeight` when the penalty stays large.

**Frames**: :func:`tsn_frame_indices` (TSN segment sampling: one random frame per contiguous segment, increasing),
:func:`video_frames` (pick frames of pixel clips as images) and :func:`decode_random_frames` (differentiable VAE
decode of a few random latent frames of the student's output).

Stop-gradients: the discriminator loss takes ``decode_random_frames(..., grad=False)`` / detached fakes, so it never
reaches the generator; the generator loss reaches the discriminator's parameters only if the caller lets it
(:class:`~studio.train.loop.Trainer` backpropagates each loss into its own optimizer's parameters only).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..seeding import seeded

__all__ = [
    "DISC_LOSSES", "AdaptiveGPWeight", "Dinov2Backbone", "DiscHead", "FeatureBackbone", "ProjectedDiscriminator",
    "ShapeWorldFeatureBackbone", "d_loss", "decode_random_frames", "diff_augment", "g_loss", "gradient_penalty",
    "tsn_frame_indices", "video_frames",
]

DISC_LOSSES = ("wgan", "hinge", "bce")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _check_images(images: Tensor, what: str = "images") -> Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be [N,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    return images


# --------------------------------------------------------------------------------------- backbones
@runtime_checkable
class FeatureBackbone(Protocol):
    """A frozen feature extractor: ``backbone(images [N,3,H,W] in [0,1]) -> [feat_i [N, C_i, L_i]]``."""

    channels: tuple[int, ...]

    def __call__(self, images: Tensor) -> list[Tensor]: ...


class _Frozen(nn.Module):
    """Frozen module: no parameter requires grad and it stays in eval mode (``train()`` is a no-op)."""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)


class Dinov2Backbone(_Frozen):
    """DINOv2 token features from transformers' ``Dinov2Model`` (see the module doc).

    Args:
        path: a local folder (``save_pretrained`` layout) or a Hub id (``facebook/dinov2-small`` for MCM).
        blocks: 0-based transformer blocks whose outputs are the features (MCM: ``(2, 5, 8, 11)``).
        resolution: side the images are resized to (a multiple of the patch size; 224 as StyleGAN-T / MCM).
        dtype: weights dtype (default float32).
    """

    def __init__(self, path: str | Path, blocks: Sequence[int] = (2, 5, 8, 11), resolution: int = 224,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from transformers import Dinov2Model

        try:
            model = Dinov2Model.from_pretrained(str(path), dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a DINOv2 model from {str(path)!r} ({e}); give a folder written by "
                            "Dinov2Model.save_pretrained or a Hub id such as 'facebook/dinov2-small'") from e
        n_layers = int(model.config.num_hidden_layers)
        self.blocks = tuple(int(b) for b in blocks)
        if not self.blocks or any(not 0 <= b < n_layers for b in self.blocks):
            raise UserError(f"DINOv2 blocks must be indices in [0, {n_layers - 1}] (the model has {n_layers} "
                            f"blocks), got {list(blocks)}")
        patch = int(model.config.patch_size)
        if int(resolution) < patch or int(resolution) % patch:
            raise UserError(f"the DINOv2 input resolution must be a positive multiple of the patch size {patch}, "
                            f"got {resolution}")
        model.encoder.layer = model.encoder.layer[: max(self.blocks) + 1]  # later blocks are never used
        self.model = model
        self.resolution = int(resolution)
        self.channels = tuple(int(model.config.hidden_size) for _ in self.blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self._freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        x = _check_images(images)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        dtype = next(self.model.parameters()).dtype
        x = ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).to(dtype)
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        return [hidden[b + 1].transpose(1, 2) for b in self.blocks]

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, resolution={self.resolution}, channels={self.channels[0]}"


class ShapeWorldFeatureBackbone(_Frozen):
    """A fixed, seeded, frozen random conv net for ShapeWorld frames (see the module doc).

    Block ``i`` is a 3x3 convolution (stride 1 for the first, 2 after) followed by LeakyReLU(0.2), applied to the
    previous block's map (the first to ``2 x - 1``); weights Kaiming-normal from ``seed``, biases 0. Its tokens are
    the map's cells: ``[N, channels[i], h_i w_i]``.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32), seed: int = 0) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or min(self.channels) < 1:
            raise UserError(f"ShapeWorldFeatureBackbone channels must be positive, got {list(channels)}")
        convs = []
        with seeded(seed):
            c_in = 3
            for i, c in enumerate(self.channels):
                conv = nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1)
                nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(conv.bias)
                convs.append(conv)
                c_in = c
        self.convs = nn.ModuleList(convs)
        self._freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        x = _check_images(images) * 2 - 1
        out = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            out.append(x.flatten(2))
        return out


# --------------------------------------------------------------------------------------- DiffAugment
def diff_augment(x: Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None,
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> Tensor:
    """Differentiable augmentation (Zhao et al. 2020) of images ``x`` ``[N,3,H,W]`` in [-1, 1], per image:

    * ``color``: brightness ``x + (r1 - 0.5)``, saturation ``m_c + 2 r2 (x - m_c)`` (``m_c``: the pixel's channel
      mean), contrast ``m + (r3 + 0.5)(x - m)`` (``m``: the image mean), ``r ~ U(0, 1)``;
    * ``translation``: integer shift in ``[-s, s]`` pixels along each axis, ``s = round(ratio * size)``, filling
      with 0;
    * ``cutout``: zero a ``round(ratio * H) x round(ratio * W)`` box at a random centre (clipped at the border).

    Draws come from ``generator`` in this order: 3 x ``[N]`` (colour), 2 x ``[N]`` (translation), 2 x ``[N]``
    (cutout), for the policies present. Differentiable in ``x``.
    """
    _check_images(x, "diff_augment input")
    N, _, H, W = x.shape
    dev = _gen_device(generator)
    for p in [s.strip() for s in policy.split(",") if s.strip()]:
        if p == "color":
            r = torch.rand(3, N, generator=generator, device=dev).to(x.device, x.dtype).reshape(3, N, 1, 1, 1)
            x = x + (r[0] - 0.5)
            m = x.mean(dim=1, keepdim=True)
            x = m + (x - m) * (r[1] * 2)
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = m + (x - m) * (r[2] + 0.5)
        elif p == "translation":
            sh, sw = int(H * translation_ratio + 0.5), int(W * translation_ratio + 0.5)
            dy = torch.randint(-sh, sh + 1, (N,), generator=generator, device=dev).to(x.device)
            dx = torch.randint(-sw, sw + 1, (N,), generator=generator, device=dev).to(x.device)
            rows = torch.arange(H, device=x.device)[None] - dy[:, None]   # output row i reads input row i - dy
            cols = torch.arange(W, device=x.device)[None] - dx[:, None]
            valid = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
            b = torch.arange(N, device=x.device)[:, None, None]
            y = x.permute(0, 2, 3, 1)[b, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]
            x = (y * valid[..., None].to(x.dtype)).permute(0, 3, 1, 2)
        elif p == "cutout":
            ch, cw = int(H * cutout_ratio + 0.5), int(W * cutout_ratio + 0.5)
            cy = torch.randint(0, H, (N,), generator=generator, device=dev).to(x.device)
            cx = torch.randint(0, W, (N,), generator=generator, device=dev).to(x.device)
            r = torch.arange(H, device=x.device)[None] - (cy - ch // 2)[:, None]
            c = torch.arange(W, device=x.device)[None] - (cx - cw // 2)[:, None]
            box = ((r >= 0) & (r < ch))[:, :, None] & ((c >= 0) & (c < cw))[:, None, :]
            x = x * (~box)[:, None].to(x.dtype)
        else:
            raise UserError(f"unknown DiffAugment policy {p!r}; use a comma list of color, translation, cutout")
    return x


# --------------------------------------------------------------------------------------- discriminator
class _LocalBatchNorm(nn.Module):
    """Batch norm of ``[N,C,L]`` over virtual batches of ``virtual_bs`` samples: each channel normalised by the
    mean / variance over (samples of its virtual batch, tokens), always with batch statistics, affine."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_bs, self.eps = int(virtual_bs), float(eps)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        parts = []
        for xb in torch.split(x, self.virtual_bs, dim=0):
            mean = xb.mean(dim=(0, 2), keepdim=True)
            var = xb.var(dim=(0, 2), keepdim=True, unbiased=False)
            parts.append((xb - mean) / torch.sqrt(var + self.eps))
        y = torch.cat(parts, dim=0)
        return y * self.weight[None, :, None] + self.bias[None, :, None]


def _sn_conv1d(c_in: int, c_out: int, k: int) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(nn.Conv1d(c_in, c_out, k, padding=k // 2))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, virtual_bs: int) -> None:
        super().__init__()
        self.conv = _sn_conv1d(c_in, c_out, k)
        self.norm = _LocalBatchNorm(c_out, virtual_bs)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class DiscHead(nn.Module):
    """One discriminator head on token features ``[N, C, L]`` -> logits ``[N, L]`` (module doc)."""

    def __init__(self, channels: int, hidden: int, text_dim: int | None, cmap_dim: int = 64,
                 virtual_bs: int = 8) -> None:
        super().__init__()
        self.inp = _Block(channels, hidden, 1, virtual_bs)
        self.res = _Block(hidden, hidden, 9, virtual_bs)
        self.text_dim = None if text_dim is None else int(text_dim)
        self.cmap_dim = int(cmap_dim)
        self.cls = _sn_conv1d(hidden, self.cmap_dim if self.text_dim else 1, 1)
        self.cmapper = nn.Linear(self.text_dim, self.cmap_dim) if self.text_dim else None

    def forward(self, feat: Tensor, text: Tensor | None = None) -> Tensor:
        h = self.inp(feat)
        h = (h + self.res(h)) / math.sqrt(2)
        out = self.cls(h)
        if self.cmapper is None:
            return out[:, 0]
        if text is None:
            raise ValueError("this discriminator is text-conditioned: pass text embeddings [N, text_dim]")
        cmap = self.cmapper(text.to(out.dtype))[:, :, None]
        return (out * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)


class ProjectedDiscriminator(nn.Module):
    """Projected, text-conditioned discriminator on a frozen :class:`FeatureBackbone` (module doc).

    Args:
        backbone: the frozen feature network (kept as a submodule so ``.to()`` moves it, but left out of
            :meth:`state_dict` and of the trainable parameters).
        text_dim: width of the text embeddings (``None``: unconditional).
        cmap_dim: projection width (64).
        hidden: head width (default: each block's own channel count, as StyleGAN-T's heads).
        virtual_bs: virtual batch size of the heads' batch norm (8).
        augment: DiffAugment policy applied to the input while training (``""``: none).
        seed: seeds the heads' initialisation without touching the global RNG (``None``: global RNG).

    ``disc(images, text)`` -> logits ``[N, sum_i L_i]``; ``images`` ``[N,3,H,W]`` in [0, 1]; ``text`` ``[N,
    text_dim]`` (repeat a video's caption embedding for each of its frames). Augmentation runs when ``augment``
    is true (default: ``self.training``) with draws from ``generator``.
    """

    def __init__(self, backbone: nn.Module, text_dim: int | None, cmap_dim: int = 64, *, hidden: int | None = None,
                 virtual_bs: int = 8, augment: str = "color,translation,cutout", seed: int | None = 0) -> None:
        super().__init__()
        chans = tuple(int(c) for c in getattr(backbone, "channels", ()))
        if not chans:
            raise UserError("the discriminator backbone must expose `channels` (one width per feature block)")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.policy = str(augment)
        with seeded(seed):
            self.heads = nn.ModuleList([DiscHead(c, int(hidden or c), text_dim, cmap_dim, virtual_bs)
                                        for c in chans])

    # -- pieces (the gradient penalty uses them separately)
    def features(self, images: Tensor, *, augment: bool | None = None,
                 generator: torch.Generator | None = None) -> list[Tensor]:
        """Backbone features of (optionally DiffAugment-ed) ``images`` in [0, 1]."""
        x = _check_images(images)
        if (self.training if augment is None else augment) and self.policy:
            x = (diff_augment(x * 2 - 1, self.policy, generator) + 1) / 2
        return list(self.backbone(x))

    def head_logits(self, feats: Sequence[Tensor], text: Tensor | None = None) -> Tensor:
        """Concatenated per-token logits of all heads ``[N, sum_i L_i]``."""
        if len(feats) != len(self.heads):
            raise ValueError(f"got {len(feats)} feature blocks for {len(self.heads)} heads")
        return torch.cat([h(f, text) for h, f in zip(self.heads, feats)], dim=1)

    def forward(self, images: Tensor, text: Tensor | None = None, *, augment: bool | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        return self.head_logits(self.features(images, augment=augment, generator=generator), text)

    # -- training state: the heads only
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        self.training = bool(mode)
        self.heads.train(mode)
        self.backbone.train(False)
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        """The heads' tensors only (keys ``heads.*``): the frozen backbone is rebuilt from its source."""
        return self.heads.state_dict(destination=destination, prefix=prefix + "heads.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        sub = {k[len("heads."):]: v for k, v in state_dict.items() if k.startswith("heads.")}
        if strict and len(sub) != len(state_dict):
            extra = [k for k in state_dict if not k.startswith("heads.")]
            raise UserError(f"discriminator state has keys outside its heads (e.g. {extra[:3]}); was it saved "
                            "for another model?")
        return self.heads.load_state_dict(sub, strict=strict, assign=assign)


# --------------------------------------------------------------------------------------- losses
def _kind(kind: str) -> str:
    k = str(kind).lower()
    if k not in DISC_LOSSES:
        raise UserError(f"discriminator loss must be one of {DISC_LOSSES}, got {kind!r}")
    return k


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "wgan") -> Tensor:
    """Discriminator loss (module doc): ``"wgan"`` (floored, MCM), ``"hinge"`` or ``"bce"``."""
    k = _kind(kind)
    if k == "wgan":
        return torch.clamp(-real_logits, min=-1).mean() + torch.clamp(fake_logits, min=-1).mean()
    if k == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: Tensor, kind: str = "wgan") -> Tensor:
    """Generator loss: ``-mean(D(fake))`` (``"wgan"``, ``"hinge"``) or ``mean(softplus(-D(fake)))`` (``"bce"``)."""
    k = _kind(kind)
    if k == "bce":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def gradient_penalty(disc: ProjectedDiscriminator, real: Tensor, fake: Tensor, text: Tensor | None = None, *,
                     generator: torch.Generator | None = None, augment: bool = False) -> Tensor:
    """MCM's feature-space gradient penalty ``mean((||d sum D / d feats||_2 - 1)^2)`` at pixel interpolates
    (module doc). ``real`` / ``fake``: images ``[N,3,H,W]`` (detached); ``a ~ U(0,1)`` per image from
    ``generator`` (first draw; then DiffAugment's draws if ``augment``). Differentiable in the heads' parameters
    (``create_graph``), so it trains the discriminator."""
    _check_images(real, "real")
    _check_images(fake, "fake")
    if real.shape != fake.shape:
        raise UserError(f"gradient penalty needs real and fake images of one shape, got {tuple(real.shape)} and "
                        f"{tuple(fake.shape)}")
    N = real.shape[0]
    a = torch.rand(N, generator=generator, device=_gen_device(generator)).to(real.device, real.dtype)
    a = a.reshape(N, 1, 1, 1)
    x = a * real.detach() + (1 - a) * fake.detach()
    with torch.no_grad():
        feats = disc.features(x, augment=augment, generator=generator)
    feats = [f.detach().requires_grad_(True) for f in feats]
    with torch.enable_grad():
        logits = disc.head_logits(feats, text)
        grads = torch.autograd.grad(logits.sum(), feats, create_graph=True)
    sq = sum(g.reshape(N, -1).pow(2).sum(dim=1) for g in grads)
    return ((sq + 1e-12).sqrt() - 1).pow(2).mean()


class AdaptiveGPWeight:
    """MCM's adaptive gradient-penalty weight: starts at ``weight`` (1e-5); :meth:`update` multiplies it by
    ``factor`` (5) when at least ``patience`` (500) steps have passed since the last change (or since step 0) and
    the penalty is ``>= threshold`` (100). Checkpoint it with :meth:`state_dict` / :meth:`load_state_dict`."""

    def __init__(self, weight: float = 1e-5, factor: float = 5.0, patience: int = 500,
                 threshold: float = 100.0) -> None:
        self.weight, self.factor = float(weight), float(factor)
        self.patience, self.threshold = int(patience), float(threshold)
        self.last_change = 0

    def update(self, step: int, penalty: float | Tensor) -> float:
        """Apply the rule at ``step`` with this step's ``penalty``; returns the weight in force afterwards."""
        pen = float(penalty.detach()) if isinstance(penalty, Tensor) else float(penalty)
        if int(step) - self.last_change >= self.patience and pen >= self.threshold:
            self.weight *= self.factor
            self.last_change = int(step)
        return self.weight

    def state_dict(self) -> dict[str, float | int]:
        return {"weight": self.weight, "last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight = float(state["weight"])
        self.last_change = int(state["last_change"])


# --------------------------------------------------------------------------------------- frames
def tsn_frame_indices(num_frames: int, num_sel: int, generator: torch.Generator | None = None) -> Tensor:
    """TSN segment sampling: split ``0..num_frames-1`` into ``num_sel`` contiguous segments (segment ``i`` is
    ``[floor(i F / n), floor((i+1) F / n))``) and draw one frame uniformly in each -> ``num_sel`` strictly
    increasing long indices (MCM's real frames in distillation-only mode: 2, one per half of the clip)."""
    F_, n = int(num_frames), int(num_sel)
    if not 1 <= n <= F_:
        raise UserError(f"cannot sample {num_sel} frames (one per segment) from a clip of {num_frames} frames; "
                        "need 1 <= num_sel <= num_frames")
    edges = [(i * F_) // n for i in range(n + 1)]
    lo = torch.tensor(edges[:-1], dtype=torch.long)
    width = torch.tensor(edges[1:], dtype=torch.long) - lo
    u = torch.rand(n, generator=generator, device=_gen_device(generator)).cpu().to(torch.float64)
    return lo + (u * width).long().clamp(max=width - 1)


def video_frames(videos: Tensor, idx: Tensor | Sequence[int]) -> Tensor:
    """Frames ``idx`` of pixel clips ``[B,F,3,H,W]`` as images ``[B * len(idx), 3, H, W]`` (clip-major: the frames
    of clip 0 first), e.g. ``video_frames(clips, tsn_frame_indices(F, 2, g))``."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [B,F,3,H,W], got shape {tuple(videos.shape)}")
    idx = torch.as_tensor(idx, dtype=torch.long, device=videos.device).reshape(-1)
    return videos[:, idx].reshape(-1, *videos.shape[2:])


def decode_random_frames(teacher: Any, latents: Tensor, n: int = 2, generator: torch.Generator | None = None,
                         grad: bool = True, *, causal: str = "full") -> tuple[Tensor, Tensor]:
    """Decode ``n`` randomly chosen frames of latent clips ``[B,C,F',h,w]`` with ``teacher.decode`` (the VAE; model
    space latents, so the VAE scaling factor is undone there) -> ``(images [B * n, 3, H, W] in [0, 1], idx)``.

    ``idx``: ``n`` distinct frame indices in increasing order, shared by the batch (``randperm`` from
    ``generator``); the images are clip-major (clip 0's frames first), so pair them with
    ``text.repeat_interleave(n, 0)``. ``grad=True`` keeps the graph (the generator's adversarial path, spec 2.4
    step 7); ``grad=False`` decodes under ``no_grad`` (the discriminator step on ``sg(y)``).

    Frame-wise VAEs (``teacher.temporal_compression == 1``: ModelScope, AnimateDiff, pixel models) decode only the
    selected latent frames; ``idx`` are latent (= pixel) frames. Causal 3D VAEs (Wan: 4x in time) cannot decode a
    latent frame alone faithfully (each latent frame after the first encodes 4 pixel frames *relative to* its
    predecessors): ``causal="full"`` (default, exact) decodes the whole clip and picks ``n`` of its pixel frames
    (``idx`` are pixel frames; memory grows with the clip); ``causal="independent"`` decodes each selected latent
    frame as a one-frame clip, i.e. as a first frame (cheap, approximate: the VAE's image mode).
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B,C,F,h,w], got shape {tuple(latents.shape)}")
    B, Fl = latents.shape[0], latents.shape[2]
    tc = int(getattr(teacher, "temporal_compression", 1))
    if causal not in ("full", "independent"):
        raise UserError(f"causal must be 'full' or 'independent', got {causal!r}")
    dev = _gen_device(generator)
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        if tc == 1 or causal == "independent":
            if not 1 <= int(n) <= Fl:
                raise UserError(f"cannot pick {n} distinct frames from {Fl} latent frames")
            idx = torch.randperm(Fl, generator=generator, device=dev)[: int(n)].sort().values.cpu()
            sel = latents[:, :, idx.to(latents.device)]
            if tc == 1:
                frames = teacher.decode(sel)                          # [B, n, 3, H, W]
            else:
                frames = torch.cat([teacher.decode(sel[:, :, i:i + 1])[:, :1] for i in range(int(n))], dim=1)
        else:
            video = teacher.decode(latents)                           # [B, F, 3, H, W]
            Fp = video.shape[1]
            if not 1 <= int(n) <= Fp:
                raise UserError(f"cannot pick {n} distinct frames from {Fp} decoded frames")
            idx = torch.randperm(Fp, generator=generator, device=dev)[: int(n)].sort().values.cpu()
            frames = video[:, idx.to(video.device)]
    return frames.reshape(B * int(n), *frames.shape[2:]), idx
