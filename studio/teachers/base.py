"""The teacher protocol: one interface for every frozen image prior.

A teacher denoises ``x_t`` (latents for latent models, ``[B,3,H,W]`` images in [-1, 1] for pixel
models) at integer timesteps ``t`` under a text condition, and says how to get there from images in
[0, 1] (:meth:`ImageTeacher.encode`) and back (:meth:`ImageTeacher.decode`). Its
:class:`~studio.teachers.schedule.NoiseSchedule` does all noise arithmetic.

Classifier-free guidance (CFG) convention, used by :meth:`ImageTeacher.predict`::

    pred_cfg = pred_uncond + w * (pred_cond - pred_uncond)

in the model's **own parameterisation** (``schedule.prediction_type``: epsilon for SD, v for SD 2.1-768,
velocity for Wan -- each pipeline's convention; ``w = 1`` is the plain conditional prediction and runs a
single branch), then converted to the requested output. The unconditional branch uses
``TextCond.negative_embeds`` (the empty prompt unless a negative prompt is given). Because every
parameterisation is affine in the prediction at fixed ``(x_t, t)``, guiding in one and converting equals
converting and guiding wherever the conversion is invertible: the result does not depend on the
parameterisation -- except at a flow model's ``sigma = 1`` (``alpha = 0``, where every flow sampler starts),
where ``eps = x_t`` whatever the model predicts; guiding the native velocity keeps the guidance there. Methods that need the two branches separately
(BSD, DSD, Perp-Neg) call :meth:`ImageTeacher.predict_branches`.

Teachers are frozen: parameters have ``requires_grad=False`` and the module stays in eval mode
(``train()`` is a no-op), so losses never push gradients into them. Gradients still flow through
:meth:`encode`, :meth:`decode` and :meth:`predict` to their *inputs*. For score distillation call
``predict`` under ``torch.no_grad()`` (or on a detached ``x_t``) so no UNet graph is kept.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .schedule import NoiseSchedule, canonical_prediction_type


# --------------------------------------------------------------------------------------- TextCond
def _index_list(items: list, idx) -> list:
    if isinstance(idx, int):
        return [items[idx]]
    if isinstance(idx, slice):
        return items[idx]
    if isinstance(idx, Tensor):
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        return [items[int(i)] for i in idx.reshape(-1).tolist()]
    return [items[int(i)] for i in idx]


def _index_tensor(x: Tensor, idx) -> Tensor:
    if isinstance(idx, int):
        idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
    elif isinstance(idx, (list, tuple)):
        idx = torch.as_tensor(idx, dtype=torch.long)
    if isinstance(idx, Tensor):
        idx = idx.to(x.device)
    return x[idx]


@dataclass
class TextCond:
    """Encoded prompts for a batch of ``B`` samples.

    ``embeds`` / ``negative_embeds``: ``[B, ...]`` (``[B, 77, D]`` for CLIP-conditioned UNets);
    ``texts`` / ``negative_texts``: the ``B`` prompts; ``extra`` / ``negative_extra``: further
    per-sample tensors some teachers need (pooled embeddings, attention masks), each ``[B, ...]``.

    Supports ``len``, indexing (int, slice, index list/tensor, bool mask), :meth:`cat`,
    :meth:`expand` (broadcast a single prompt to a batch), :meth:`interpolate` and :meth:`to`.
    """

    embeds: Tensor
    negative_embeds: Tensor
    texts: list[str]
    negative_texts: list[str] = field(default_factory=list)
    extra: dict[str, Tensor] = field(default_factory=dict)
    negative_extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        B = self.embeds.shape[0]
        if isinstance(self.texts, str):
            self.texts = [self.texts]
        self.texts = list(self.texts)
        if not self.negative_texts:
            self.negative_texts = [""] * B
        self.negative_texts = list(self.negative_texts)
        if self.negative_embeds.shape != self.embeds.shape:
            raise ValueError(f"negative_embeds {tuple(self.negative_embeds.shape)} must match embeds "
                             f"{tuple(self.embeds.shape)}")
        if len(self.texts) != B or len(self.negative_texts) != B:
            raise ValueError(f"TextCond has {B} embeddings but {len(self.texts)} texts / "
                             f"{len(self.negative_texts)} negative texts")
        for name, d in (("extra", self.extra), ("negative_extra", self.negative_extra)):
            for k, v in d.items():
                if v.shape[0] != B:
                    raise ValueError(f"{name}[{k!r}] has batch {v.shape[0]}, expected {B}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def __getitem__(self, idx) -> "TextCond":
        return TextCond(
            _index_tensor(self.embeds, idx), _index_tensor(self.negative_embeds, idx),
            _index_list(self.texts, idx), _index_list(self.negative_texts, idx),
            {k: _index_tensor(v, idx) for k, v in self.extra.items()},
            {k: _index_tensor(v, idx) for k, v in self.negative_extra.items()},
        )

    @staticmethod
    def cat(conds: Sequence["TextCond"]) -> "TextCond":
        """Concatenate along the batch."""
        conds = list(conds)
        if not conds:
            raise ValueError("TextCond.cat needs at least one TextCond")
        keys, nkeys = set(conds[0].extra), set(conds[0].negative_extra)
        if any(set(c.extra) != keys or set(c.negative_extra) != nkeys for c in conds):
            raise ValueError("TextCond.cat: all conditions must carry the same extra tensors")
        return TextCond(
            torch.cat([c.embeds for c in conds]), torch.cat([c.negative_embeds for c in conds]),
            [t for c in conds for t in c.texts], [t for c in conds for t in c.negative_texts],
            {k: torch.cat([c.extra[k] for c in conds]) for k in keys},
            {k: torch.cat([c.negative_extra[k] for c in conds]) for k in nkeys},
        )

    def expand(self, batch_size: int) -> "TextCond":
        """Broadcast to ``batch_size`` samples (a batch of 1 is repeated; otherwise sizes must match)."""
        B = len(self)
        if B == batch_size:
            return self
        if B != 1:
            raise ValueError(f"cannot broadcast a TextCond of {B} prompts to a batch of {batch_size}")
        return self[[0] * batch_size]

    def to(self, device=None, dtype=None) -> "TextCond":
        def mv(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        return TextCond(mv(self.embeds), mv(self.negative_embeds), self.texts, self.negative_texts,
                        {k: mv(v) for k, v in self.extra.items()}, {k: mv(v) for k, v in self.negative_extra.items()})

    def interpolate(self, other: "TextCond", w: float | Tensor) -> "TextCond":
        """Linear blend ``(1 - w) * self + w * other`` of embeddings (and negative embeddings / extras).

        ``w``: a float or a ``[B]`` tensor of per-sample weights (each side broadcasts from a batch of
        1). ``texts`` take the nearer side's text (``self`` where ``w < 0.5``).
        """
        B = max(len(self), len(other), (w.numel() if isinstance(w, Tensor) else 1))
        a, b = self.expand(B), other.expand(B)
        if a.embeds.shape[1:] != b.embeds.shape[1:]:
            raise ValueError("cannot interpolate embeddings of different shapes")
        wt = torch.as_tensor(w, dtype=torch.float32, device=a.device).reshape(-1)
        if wt.numel() not in (1, B):
            raise ValueError(f"w has {wt.numel()} entries for a batch of {B}")
        wt = wt.expand(B)

        def mix(x: Tensor, y: Tensor) -> Tensor:
            if not x.is_floating_point():
                return torch.where((wt < 0.5).reshape((-1,) + (1,) * (x.dim() - 1)), x, y)
            ww = wt.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
            return (1 - ww) * x + ww * y

        near_self = (wt < 0.5).tolist()
        return TextCond(
            mix(a.embeds, b.embeds), mix(a.negative_embeds, b.negative_embeds),
            [ta if s else tb for ta, tb, s in zip(a.texts, b.texts, near_self)],
            [ta if s else tb for ta, tb, s in zip(a.negative_texts, b.negative_texts, near_self)],
            {k: mix(a.extra[k], b.extra[k]) for k in a.extra if k in b.extra},
            {k: mix(a.negative_extra[k], b.negative_extra[k]) for k in a.negative_extra if k in b.negative_extra},
        )


def _as_text_list(texts: str | Sequence[str], what: str = "prompt") -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    if not all(isinstance(t, str) for t in out):
        raise TypeError(f"each {what} must be a string")
    return out


# --------------------------------------------------------------------------------------- teacher
class FrozenModule(torch.nn.Module):
    """A frozen network wrapper (teachers, normal estimators): :meth:`freeze` sets ``requires_grad=False`` on
    every parameter, the module stays in eval mode (``train()`` is a no-op), and ``device`` / ``dtype`` read
    its first parameter (or buffer)."""

    def freeze(self):
        """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True):  # noqa: D401 - frozen modules stay in eval
        """Frozen modules always stay in eval mode; ``train()`` is a no-op."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


class ImageTeacher(FrozenModule):
    """Abstract frozen image teacher (text-to-image, novel-view, ...).

    Subclasses set the attributes below and implement :meth:`_embed_texts`, :meth:`_forward`,
    :meth:`encode` and :meth:`decode`; the base class provides prompt caching, CFG batching and
    conversion.

    Attributes:
        schedule: the :class:`NoiseSchedule` of the model (its ``prediction_type`` is what
            ``_forward`` returns).
        latent_channels: channels of ``x_t`` (4 for SD, 3 for pixel models).
        vae_scale_factor: image pixels per latent pixel (8 for SD, 1 for pixel space).
        native_resolution: the image side the model was trained at (512 for SD 2.1-base, 64 for
            DeepFloyd-I / ShapeWorld).
        is_latent: whether ``x_t`` lives in a VAE latent space.
        name: how the teacher was loaded (id, path or registered name).
    """

    schedule: NoiseSchedule
    latent_channels: int = 4
    vae_scale_factor: int = 8
    native_resolution: int = 512
    is_latent: bool = True
    name: str = "teacher"
    #: max number of cached prompt embeddings (least recently used are dropped)
    prompt_cache_size: int = 1024

    def __init__(self) -> None:
        super().__init__()
        self._prompt_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ to implement
    def _embed_texts(self, texts: list[str]) -> Tensor:
        """Embed ``N`` texts -> ``[N, ...]`` (no caching; runs under no_grad)."""
        raise NotImplementedError

    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        """One batched network call: raw output of type ``schedule.prediction_type``, same shape as ``x_t``."""
        raise NotImplementedError

    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B,3,H,W]`` in [0, 1] -> model space ``x0`` (differentiable w.r.t. ``images``)."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Model space ``x0`` -> images ``[B,3,H,W]`` in [0, 1]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts
    def clear_prompt_cache(self) -> None:
        """Forget cached embeddings (call after changing the text encoder, e.g. a text-encoder LoRA)."""
        self._prompt_cache.clear()

    def _embed_cached(self, texts: list[str]) -> Tensor:
        hits = sum(t in self._prompt_cache for t in texts)
        self.cache_hits += hits
        self.cache_misses += len(texts) - hits
        missing = list(OrderedDict.fromkeys(t for t in texts if t not in self._prompt_cache))
        if missing:
            with torch.no_grad():
                embs = self._embed_texts(missing)
            for t, e in zip(missing, embs):
                self._prompt_cache[t] = e.detach()
        out = []
        for t in texts:
            self._prompt_cache.move_to_end(t)
            out.append(self._prompt_cache[t])
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return torch.stack(out)

    def encode_prompt(self, texts: str | Sequence[str], negative: str | Sequence[str] | None = None) -> TextCond:
        """Encode prompts (cached per text) -> :class:`TextCond` with ``B = len(texts)``.

        ``negative``: ``None`` -> the empty prompt (unconditional); a string -> the same negative prompt
        for every sample; a list -> one per sample.
        """
        texts = _as_text_list(texts)
        if not texts:
            raise ValueError("encode_prompt needs at least one prompt")
        if negative is None:
            neg = [""] * len(texts)
        elif isinstance(negative, str):
            neg = [negative] * len(texts)
        else:
            neg = _as_text_list(negative, "negative prompt")
            if len(neg) == 1:
                neg = neg * len(texts)
            if len(neg) != len(texts):
                raise ValueError(f"got {len(neg)} negative prompts for {len(texts)} prompts")
        emb = self._embed_cached(texts + neg)
        return TextCond(emb[: len(texts)], emb[len(texts):], texts, neg)

    # ------------------------------------------------------------------ prediction
    def _prepare(self, x_t: Tensor, t: Tensor | int, cond: TextCond) -> tuple[Tensor, TextCond]:
        if x_t.dim() < 3:
            raise ValueError(f"x_t must be batched [B,C,...], got shape {tuple(x_t.shape)}")
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(B)
        t = t.reshape(-1)
        if t.numel() == 1 and B != 1:
            t = t.expand(B)
        if t.numel() != B:
            raise ValueError(f"got {t.numel()} timesteps for a batch of {B}")
        return t, cond.expand(B).to(device=x_t.device)

    def _raw_branches(self, x_t: Tensor, t: Tensor, cond: TextCond, camera: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(uncond, cond)`` raw network outputs (``schedule.prediction_type``) from one batched call."""
        B = x_t.shape[0]
        x2 = torch.cat([x_t, x_t])
        t2 = torch.cat([t, t])
        emb = torch.cat([cond.negative_embeds, cond.embeds])
        extra = {k: torch.cat([cond.negative_extra[k], cond.extra[k]]) for k in cond.extra if k in cond.negative_extra}
        cam = torch.cat([camera, camera]) if camera is not None else None
        raw = self._forward(x2, t2, emb, cam, extra).to(x_t.dtype)
        return raw[:B], raw[B:]

    def predict_branches(self, x_t: Tensor, t: Tensor | int, cond: TextCond, output: str = "epsilon",
                         camera: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(uncond, cond)`` predictions of type ``output`` from one batched network call.

        The unconditional branch uses ``cond.negative_embeds``. ``camera`` (``[B, ...]``) is passed to
        both branches (camera-conditioned teachers use it; others ignore it).
        """
        t, cond = self._prepare(x_t, t, cond)
        raw_u, raw_c = self._raw_branches(x_t, t, cond, camera)
        src = self.schedule.prediction_type
        return (self.schedule.convert(raw_u, x_t, t, src, output), self.schedule.convert(raw_c, x_t, t, src, output))

    def predict(self, x_t: Tensor, t: Tensor | int, cond: TextCond, guidance_scale: float = 1.0,
                output: str = "epsilon", camera: Tensor | None = None) -> Tensor:
        """Guided prediction at ``(x_t, t)`` converted to ``output`` (epsilon / v_prediction / sample / flow).

        ``guidance_scale == 1`` runs only the conditional branch; otherwise cond and uncond run in one
        batch and ``pred = pred_u + w (pred_c - pred_u)`` in the model's own parameterisation (module doc).
        ``t``: scalar or ``[B]``; ``cond`` with 1 or ``B`` prompts.
        """
        canonical_prediction_type(output)
        t, cond = self._prepare(x_t, t, cond)
        if float(guidance_scale) == 1.0:
            raw = self._forward(x_t, t, cond.embeds, camera, cond.extra).to(x_t.dtype)
        else:
            raw_u, raw_c = self._raw_branches(x_t, t, cond, camera)
            raw = raw_u + float(guidance_scale) * (raw_c - raw_u)
        return self.schedule.convert(raw, x_t, t, self.schedule.prediction_type, output)

    def forward(self, x_t: Tensor, t: Tensor | int, cond: TextCond, guidance_scale: float = 1.0,
                output: str = "epsilon", camera: Tensor | None = None) -> Tensor:
        return self.predict(x_t, t, cond, guidance_scale, output, camera)

    # ------------------------------------------------------------------ helpers
    def latent_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Latent ``(h, w)`` for an image size."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return h // self.vae_scale_factor, w // self.vae_scale_factor

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, schedule={self.schedule!r}, latent_channels={self.latent_channels}, "
                f"vae_scale_factor={self.vae_scale_factor}, native_resolution={self.native_resolution}")
