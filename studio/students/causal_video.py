"""A causal streaming video student on a Wan-class transformer (Stream-R1's / Self-Forcing's generator, spec 1.3, 3.2).

:class:`CausalWanStudent` owns its **own copy** of a :class:`~studio.teachers.diffusers_video.WanTeacher`'s
``WanTransformer3DModel`` (full fine-tuning, or a peft LoRA on that copy) and runs it block-causally: the latent
frames are cut into blocks of ``block_size`` frames, a block attends to itself and to the blocks before it, never
to later ones. Two ways to run the same network, one the twin of the other:

* **full sequence** (:meth:`CausalWanStudent._forward`, what :func:`~studio.teachers.sampling.causal_block_rollout`
  calls on :meth:`CausalWanStudent.reference`): the whole clip in one call, one timestep *per frame*
  (``frame_timesteps``), the self-attention masked block-causally (token ``q`` sees token ``k`` iff
  ``block(k) <= block(q)``). This is diffusion-forcing training and the O(blocks^2) reference rollout, and the
  forward pass of ODE-regression initialisation (:func:`studio.distill.ode_regression.ode_regression_loss`).
* **streaming** (:meth:`CausalWanStudent.forward_block` with a :class:`StreamingKVCache`): only the current block's
  tokens go through the network; its self-attention reads the keys / values the cache holds for earlier frames,
  and every call writes the block's own keys / values into the cache at the block's frames (overwriting the
  previous call's), so after the rollout's context re-encoding of the clean block (``context_noise``, no grad)
  the cache holds the finished block, exactly as Self-Forcing's ``kv_cache``. With ``local_attn_size`` (frames)
  the cache is a rolling window that keeps the first ``sink_size`` frames for ever (attention sinks, Reward
  Forcing / Stream-R1: 9 and 3) and evicts frames no later block can attend to, so every block attends to the same
  number of keys however long the video already is (:attr:`StreamingKVCache.key_counts` records them).

When the window covers the whole video the two are the same computation (masked keys contribute exactly zero;
only the float summation order differs): ``tests/test_causal_student.py`` checks the streaming rollout against the
reference rollout in float64 and float32.

How the masking is done (the choice, after reading diffusers 0.42's ``transformer_wan.py``):
``WanTransformerBlock.forward`` calls ``attn1(norm_hidden_states, None, None, rotary_emb)`` -- no attention mask
can be passed down, and RoPE is computed for positions ``0..F-1`` of the *input*. Rather than re-writing the
model's forward (patch embedding, time / text embedding, modulation, cross-attention, output head would all be
copied and drift with diffusers versions), each block's **self-attention processor** is replaced
(``attn1.set_processor``, the diffusers AttnProcessor API) by :class:`CausalSelfAttnProcessor`, which reads what
to do from a small per-model state: no state -> it defers to the original ``WanAttnProcessor`` (the copy then
computes exactly what the teacher does, which is what the critic and plain calls get); ``full`` -> the
block-causal boolean mask; ``stream`` -> RoPE at the block's absolute frame positions and the cache's keys /
values prepended. Everything else runs through diffusers' own ``WanTransformer3DModel.forward``; per-frame
timesteps use its per-token timestep path (``timestep`` of shape ``[B, L]``, the Wan 2.2 TI2V path), so the
time modulation of each frame follows that frame's own noise level. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (a mask and a cache work on every device; the original
processor's backend dispatch is kept for unmasked plain calls). LoRA on ``to_q`` / ``to_k`` / ``to_v`` /
``to_out.0`` keeps working because the processor calls those modules.

Reconstructed choices (the Self-Forcing / Reward-Forcing causal Wan code was not available to read here):

* **RoPE positions are absolute** latent-frame indices (the block at frame ``f0`` uses positions
  ``f0..f0+f-1``; cached keys keep the rotation they were written with), as Self-Forcing's ``causal_rope_apply``
  with ``start_frame``. A stream is therefore limited to the transformer's ``rope_max_seq_len`` latent frames
  (1024 for Wan 2.1: about 4 minutes at 16 fps); a longer request raises ``UserError``.
* **The window counts the current block**: ``local_attn_size`` is the number of latent frames one block attends
  to in total (sinks + recent context + itself), as Self-Forcing's ``max_attention_size = local_attn_size *
  frame_tokens`` includes the current block. The recent-context budget is computed with the nominal
  ``block_size``, so a shorter last block attends to no more than a full one.
* Sinks are the first ``sink_size`` *latent frames* of the stream, kept with the keys they were first written
  with (re-encoded clean, like every other cached frame).
* Cached keys / values are stored detached (Self-Forcing writes the cache under ``no_grad``); gradients reach the
  parameters only through the exit-step call of each block.
* ``t_patch`` (the transformer's temporal patch) must be 1, as in every Wan 2.1 model: a token then belongs to one
  latent frame.

:func:`build_stream_networks` builds the three networks of DMD training from one teacher folder, each its own
module: the causal generator (trainable), the critic / fake score (a bidirectional trainable copy,
:class:`WanScore`) and the real score (the frozen teacher itself). :func:`teacher_ode_pairs` makes the
``(noise, teacher ODE trajectory)`` pairs of Self-Forcing's ODE-regression initialisation (its recipe when the
teacher is of another class than the causal student).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..teachers.base import TextCond
from ..teachers.sampling import causal_block_rollout, rollout_timesteps
from ..teachers.video_base import VideoTeacher
from .lora_score import add_lora_adapter
from .video_lora import TeacherClipFacts

__all__ = [
    "WAN_LORA_TARGETS", "CausalSelfAttnProcessor", "CausalWanStudent", "ODEPairs", "StreamNetworks",
    "StreamingKVCache", "WanScore", "attended_frames", "block_causal_mask", "build_stream_networks",
    "teacher_ode_pairs",
]

#: LoRA targets of a Wan transformer: the attention projections (self and cross) and the feed-forward layers
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
ADAPTER_NAME = "stream_lora"
CAUSAL_FORMAT = "studio-causal-wan"


# --------------------------------------------------------------------------------------- masks and windows
def block_causal_mask(num_frames: int, tokens_per_frame: int, block_size: int,
                      device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[L, L]`` self-attention mask (``True`` = may attend) of ``num_frames`` latent frames of
    ``tokens_per_frame`` tokens each, cut into blocks of ``block_size`` frames from frame 0: query token ``q``
    attends to key token ``k`` iff ``block(k) <= block(q)``."""
    frame = torch.arange(int(num_frames), device=device).repeat_interleave(int(tokens_per_frame))
    block = frame // int(block_size)
    return block[None, :] <= block[:, None]


def attended_frames(start: int, block_size: int, local_attn_size: int | None = None,
                    sink_size: int = 0) -> list[int]:
    """The earlier latent frames a block starting at frame ``start`` attends to (besides itself).

    ``local_attn_size=None``: every earlier frame. Otherwise the block attends to ``local_attn_size`` frames in
    all: the first ``sink_size`` frames of the stream (sinks), the most recent ``local_attn_size - block_size -
    sink_size`` frames before it, and itself (see the module doc for this reconstructed convention)."""
    start = int(start)
    if local_attn_size is None:
        return list(range(start))
    recent = int(local_attn_size) - int(block_size) - int(sink_size)
    sinks = range(min(int(sink_size), start))
    recents = range(max(int(sink_size), start - recent), start)
    return sorted(set(sinks) | set(recents))


@dataclass
class StreamingKVCache:
    """Per-layer keys / values of the frames generated so far, stored per latent frame (post-norm, post-RoPE,
    ``[B, tokens_per_frame, heads, head_dim]``, detached), with the rolling window and attention sinks of
    :func:`attended_frames`.

    ``key_counts`` records, for every self-attention call through the cache, ``(block start, number of keys the
    block's queries attend to)`` -- the measure of a block's cost that does not depend on wall time."""

    num_layers: int
    block_size: int
    local_attn_size: int | None = None
    sink_size: int = 0
    tokens_per_frame: int | None = None
    frames: list[dict[int, tuple[Tensor, Tensor]]] = field(default_factory=list)
    key_counts: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.frames:
            self.frames = [{} for _ in range(int(self.num_layers))]
        if int(self.block_size) < 1:
            raise UserError(f"block_size must be >= 1 latent frame, got {self.block_size}")
        if int(self.sink_size) < 0:
            raise UserError(f"sink_size must be >= 0 latent frames, got {self.sink_size}")
        if self.local_attn_size is not None and int(self.local_attn_size) < int(self.block_size) + int(self.sink_size):
            raise UserError(f"local_attn_size={self.local_attn_size} latent frames cannot hold a block of "
                            f"{self.block_size} plus {self.sink_size} sink frames; use local_attn_size >= "
                            f"{int(self.block_size) + int(self.sink_size)} (or None for the whole video)")

    def attended(self, start: int) -> list[int]:
        return attended_frames(start, self.block_size, self.local_attn_size, self.sink_size)

    def read(self, layer: int, start: int) -> tuple[Tensor, Tensor] | None:
        """Cached keys / values of the frames the block at ``start`` attends to (``None`` when there are none)."""
        store = self.frames[layer]
        keep = [f for f in self.attended(start) if f in store]
        missing = [f for f in self.attended(start) if f not in store]
        if missing:
            raise RuntimeError(f"the KV cache lacks frames {missing} the block at frame {start} attends to; "
                               "blocks must be generated in order from frame 0")
        if not keep:
            return None
        return (torch.cat([store[f][0] for f in keep], dim=1), torch.cat([store[f][1] for f in keep], dim=1))

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """Store the block's keys / values (``[B, f * n, H, D]``) at frames ``start..``, overwriting, and evict
        the frames no block from ``start`` on can attend to."""
        store = self.frames[layer]
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"cache entries must be [B, tokens, heads, dim], got {tuple(k.shape)} / {tuple(v.shape)}")
        if self.tokens_per_frame is None:
            raise RuntimeError("StreamingKVCache.tokens_per_frame is not set (the student sets it per call)")
        per = int(self.tokens_per_frame)
        f = k.shape[1] // per
        for i in range(f):
            sl = slice(i * per, (i + 1) * per)
            store[start + i] = (k[:, sl].detach(), v[:, sl].detach())
        if self.local_attn_size is not None:
            needed = set(self.attended(start)) | set(range(start, start + f))
            for old in [x for x in store if x < start and x not in needed]:
                del store[old]

    def cached_frames(self, layer: int = 0) -> list[int]:
        """The frames layer ``layer`` currently holds (sorted)."""
        return sorted(self.frames[layer])

    def reset(self) -> None:
        self.frames = [{} for _ in range(int(self.num_layers))]
        self.key_counts.clear()


@dataclass
class _AttnState:
    """What the causal processors do during one call of the student (``mode=None``: plain bidirectional)."""
    mode: str | None = None       # None | "full" | "stream"
    mask: Tensor | None = None    # full: [L, L] boolean
    rotary: tuple[Tensor, Tensor] | None = None  # stream: RoPE at the block's absolute positions
    cache: StreamingKVCache | None = None
    start: int = 0


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on ``[B, L, H, D]`` (interleaved pairs, as diffusers' ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class CausalSelfAttnProcessor:
    """Self-attention processor of one Wan block for block-causal / cached runs (see the module doc).

    ``state.mode is None`` -> the original processor (plain, bidirectional). Otherwise: projections, RMS norms
    and RoPE as Wan's own processor, then SDPA with the block-causal mask (``full``) or with the cached keys /
    values of the attended earlier frames prepended (``stream``; the block's own keys / values are then written
    into the cache)."""

    def __init__(self, state: _AttnState, layer: int, base: Any) -> None:
        self.state = state
        self.layer = int(layer)
        self.base = base

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None,
                 **kwargs: Any) -> Tensor:
        st = self.state
        if st.mode is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (y.unflatten(2, (attn.heads, -1)) for y in (q, k, v))
        rot = st.rotary if st.mode == "stream" else rotary_emb
        if rot is not None:
            q, k = _rope(q, *rot), _rope(k, *rot)
        mask = None
        if st.mode == "full":
            mask = st.mask
        elif st.mode == "stream":
            cache = st.cache
            past = cache.read(self.layer, st.start)
            cache.write(self.layer, st.start, k, v)
            if past is not None:
                k = torch.cat([past[0].to(k.dtype), k], dim=1)
                v = torch.cat([past[1].to(v.dtype), v], dim=1)
            if self.layer == 0:
                cache.key_counts.append((st.start, int(k.shape[1])))
        else:
            raise RuntimeError(f"unknown attention mode {st.mode!r}")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# --------------------------------------------------------------------------------------- own-copy Wan scores
class WanScore(TeacherClipFacts, VideoTeacher):
    """A Wan denoiser with its **own** copy of a :class:`WanTeacher`'s transformer, trainable: the critic / fake
    score of DMD (bidirectional, one timestep per sample) and the base of :class:`CausalWanStudent`.

    The text encoder, tokenizer, VAE, schedule and clip facts stay the teacher's (read through; the teacher is
    *not* a submodule, so ``parameters()`` / ``state_dict()`` hold only this copy and ``.to()`` moves only it).
    ``lora_rank=None``: full fine-tuning (every transformer parameter trainable); an int: a peft LoRA
    (:data:`WAN_LORA_TARGETS`, ``B = 0`` so it starts as the teacher) on the copy, base weights frozen.
    """

    def __init__(self, teacher: VideoTeacher, *, lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_targets: Iterable[str] = WAN_LORA_TARGETS, seed: int | None = 0,
                 name: str | None = None) -> None:
        super().__init__()
        den = getattr(teacher, "denoiser", None)
        if den is None or type(den).__name__ != "WanTransformer3DModel":
            raise UserError(f"a Wan score needs a Wan teacher (WanTransformer3DModel denoiser); "
                            f"{getattr(teacher, 'name', type(teacher).__name__)!r} has "
                            f"{type(den).__name__ if den is not None else 'no denoiser'}")
        object.__setattr__(self, "teacher", teacher)  # read through, never a submodule
        self.denoiser = copy.deepcopy(den)
        self._name = name or f"{getattr(teacher, 'name', 'wan')}:{type(self).__name__}"
        self.lora_rank = None if lora_rank is None else int(lora_rank)
        self.lora_alpha = None if lora_alpha is None else float(lora_alpha)
        self.lora_targets = tuple(lora_targets)
        if self.lora_rank is None:
            for p in self.denoiser.parameters():
                p.requires_grad_(True)
        else:
            if self.lora_rank < 1:
                raise UserError(f"LoRA rank must be >= 1, got {lora_rank}")
            for p in self.denoiser.parameters():
                p.requires_grad_(False)
            add_lora_adapter(self.denoiser, rank=self.lora_rank, adapter_name=ADAPTER_NAME,
                             target_modules=tuple(lora_targets), seed=seed, alpha=lora_alpha)
            for n, p in self.denoiser.named_parameters():
                p.requires_grad_(f".{ADAPTER_NAME}." in n and ("lora_A" in n or "lora_B" in n))
        torch.nn.Module.train(self, False)

    # ------------------------------------------------------------------ training state
    def train(self, mode: bool = True):  # a trainable copy: train() is real (FrozenModule's is a no-op)
        return torch.nn.Module.train(self, mode)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train (all of the copy's, or its LoRA matrices)."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    # ------------------------------------------------------------------ protocol by delegation
    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.denoiser.config.patch_size)

    def encode_prompt(self, texts: str | Sequence[str], negative: str | Sequence[str] | None = None) -> TextCond:
        return self.teacher.encode_prompt(texts, negative)

    def clear_prompt_cache(self) -> None:
        self.teacher.clear_prompt_cache()

    def encode(self, video: Tensor) -> Tensor:
        return self.teacher.encode(video)

    def decode(self, latents: Tensor) -> Tensor:
        return self.teacher.decode(latents)

    def _model_timesteps(self, t: Tensor, x: Tensor) -> Tensor:
        """``[B]`` or ``[B, F]`` schedule timesteps -> the values the transformer is called with (same shape)."""
        t = torch.as_tensor(t, device=x.device)
        shape = t.shape
        return self.schedule.model_timestep(t.reshape(-1)).reshape(shape).to(x.device)

    def _check(self, x_t: Tensor) -> None:
        pt, ph, pw = self.patch_size
        Fr, h, w = x_t.shape[2:]
        if x_t.dim() != 5 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name}: x_t must be [B,{self.latent_channels},F,h,w], got {tuple(x_t.shape)}")
        if Fr % pt or h % ph or w % pw:
            raise ValueError(f"{self.name}: x_t frames x size {Fr}x{h}x{w} must be divisible by the transformer's "
                             f"patch {pt}x{ph}x{pw}")

    def _call(self, x_t: Tensor, timestep: Tensor, embeds: Tensor) -> Tensor:
        den = self.denoiser
        dt = next(den.parameters()).dtype
        out = den(hidden_states=x_t.to(dt), timestep=timestep, encoder_hidden_states=embeds.to(x_t.device, dt),
                  return_dict=False)[0]
        return out.to(x_t.dtype)

    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        """One bidirectional call (``t`` ``[B]``), exactly the teacher's ``_forward`` on this copy."""
        self._check(x_t)
        return self._call(x_t, self._model_timesteps(t, x_t), embeds)


# --------------------------------------------------------------------------------------- the causal student
class CausalWanStudent(WanScore):
    """Block-causal streaming generator on a copy of a Wan teacher's transformer (see the module doc).

    Args:
        teacher: a :class:`~studio.teachers.diffusers_video.WanTeacher` (latent or pixel space).
        block_size: latent frames per block (Self-Forcing: 3).
        local_attn_size: latent frames one block attends to in all (sinks + recent + itself); ``None``: the whole
            video (Self-Forcing's ``-1``). Reward Forcing / Stream-R1: 9.
        sink_size: first latent frames kept for ever in the rolling window (Reward Forcing / Stream-R1: 3).
        denoising_steps, warp_denoising_step, context_noise: the rollout defaults (spec 1.3).
        lora_rank, lora_alpha, lora_targets, seed: as :class:`WanScore` (``None``: full fine-tuning).
    """

    frame_timesteps = True

    def __init__(self, teacher: VideoTeacher, *, block_size: int = 3, local_attn_size: int | None = None,
                 sink_size: int = 0, denoising_steps: Sequence[int | float] = (1000, 750, 500, 250),
                 warp_denoising_step: bool = True, context_noise: int = 0, lora_rank: int | None = None,
                 lora_alpha: float | None = None, lora_targets: Iterable[str] = WAN_LORA_TARGETS,
                 seed: int | None = 0, name: str | None = None) -> None:
        super().__init__(teacher, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets, seed=seed,
                         name=name)
        if int(self.denoiser.config.patch_size[0]) != 1:
            raise UserError(f"{self.name}: a causal Wan student needs a temporal patch of 1 (every Wan 2.1 model), "
                            f"got patch_size {tuple(self.denoiser.config.patch_size)}")
        self.block_size = int(block_size)
        self.local_attn_size = None if local_attn_size is None else int(local_attn_size)
        self.sink_size = int(sink_size)
        StreamingKVCache(1, self.block_size, self.local_attn_size, self.sink_size)  # validates the window
        self.denoising_steps = tuple(denoising_steps)
        self.warp_denoising_step = bool(warp_denoising_step)
        self.context_noise = int(context_noise)
        self._state = _AttnState()
        for i, blk in enumerate(self.denoiser.blocks):
            blk.attn1.set_processor(CausalSelfAttnProcessor(self._state, i, blk.attn1.processor))

    # ------------------------------------------------------------------ helpers
    def _tokens_per_frame(self, x: Tensor) -> int:
        _, ph, pw = self.patch_size
        return (x.shape[3] // ph) * (x.shape[4] // pw)

    def _frame_timesteps(self, t: Tensor, B: int, Fr: int, device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1:
            if t.numel() == 1 and B != 1:
                t = t.expand(B)
            t = t[:, None].expand(B, Fr)
        if tuple(t.shape) != (B, Fr):
            raise ValueError(f"{self.name}: timesteps must be [B], or [B, F] = [{B}, {Fr}], got {tuple(t.shape)}")
        return t

    def _token_timesteps(self, t_frames: Tensor, x: Tensor) -> Tensor:
        """``[B, F]`` schedule timesteps -> ``[B, L]`` model timesteps, one per token (frame-major tokens)."""
        return self._model_timesteps(t_frames, x).repeat_interleave(self._tokens_per_frame(x), dim=1)

    def _run(self, state: dict, fn, *args):
        prev = {k: getattr(self._state, k) for k in state}
        for k, v in state.items():
            setattr(self._state, k, v)
        try:
            return fn(*args)
        finally:
            for k, v in prev.items():
                setattr(self._state, k, v)

    # ------------------------------------------------------------------ full sequence (reference twin)
    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        """The whole clip in one call with the block-causal mask; ``t`` is ``[B]`` or one timestep per latent
        frame ``[B, F]``. Returns the raw prediction (``schedule.prediction_type``)."""
        self._check(x_t)
        B, _, Fr = x_t.shape[:3]
        tt = self._token_timesteps(self._frame_timesteps(t, B, Fr, x_t.device), x_t)
        mask = block_causal_mask(Fr, self._tokens_per_frame(x_t), self.block_size, x_t.device)
        return self._run({"mode": "full", "mask": mask}, self._call, x_t, tt, embeds)

    def predict_frames(self, x_t: Tensor, t_frames: Tensor, cond: TextCond, output: str = "sample") -> Tensor:
        """Conditional prediction of a whole clip with one timestep per latent frame (``[B, F]``, constant
        within each block), block-causal; converted block by block to ``output`` through the schedule."""
        B, _, Fr = x_t.shape[:3]
        t_frames = self._frame_timesteps(t_frames, B, Fr, x_t.device)
        c = cond.expand(B).to(device=x_t.device)
        raw = self._forward(x_t, t_frames, c.embeds, None, c.extra)
        outs = []
        for f0 in range(0, Fr, self.block_size):
            f1 = min(f0 + self.block_size, Fr)
            tb = t_frames[:, f0]
            outs.append(self.schedule.convert(raw[:, :, f0:f1], x_t[:, :, f0:f1], tb, self.schedule.prediction_type,
                                              output))
        return torch.cat(outs, dim=2)

    def reference(self) -> _FullSequenceView:
        """This student without ``forward_block``: :func:`causal_block_rollout` then takes its generic path,
        re-running the whole context through :meth:`_forward` (block-causal mask) at every call -- the
        O(blocks^2) reference twin of the cached rollout."""
        return _FullSequenceView(self)

    # ------------------------------------------------------------------ streaming (KV cache)
    def init_block_cache(self, batch: int = 1, num_latent_frames: int | None = None,
                         cond: TextCond | None = None) -> StreamingKVCache:
        """An empty :class:`StreamingKVCache` with this student's block size, window and sinks."""
        return StreamingKVCache(len(self.denoiser.blocks), self.block_size, self.local_attn_size, self.sink_size)

    def _block_rotary(self, x: Tensor, start: int) -> tuple[Tensor, Tensor]:
        Fr = x.shape[2]
        limit = int(self.denoiser.config.rope_max_seq_len)
        if start + Fr > limit:
            raise UserError(f"{self.name}: the stream reached latent frame {start + Fr}, beyond the transformer's "
                            f"RoPE table of {limit} frames (rope_max_seq_len); generate a shorter video")
        rope = self.denoiser.rope
        if not all(hasattr(rope, a) for a in ("t_dim", "freqs_cos", "freqs_sin")):  # another RoPE: the long way
            probe = x.new_empty((1, 0, start + Fr) + tuple(x.shape[3:]))
            cos, sin = rope(probe)
            n = Fr * self._tokens_per_frame(x)
            return cos[:, -n:], sin[:, -n:]
        # the block's own frames only (a block's cost must not grow with its start): Wan's table is
        # cat([time, height, width] frequencies); the time part of positions start.. replaces that of 0..
        cos, sin = rope(x.new_empty((1, 0, Fr) + tuple(x.shape[3:])))
        n, td = self._tokens_per_frame(x), int(rope.t_dim)
        out = []
        for table, full in ((cos, rope.freqs_cos), (sin, rope.freqs_sin)):
            t_part = full[start:start + Fr, :td].to(table.device, table.dtype).repeat_interleave(n, dim=0)
            out.append(torch.cat([t_part[None, :, None, :], table[..., td:]], dim=-1))
        return out[0], out[1]

    def forward_block(self, x_block: Tensor, t: Tensor, cond: TextCond, context_frames: Tensor | None,
                      cache: StreamingKVCache | None, guidance_scale: float = 1.0) -> Tensor:
        """The causal block protocol of :func:`causal_block_rollout`: the ``x0`` prediction of the noisy block
        ``x_block`` ``[B,C,f,h,w]`` at timestep ``t`` ``[B]``, attending to the cached earlier frames; the block's
        keys / values are written into ``cache`` at its frames. ``context_frames`` only gives the block's start
        frame (its frame count); its content is already in the cache. CFG (``guidance_scale != 1``) runs the
        negative and positive prompts as one batch of ``2B`` (the cache then holds ``2B`` rows)."""
        if cache is None:
            raise UserError(f"{self.name}: forward_block needs a KV cache (init_block_cache)")
        self._check(x_block)
        B, _, f = x_block.shape[:3]
        start = 0 if context_frames is None else int(context_frames.shape[2])
        cache.tokens_per_frame = self._tokens_per_frame(x_block)
        t = torch.as_tensor(t, device=x_block.device).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        c = cond.expand(B).to(device=x_block.device)
        g = float(guidance_scale)
        x_in, t_in, emb = x_block, t, c.embeds
        if g != 1.0:
            x_in, t_in, emb = torch.cat([x_block, x_block]), torch.cat([t, t]), torch.cat([c.negative_embeds, c.embeds])
        tt = self._token_timesteps(self._frame_timesteps(t_in, x_in.shape[0], f, x_in.device), x_in)
        state = {"mode": "stream", "rotary": self._block_rotary(x_in, start), "cache": cache, "start": start}
        raw = self._run(state, self._call, x_in, tt, emb)
        if g != 1.0:
            raw = raw[:B] + g * (raw[B:] - raw[:B])
        return self.schedule.convert(raw, x_block, t, self.schedule.prediction_type, "sample")

    def rollout(self, cond: str | Sequence[str] | TextCond, num_frames: int | None = None, *, seed: int = 0,
                grad_exit_step: int | Sequence[int] | str | None = None, kv_cache: StreamingKVCache | None = None,
                **kwargs: Any):
        """The Self-Forcing rollout with the KV cache (:func:`causal_block_rollout` with this student's block
        size, denoising steps and context noise). ``grad_exit_step="random"``: one exit step drawn per rollout
        and shared by all blocks (``same_step_across_blocks``, spec 1.3); ``None``: inference under no grad.
        Returns clean latents ``[B,C,F',h,w]`` (see :func:`causal_block_rollout` for the other options)."""
        kwargs.setdefault("block_size", self.block_size)
        kwargs.setdefault("denoising_steps", self.denoising_steps)
        kwargs.setdefault("warp_denoising_step", self.warp_denoising_step)
        kwargs.setdefault("context_noise", self.context_noise)
        return causal_block_rollout(self, cond, num_frames, seed=seed, kv_cache=kv_cache,
                                    grad_exit_step=grad_exit_step, **kwargs)

    # ------------------------------------------------------------------ save / load (student folders)
    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this student on its teacher (what :meth:`save` stores)."""
        return {"block_size": self.block_size, "local_attn_size": self.local_attn_size, "sink_size": self.sink_size,
                "denoising_steps": list(self.denoising_steps), "warp_denoising_step": self.warp_denoising_step,
                "context_noise": self.context_noise, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                "lora_targets": list(self.lora_targets)}

    def save(self, path: str | Path) -> Path:
        """Write the trainable weights (the whole transformer copy, or its LoRA matrices) as safetensors,
        atomically, with :meth:`options` in the metadata (``format = studio-causal-wan``)."""
        import json

        from safetensors.torch import save_file

        from ..io.atomic import atomic_path

        tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in self.denoiser.named_parameters()
                   if p.requires_grad}
        meta = {"format": CAUSAL_FORMAT, "options": json.dumps(self.options()),
                "teacher": str(getattr(self.teacher, "name", ""))}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @staticmethod
    def read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, options)`` of a file written by :meth:`save` (never unpickles)."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path)
        if not p.is_file():
            raise UserError(f"causal student weights '{p}' not found; give a file written by CausalWanStudent.save")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(p))
        except Exception as e:  # any parse failure is a bad file
            raise UserError(f"'{p}' is not a readable safetensors file ({e})") from e
        if meta.get("format") != CAUSAL_FORMAT:
            raise UserError(f"'{p}' is not a causal Wan student (format {meta.get('format')!r}, expected "
                            f"{CAUSAL_FORMAT!r})")
        return tensors, json.loads(meta["options"])

    def load(self, path: str | Path) -> "CausalWanStudent":
        """Load the trainable weights of a file written by :meth:`save` into this student (the same teacher and the
        same full / LoRA choice, else ``UserError``)."""
        tensors, _ = self.read(path)
        expected = {n for n, q in self.denoiser.named_parameters() if q.requires_grad}
        if set(tensors) != expected:
            raise UserError(f"'{path}' holds {len(tensors)} tensors that do not match this student's {len(expected)} "
                            f"trainable ones: another teacher, or LoRA vs full fine-tuning (use the same LoRA rank)")
        self.denoiser.load_state_dict(tensors, strict=False)
        return self

    @classmethod
    def from_file(cls, teacher: VideoTeacher, path: str | Path, **overrides: Any) -> "CausalWanStudent":
        """A student on ``teacher`` with the options stored in ``path`` (``overrides`` win), weights loaded."""
        _, opts = cls.read(path)
        return cls(teacher, **{**opts, **overrides}).load(path)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, block_size={self.block_size}, local_attn_size={self.local_attn_size}, "
                f"sink_size={self.sink_size}, lora_rank={self.lora_rank}")


class _FullSequenceView:
    """A student seen without its KV-cache methods (:meth:`CausalWanStudent.reference`)."""

    _HIDDEN = frozenset({"forward_block", "init_block_cache"})

    def __init__(self, student: CausalWanStudent) -> None:
        object.__setattr__(self, "_student", student)

    def __getattr__(self, name: str) -> Any:
        if name in _FullSequenceView._HIDDEN:
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_student"), name)


# --------------------------------------------------------------------------------------- three networks
class StreamNetworks(NamedTuple):
    generator: CausalWanStudent   # trainable, block-causal
    critic: WanScore              # trainable, bidirectional (the fake score)
    real_score: VideoTeacher      # frozen teacher


def build_stream_networks(teacher: VideoTeacher | str | Path, *, block_size: int = 3,
                          local_attn_size: int | None = None, sink_size: int = 0, lora_rank: int | None = None,
                          critic_lora_rank: int | None = None, lora_alpha: float | None = None, seed: int = 0,
                          **load_kw: Any) -> StreamNetworks:
    """The generator, critic and real score of DMD training from one Wan teacher (a loaded
    :class:`WanTeacher` or a folder / hub id loaded with ``WanTeacher.from_pretrained(**load_kw)``), each its own
    module: the generator and the critic are separate deep copies of the teacher's transformer (no weight is
    shared, so the critic's and the generator's updates never touch each other or the real score), full
    fine-tuning unless ``lora_rank`` / ``critic_lora_rank`` is given; the real score is the teacher, frozen.
    Stream-R1 takes its real score from a larger model (14B) than the students (1.3B); here all three come from
    one folder -- pass ``real_score`` separately when wiring a method if they differ."""
    if not isinstance(teacher, torch.nn.Module):
        from ..teachers.diffusers_video import WanTeacher

        teacher = WanTeacher.from_pretrained(teacher, **load_kw)
    generator = CausalWanStudent(teacher, block_size=block_size, local_attn_size=local_attn_size,
                                 sink_size=sink_size, lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed,
                                 name=f"{teacher.name}:generator")
    critic = WanScore(teacher, lora_rank=critic_lora_rank, lora_alpha=lora_alpha, seed=seed + 1,
                      name=f"{teacher.name}:critic")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return StreamNetworks(generator, critic, teacher)


# --------------------------------------------------------------------------------------- ODE-regression pairs
class ODEPairs(NamedTuple):
    noise: Tensor        # [B,C,F,h,w] the start noise (sigma = 1)
    trajectory: Tensor   # [B,K+1,C,F,h,w]: x at each rollout timestep, then the clean end point x0
    timesteps: list      # the K rollout timesteps (schedule index convention) of trajectory[:, :K]


@torch.no_grad()
def teacher_ode_pairs(teacher: VideoTeacher, cond: str | Sequence[str] | TextCond, *, num_frames: int | None = None,
                      denoising_steps: Sequence[int | float] = (1000, 750, 500, 250), warp_denoising_step: bool = True,
                      substeps: int = 8, guidance_scale: float = 1.0, seed: int = 0,
                      negative: str | Sequence[str] | None = None,
                      size: int | tuple[int, int] | None = None) -> ODEPairs:
    """``(noise, teacher ODE trajectory)`` pairs for ODE-regression initialisation (Self-Forcing's
    ``ode_init``, CausVid's recipe when the teacher is bidirectional / of another class than the student).

    From seeded noise (``teacher.noise(B, num_frames, size, seed)``) the teacher's probability-flow ODE
    ``dx/dsigma = v(x, sigma)`` (flow schedules) is integrated with Euler steps from ``sigma = 1`` to 0 on a grid
    that passes exactly through the sigmas of the rollout timesteps (:func:`rollout_timesteps` of
    ``denoising_steps``): ``substeps`` Euler steps between consecutive rollout levels and from the last one to 0
    (Self-Forcing stores its teacher's 48-step trajectory at those four levels; the sub-grid here is a
    reconstruction with the same end points). ``guidance_scale`` is the teacher's CFG (house convention).
    """
    sched = teacher.schedule
    if not sched.is_flow:
        raise UserError(f"teacher_ode_pairs integrates a flow ODE; {getattr(teacher, 'name', teacher)!r} has a "
                        f"{sched!r} schedule")
    if isinstance(cond, TextCond):
        c = cond
    else:
        c = teacher.encode_prompt([cond] if isinstance(cond, str) else list(cond), negative)
    ts = rollout_timesteps(sched, denoising_steps, warp_denoising_step)
    sig = [float(s) for s in sched.sigma(torch.tensor(ts, dtype=torch.float64))]
    n = max(int(substeps), 1)
    x = teacher.noise(len(c), num_frames, size, seed=seed)
    noise = x.clone()
    levels = ([1.0] if sig[0] < 1.0 - 1e-12 else []) + sig + [0.0]
    states: dict[float, Tensor] = {}
    for a, b in zip(levels[:-1], levels[1:]):
        if a in sig:
            states[a] = x.clone()
        grid = torch.linspace(a, b, n + 1, dtype=torch.float64).tolist()
        for s, s_next in zip(grid[:-1], grid[1:]):
            t = sched.timestep_from_sigma(torch.tensor([s], dtype=torch.float64)).expand(len(c))
            v = teacher.predict(x, t, c, guidance_scale=guidance_scale, output="flow")
            x = (x.float() + (s_next - s) * v.float()).to(x.dtype)
    traj = torch.stack([states[s] for s in sig] + [x], dim=1)
    return ODEPairs(noise, traj, list(ts))
