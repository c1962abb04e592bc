"""Text-to-video teachers from diffusers weights: ModelScope T2V, AnimateDiff and Wan 2.1.

Each implements :class:`~studio.teachers.video_base.VideoTeacher` (latents ``[B,C,F',h,w]``, videos ``[B,F,3,H,W]``
in [0, 1]) on the real diffusers / transformers classes and loads, like the SD teacher, from a local folder
(the pipeline's ``save_pretrained`` layout, ``model_index.json`` at the top) or a Hugging Face id:

* :class:`ModelScopeTeacher` -- ``TextToVideoSDPipeline`` layout (``ali-vilab/text-to-video-ms-1.7b``):
  ``UNet3DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder / tokenizer + a DDPM-family scheduler.
* :class:`AnimateDiffTeacher` -- ``AnimateDiffPipeline`` layout (``unet/`` a ``UNetMotionModel``, or a
  ``UNet2DConditionModel`` plus ``motion_adapter/``), or an SD 1.x folder combined with a ``MotionAdapter``:
  ``AnimateDiffTeacher.from_pretrained(sd_path, motion_adapter=adapter_path_or_id)``.
* :class:`WanTeacher` -- ``WanPipeline`` layout (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``):
  ``WanTransformer3DModel`` + ``AutoencoderKLWan`` + ``UMT5EncoderModel`` + tokenizer + a flow scheduler; or the
  **pixel-space** Wan layout (no ``vae``: ``vae`` absent or ``[null, null]`` in ``model_index.json``) the
  studio's tiny ShapeWorld Wan teacher ships in.

The denoiser is ``teacher.denoiser`` (also reachable as ``teacher.unet`` / ``teacher.transformer``); it is looked
up at every call, so a LoRA added to it later (``peft.inject_adapter_in_model``, ``denoiser.add_adapter``) or a
wrapper assigned to ``teacher.denoiser`` is what runs.

How each real model maps onto the protocol
------------------------------------------
All noise arithmetic goes through ``teacher.schedule`` (:class:`~studio.teachers.schedule.NoiseSchedule`).

ModelScope T2V
    ``x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` with ``z0 = scaling_factor * E(frame)`` (the VAE posterior
    mean of each frame on its own, ``scaling_factor = 0.18215``); ``[B,4,F,H/8,W/8]``, ``F' = F``. The UNet is
    called with the integer timestep ``t`` and predicts ``eps`` (the scheduler's ``prediction_type``). Decoding
    is frame-wise ``D(z / scaling_factor)``, as ``TextToVideoSDPipeline.decode_latents``.

AnimateDiff
    The same latent space, VAE scaling and epsilon parameterisation (it is SD 1.5 with temporal motion
    modules). ``UNetMotionModel`` runs the frames as a batch, so the text context is repeated per frame
    (``repeat_interleave(F)``), exactly as ``AnimateDiffPipeline`` does. Noise levels: the scheduler saved in an
    ``AnimateDiffPipeline`` folder; when an SD folder is combined with a motion adapter, the SD scheduler
    config with ``beta_schedule="linear"`` (AnimateDiff's training / inference betas 0.00085 -> 0.012, linear,
    as in its published inference configs and diffusers' AnimateDiff docs; pass ``beta_schedule=None`` to
    keep the SD folder's).

Wan 2.1
    Rectified flow: ``x_t = (1 - s) z0 + s eps`` with ``s = shift u / (1 + (shift - 1) u)``, ``u = (t + 1) / T``
    (``t`` may be a float). The transformer is called with the timestep ``s * T`` (a float, as
    ``FlowMatchEulerDiscreteScheduler.timesteps`` / Wan's flow ``UniPCMultistepScheduler``) and returns the
    velocity ``v = eps - z0 = d x_t / d s`` (prediction type ``"flow"``). Sign check against diffusers:
    ``FlowMatchEulerDiscreteScheduler.step`` returns ``x + (s_next - s) * model_output``; differentiating
    ``x(s) = (1 - s) z0 + s eps`` gives ``dx/ds = eps - z0``, so the model output is ``eps - z0`` (and the
    predicted clean sample is ``x_t - s v``). The causal 3D VAE compresses time by 4 (``F' = (F - 1) // 4 + 1``,
    clips of ``4k + 1`` frames) and space by 8, and the latents are normalised per channel with the VAE
    config's statistics exactly as ``WanPipeline`` does: ``z0 = (E(video) - latents_mean) / latents_std`` on
    the way in (posterior mode, as the video-to-video pipeline) and ``D(z0 * latents_std + latents_mean)`` on
    the way out. The VAE is kept in float32 (diffusers' recommendation for Wan). Text: the prompt is cleaned
    (HTML unescaped, whitespace collapsed, ``ftfy`` when installed), tokenized to ``max_sequence_length``
    (512 as Wan's own code and ``WanPipeline.__call__``, or the tokenizer's ``model_max_length`` if smaller)
    with the attention mask, encoded, and every position beyond the prompt's tokens is set to zero
    (``WanPipeline._get_t5_prompt_embeds``); the transformer attends to the zero rows too, so the length matters. Any
    transformers text encoder works whose ``last_hidden_state`` width equals the transformer's ``text_dim``
    (``UMT5EncoderModel`` for the real model; the pixel-space ShapeWorld teacher may use a tiny
    ``CLIPTextModel`` + ``CLIPTokenizer``; the class is read from ``model_index.json``). Wan 2.2's two-expert
    (``transformer_2``) and ``expand_timesteps`` layouts are not supported.

Pixel-space Wan
    Without a VAE, ``x_t`` lives in pixel space: ``z0 = 2 * video - 1`` with frames behind the channels
    (:class:`~studio.teachers.video_base.PixelVideoMixin`: ``latent_channels = 3``, ``vae_scale_factor = 1``,
    ``temporal_compression = 1``); the transformer takes and returns 3 channels. Everything else is as above.

Clip facts
    ``num_frames`` (default clip length), ``native_resolution`` (square side in pixels) and ``frame_rate`` are
    not all in the diffusers configs (Wan's transformer has no sample size). Defaults: ModelScope 16 frames,
    ``unet.sample_size * 8`` px (256), 8 fps; AnimateDiff 16 frames, ``unet.sample_size * 8`` (512), 8 fps; Wan
    81 frames, 480 px, 16 fps; pixel-space Wan 8 frames, 32 px, 8 fps (the ShapeWorld teacher). A folder may
    override them with a ``"_studio": {"num_frames": .., "native_resolution": .., "frame_rate": ..}`` entry in
    ``model_index.json`` (``resolution`` is accepted for ``native_resolution``; diffusers ignores keys starting
    with ``_``); :func:`write_video_facts` writes it. A pixel-space Wan model must be trained on the text
    conditioning of :func:`wan_text_embeddings` (zeros beyond the prompt's tokens) to be sampled correctly.
"""
from __future__ import annotations

import html
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..world.clips import check_video
from .diffusers_sd import (
    DiffusersTeacher,
    default_device,
    load_components,
    load_plan,
    load_with_attempts,
    looks_local,
    read_model_index,
    set_space_facts,
    short_error,
    transformers_dtype_kw,
)
from .schedule import NoiseSchedule, canonical_prediction_type
from .video_base import PixelVideoMixin, VideoTeacher, batch_to_frames, check_latents, frames_to_batch

__all__ = [
    "ANIMATEDIFF_ADAPTER",
    "MODELSCOPE_T2V",
    "SD15",
    "WAN21_T2V_13B",
    "AnimateDiffTeacher",
    "ModelScopeTeacher",
    "WanTeacher",
    "read_video_facts",
    "video_layout",
    "wan_text_embeddings",
    "write_video_facts",
]

MODELSCOPE_T2V = "ali-vilab/text-to-video-ms-1.7b"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ANIMATEDIFF_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
WAN21_T2V_13B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

#: ``model_index.json`` ``_class_name`` -> layout name used by :func:`video_layout`
PIPELINE_LAYOUTS = {"TextToVideoSDPipeline": "modelscope", "AnimateDiffPipeline": "animatediff",
                    "WanPipeline": "wan"}

FACTS_KEY = "_studio"
_FACT_NAMES = ("num_frames", "native_resolution", "frame_rate")


# --------------------------------------------------------------------------------------- folder facts
def read_video_facts(index: Mapping | None) -> dict[str, int]:
    """The optional clip facts (``num_frames``, ``native_resolution`` -- alias ``resolution`` --, ``frame_rate``) of
    a ``model_index.json``; other keys under ``"_studio"`` are ignored."""
    facts = (index or {}).get(FACTS_KEY) or {}
    if not isinstance(facts, Mapping):
        return {}
    out = {}
    for k in _FACT_NAMES:
        v = facts.get(k)
        if v is None and k == "native_resolution":
            v = facts.get("resolution")  # accepted alias
        if v is not None:
            out[k] = int(v)
    return out


def read_prediction_type(index: Mapping | None, src: str = "the folder") -> str:
    """What the denoiser of a flow-matching folder outputs: ``"flow"`` (the velocity, Wan's own and the default)
    unless ``model_index.json`` records ``"_studio": {"prediction_type": ...}`` -- ``"sample"`` for a model trained
    with x-prediction on the same noise path (JiT, arXiv 2511.13720; ``scripts/train_shapeworld_video_teacher.py
    --prediction sample``).
    An unknown value raises ``UserError`` naming the folder."""
    facts = (index or {}).get(FACTS_KEY) or {}
    value = facts.get("prediction_type") if isinstance(facts, Mapping) else None
    if value is None:
        return "flow"
    try:
        return canonical_prediction_type(value)
    except ValueError as e:
        raise UserError(f"{src}: model_index.json has _studio.prediction_type {value!r}: {e}") from None


def write_video_facts(folder: str | os.PathLike, *, num_frames: int | None = None,
                      native_resolution: int | None = None, frame_rate: int | None = None) -> Path:
    """Record a video model's clip facts in ``folder/model_index.json`` (under ``"_studio"``, atomically), e.g.
    after ``WanPipeline.save_pretrained`` of a model whose size diffusers' configs do not record. Returns the
    path of ``model_index.json``."""
    from ..io.atomic import atomic_write_text
    from .diffusers_sd import load_model_index_file

    f = Path(folder) / "model_index.json"
    if not f.is_file():
        raise UserError(f"{str(folder)!r} has no model_index.json: save the pipeline with save_pretrained first")
    index = load_model_index_file(f)
    facts = dict(index.get(FACTS_KEY) or {})
    for k, v in (("num_frames", num_frames), ("native_resolution", native_resolution), ("frame_rate", frame_rate)):
        if v is not None:
            if int(v) < 1:
                raise ValueError(f"{k} must be a positive integer, got {v}")
            facts[k] = int(v)
    index[FACTS_KEY] = facts
    atomic_write_text(f, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return f


def _index_entry(index: Mapping, key: str) -> list | None:
    """A component entry ``[library, class]`` of ``model_index.json`` (``None`` when absent or null)."""
    v = index.get(key)
    if not isinstance(v, (list, tuple)) or not v or v[0] is None:
        return None
    return list(v)


def _read_index_or_fail(src: str, lfo: bool, revision: str | None, what: str) -> dict:
    index = read_model_index(src, lfo, revision)
    if index is None:
        raise UserError(f"teacher {src!r} has no model_index.json; give a folder saved with {what}.save_pretrained")
    return index


def _check_pipeline(index: Mapping, src: str, expected: str, needs: tuple[str, ...]) -> None:
    cls_name = index.get("_class_name", "pipeline")
    missing = [c for c in needs if _index_entry(index, c) is None]
    if (cls_name != expected and cls_name in PIPELINE_LAYOUTS) or missing:
        hint = {"modelscope": "ModelScopeTeacher", "animatediff": "AnimateDiffTeacher", "wan": "WanTeacher"}
        extra = (f" (load it with {hint[PIPELINE_LAYOUTS[cls_name]]}, or load_teacher picks the right class)"
                 if cls_name in PIPELINE_LAYOUTS and cls_name != expected else "")
        raise UserError(f"teacher {src!r} is not a {expected} layout: its model_index.json names {cls_name}"
                        f"{' and lacks ' + ', '.join(missing) if missing else ''} (a {expected} needs "
                        f"{', '.join(needs)}){extra}")


def video_layout(name_or_path: str | os.PathLike) -> str | None:
    """Which video teacher ``load_teacher`` should use for ``name_or_path``: ``"modelscope"``, ``"animatediff"``,
    ``"wan"`` or ``None`` (not a video layout). Folders and cached hub ids are judged by ``model_index.json``'s
    ``_class_name``; an uncached hub id by its name (``text-to-video-ms``, ``animatediff`` but not a motion
    adapter, ``wan`` with ``t2v``)."""
    name = os.fspath(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir():
        from .diffusers_sd import load_model_index_file

        f = p / "model_index.json"
        if not f.is_file():
            return None
        try:
            return PIPELINE_LAYOUTS.get(load_model_index_file(f).get("_class_name"))
        except (OSError, ValueError):  # a damaged file: the loader that reads it next names it
            return None
    if looks_local(name):
        return None
    try:
        index = read_model_index(name, True, None)
    except Exception:  # noqa: BLE001 - not cached: judge by the name
        index = None
    if index is not None:
        return PIPELINE_LAYOUTS.get(index.get("_class_name"))
    low = name.lower()
    if "text-to-video-ms" in low:
        return "modelscope"
    if "animatediff" in low and "adapter" not in low:
        return "animatediff"
    if "wan" in low and "t2v" in low:
        return "wan"
    return None


# --------------------------------------------------------------------------------------- helpers
def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _plan(id_or_path, device, dtype, attention_slicing, local_files_only, default_cuda_dtype=None):
    """:func:`load_plan` with a family-specific default CUDA dtype (bf16 for Wan: UMT5 overflows in fp16)."""
    if dtype is None and default_cuda_dtype is not None:
        dev = torch.device(device) if device is not None else default_device()
        if dev.type == "cuda":
            dtype = default_cuda_dtype
    return load_plan(id_or_path, device, dtype, attention_slicing, local_files_only)


def _set_clip_facts(teacher: VideoTeacher, facts: Mapping[str, int], num_frames: int, native_resolution: int,
                    frame_rate: int) -> None:
    teacher.num_frames = int(facts.get("num_frames", num_frames))
    teacher.native_resolution = int(facts.get("native_resolution", native_resolution))
    teacher.frame_rate = int(facts.get("frame_rate", frame_rate))
    try:
        teacher.latent_frames()  # validates num_frames against the temporal compression
    except ValueError as e:
        raise UserError(f"{e} (the clip length recorded under {FACTS_KEY!r} in model_index.json)") from None


def _clean_prompt(text: str) -> str:
    """Wan's prompt normalisation: ``ftfy.fix_text`` (when installed), HTML unescaped twice, whitespace collapsed."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def wan_text_embeddings(text_encoder, tokenizer, texts: list[str], max_sequence_length: int = 512) -> Tensor:
    """Wan's text conditioning ``[N, L, D]`` (``WanPipeline._get_t5_prompt_embeds``), the one rule for training and
    sampling Wan-layout models: prompts cleaned (:func:`_clean_prompt`), tokenized with padding to
    ``L = max_sequence_length`` (truncated), encoded with the attention mask, and every position at or beyond the
    prompt's token count set to zero. Works for any transformers text encoder with ``last_hidden_state``
    (UMT5 for Wan 2.1, CLIP for the ShapeWorld pixel model). Differentiable w.r.t. the encoder's weights."""
    enc = tokenizer([_clean_prompt(t) for t in texts], padding="max_length", max_length=int(max_sequence_length),
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    dev = text_encoder.device
    ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    n = mask.gt(0).sum(dim=1, keepdim=True)
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None] < n
    return hidden * keep[..., None].to(hidden.dtype)


# --------------------------------------------------------------------------------------- UNet video teachers
class _UNetVideoTeacher(VideoTeacher):
    """Shared by ModelScope and AnimateDiff: a UNet over ``[B,C,F,h,w]``, SD's frame-wise ``AutoencoderKL`` and
    CLIP text encoder (their code is :class:`DiffusersTeacher`'s; ``vae=None`` gives pixel space as there)."""

    default_num_frames = 16
    default_frame_rate = 8
    #: frames per VAE call when decoding (memory at full resolution; AnimateDiff's default)
    decode_chunk_size = 16

    def __init__(self, denoiser, vae, text_encoder, tokenizer, schedule: NoiseSchedule, *, name: str,
                 facts: Mapping[str, int] | None = None, attention_slicing: bool | str | int = False) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.schedule = schedule
        self.name = name
        self._truncation_warned = False
        sized = denoiser
        if denoiser.config.sample_size is None:  # no recorded size: ModelScope's 256 px
            factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
            sized = SimpleNamespace(config=SimpleNamespace(sample_size=max(1, 256 // factor)))
        set_space_facts(self, sized, vae)
        self.temporal_compression = 1
        n_in = int(denoiser.config.in_channels)
        if n_in != self.latent_channels:
            what = "no VAE (pixel space: 3 channels)" if vae is None else f"a VAE with {self.latent_channels} channels"
            raise UserError(f"teacher {name!r}: its UNet takes {n_in} input channels but the folder has {what}")
        _set_clip_facts(self, facts or {}, self.default_num_frames, self.native_resolution, self.default_frame_rate)
        if attention_slicing:
            self.set_attention_slicing(attention_slicing)
        self.freeze()

    @property
    def unet(self):
        """The denoiser (``UNet3DConditionModel`` / ``UNetMotionModel``)."""
        return self.denoiser

    def set_attention_slicing(self, slice_size: bool | str | int = "auto") -> None:
        """Sliced attention in the UNet where it supports it; ``False`` restores the default processors."""
        den = self.denoiser
        if slice_size is False or slice_size is None:
            if hasattr(den, "set_default_attn_processor"):
                den.set_default_attn_processor()
            return
        if hasattr(den, "set_attention_slice"):
            den.set_attention_slice("auto" if slice_size is True else slice_size)

    # ------------------------------------------------------------------ protocol
    _embed_texts = DiffusersTeacher._embed_texts  # CLIP, padded to 77 tokens, last hidden state
    _check_images = DiffusersTeacher._check_images

    def _context(self, embeds: Tensor, num_frames: int) -> Tensor:
        """The ``encoder_hidden_states`` the UNet takes for ``B`` clips of ``num_frames`` frames."""
        return embeds

    def _check_x(self, x_t: Tensor) -> None:
        check_latents(x_t, self.latent_channels, "x_t")

    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        self._check_x(x_t)
        den = self.denoiser  # looked up per call: adapters / wrappers added later are used
        dt = _module_dtype(den)
        ctx = self._context(embeds.to(x_t.device, dt), x_t.shape[2])
        out = den(x_t.to(dt), t.to(x_t.device), encoder_hidden_states=ctx, return_dict=False)[0]
        return out.to(x_t.dtype)

    def encode(self, video: Tensor, *, size: int | tuple[int, int] | None = None) -> Tensor:
        """Videos ``[B,F,3,H,W]`` in [0, 1] -> latents ``[B,C,F,h,w]``: each frame through the VAE (posterior mean,
        times ``scaling_factor``), differentiable w.r.t. ``video``. ``size``: resize frames first (pixel-space
        models resize to ``native_resolution`` by default)."""
        video = check_video(video)
        B = video.shape[0]
        z = DiffusersTeacher.encode(self, video.reshape(-1, *video.shape[2:]), size=size)
        return batch_to_frames(z, B)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B,C,F,h,w]`` -> videos ``[B,F,3,H,W]`` in [0, 1], frame-wise in chunks of
        :attr:`decode_chunk_size` frames (differentiable)."""
        latents = check_latents(latents, self.latent_channels)
        B, F = latents.shape[0], latents.shape[2]
        flat = frames_to_batch(latents)
        n = max(1, int(self.decode_chunk_size))
        frames = torch.cat([DiffusersTeacher.decode(self, flat[i: i + n]) for i in range(0, flat.shape[0], n)])
        return frames.reshape(B, F, *frames.shape[1:])


class ModelScopeTeacher(_UNetVideoTeacher):
    """ModelScope text-to-video (``UNet3DConditionModel``, epsilon, SD's VAE frame-wise); see the module doc."""

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = MODELSCOPE_T2V, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        attention_slicing: bool | str | int | None = None, local_files_only: bool | None = None,
                        revision: str | None = None, variant: str | None = None) -> ModelScopeTeacher:
        """Load a ``TextToVideoSDPipeline`` folder or hub id (default ``ali-vilab/text-to-video-ms-1.7b``).

        ``device`` (default CUDA when available), ``dtype`` (default fp16 on CUDA, else fp32),
        ``attention_slicing`` (default on for CUDA), ``local_files_only``, ``revision`` and ``variant`` (the hub
        model ships ``"fp16"``) as in :meth:`DiffusersTeacher.from_pretrained`.

        Raises:
            UserError: the folder / id does not exist, cannot be downloaded, or is not that layout.
        """
        name, dev, dt, slicing, local, src, attempts = _plan(id_or_path, device, dtype, attention_slicing,
                                                             local_files_only)
        comps, facts = load_with_attempts(
            lambda lfo: _load_modelscope(src, dt, lfo, revision, variant), attempts, local, name, src,
            "give a folder saved with TextToVideoSDPipeline.save_pretrained (unet, vae, text_encoder, tokenizer, "
            "scheduler)")
        teacher = cls(*comps, name=name, facts=facts)
        teacher.to(dev)
        if slicing:
            teacher.set_attention_slicing(slicing)
        return teacher


class AnimateDiffTeacher(_UNetVideoTeacher):
    """AnimateDiff (SD 1.x ``UNet2DConditionModel`` + ``MotionAdapter`` = ``UNetMotionModel``); see the module doc."""

    def _context(self, embeds: Tensor, num_frames: int) -> Tensor:
        # UNetMotionModel folds the frames into the batch: one copy of the context per frame (AnimateDiffPipeline)
        return embeds.repeat_interleave(num_frames, dim=0)

    def _check_x(self, x_t: Tensor) -> None:
        super()._check_x(x_t)
        limit = getattr(self.denoiser.config, "motion_max_seq_length", None)
        if limit is not None and x_t.shape[2] > int(limit):
            raise ValueError(f"teacher {self.name!r}: its motion modules take at most {limit} frames, got "
                             f"{x_t.shape[2]}")

    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = SD15, *, motion_adapter: Any = None,
                        beta_schedule: str | None = "linear", device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, attention_slicing: bool | str | int | None = None,
                        local_files_only: bool | None = None, revision: str | None = None,
                        variant: str | None = None) -> AnimateDiffTeacher:
        """Load an ``AnimateDiffPipeline`` folder / hub id, or an SD 1.x folder / id combined with a motion adapter.

        Args:
            id_or_path: an ``AnimateDiffPipeline`` layout (``unet/`` holding a ``UNetMotionModel``, or a
                ``UNet2DConditionModel`` plus ``motion_adapter/``); or, with ``motion_adapter``, an SD 1.x layout.
            motion_adapter: a ``MotionAdapter`` folder, hub id (e.g. ``guoyww/animatediff-motion-adapter-v1-5-2``)
                or instance to combine with the SD model in ``id_or_path``.
            beta_schedule: only with ``motion_adapter``: the beta schedule replacing the SD scheduler's
                (default ``"linear"``, AnimateDiff's; ``None`` keeps the SD folder's).
            device, dtype, attention_slicing, local_files_only, revision, variant: as in
                :meth:`DiffusersTeacher.from_pretrained` (``revision`` / ``variant`` apply to ``id_or_path``).

        Raises:
            UserError: a folder / id / adapter that does not exist, cannot be downloaded, or does not fit.
        """
        name, dev, dt, slicing, local, src, attempts = _plan(id_or_path, device, dtype, attention_slicing,
                                                             local_files_only)
        if motion_adapter is None:
            load = lambda lfo: _load_animatediff(src, dt, lfo, revision, variant)
            hint = ("give a folder saved with AnimateDiffPipeline.save_pretrained (unet, motion_adapter, vae, "
                    "text_encoder, tokenizer, scheduler), or an SD 1.x folder with motion_adapter=")
        else:
            adapter = _adapter_source(motion_adapter)
            load = lambda lfo: _load_sd_with_adapter(src, adapter, dt, lfo, revision, variant, beta_schedule)
            hint = ("give an SD 1.x folder (StableDiffusionPipeline.save_pretrained) and a MotionAdapter folder or "
                    "hub id whose block channels match the SD UNet")
            name = f"{name}+{adapter if isinstance(adapter, str) else 'motion_adapter'}"
        comps, facts = load_with_attempts(load, attempts, local, name, src, hint)
        teacher = cls(*comps, name=name, facts=facts)
        teacher.to(dev)
        if slicing:
            teacher.set_attention_slicing(slicing)
        return teacher


def _adapter_source(adapter: Any) -> Any:
    """A ``MotionAdapter`` instance, or its folder / hub id checked for existence (local folders)."""
    if isinstance(adapter, torch.nn.Module):
        return adapter
    name = os.fspath(adapter)
    if looks_local(name):
        p = Path(name).expanduser()
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"motion adapter {name!r} not found: give a MotionAdapter folder (config.json + weights, "
                            "from MotionAdapter.save_pretrained) or a hub id such as "
                            f"{ANIMATEDIFF_ADAPTER}")
        return str(p)
    return name


# --------------------------------------------------------------------------------------- Wan
class WanTeacher(VideoTeacher):
    """Wan 2.1 text-to-video (``WanTransformer3DModel``, rectified flow) in latent or pixel space; see the module doc.

    ``vae=None`` makes a pixel-space teacher (:class:`PixelVideoMixin`'s ``encode`` / ``decode``).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, schedule: NoiseSchedule, *, name: str = "wan",
                 facts: Mapping[str, int] | None = None, max_sequence_length: int = 512) -> None:
        super().__init__()
        self.denoiser = transformer
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.schedule = schedule
        self.name = name
        self._truncation_warned = False
        if not schedule.is_flow:
            raise UserError(f"teacher {name!r}: a Wan model needs a flow-matching scheduler (FlowMatchEuler... or "
                            f"UniPC with prediction_type='flow_prediction'), got {schedule!r}")
        cfg = transformer.config
        if vae is None:
            self.latent_channels, self.vae_scale_factor, self.temporal_compression = 3, 1, 1
            self.is_latent = False
            defaults = (8, 32, 8)
        else:
            vcfg = vae.config
            self.latent_channels = int(vcfg.z_dim)
            depth = len(vcfg.dim_mult) - 1
            spatial = 2 ** depth * int(vcfg.get("patch_size") or 1)
            temporal = 2 ** sum(map(bool, vcfg.temperal_downsample))
            self.vae_scale_factor = int(vcfg.get("scale_factor_spatial") or spatial)
            self.temporal_compression = int(vcfg.get("scale_factor_temporal") or temporal)
            self.is_latent = True
            shape = (1, self.latent_channels, 1, 1, 1)
            self.register_buffer("latents_mean", torch.tensor(vcfg.latents_mean, dtype=torch.float32).reshape(shape),
                                 persistent=False)
            self.register_buffer("latents_std", torch.tensor(vcfg.latents_std, dtype=torch.float32).reshape(shape),
                                 persistent=False)
            defaults = (81, 480, 16)
        n_in, n_out = int(cfg.in_channels), int(cfg.out_channels or cfg.in_channels)
        if n_in != self.latent_channels or n_out != self.latent_channels:
            what = ("no VAE (pixel space: 3 channels)" if vae is None
                    else f"a VAE with {self.latent_channels} latent channels")
            raise UserError(f"teacher {name!r}: its transformer takes {cfg.in_channels} and returns "
                            f"{cfg.out_channels} channels but the folder has {what}")
        te_cfg = text_encoder.config
        width = getattr(te_cfg, "d_model", None) or getattr(te_cfg, "hidden_size", None)
        if width is not None and int(width) != int(cfg.text_dim):
            raise UserError(f"teacher {name!r}: its text encoder gives {width}-wide states but the transformer's "
                            f"text_dim is {cfg.text_dim}; give a text encoder matching the transformer")
        limit = int(getattr(tokenizer, "model_max_length", max_sequence_length) or max_sequence_length)
        self.max_sequence_length = int(min(max_sequence_length, limit))
        _set_clip_facts(self, facts or {}, *defaults)
        self.freeze()

    @property
    def transformer(self):
        """The denoiser (``WanTransformer3DModel``)."""
        return self.denoiser

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.denoiser.config.patch_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = WAN21_T2V_13B, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        max_sequence_length: int = 512, local_files_only: bool | None = None,
                        revision: str | None = None, variant: str | None = None,
                        attention_slicing: bool | str | int | None = None) -> WanTeacher:
        """Load a ``WanPipeline`` folder or hub id (default ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``), latent or
        pixel space (a layout without ``vae``).

        ``dtype`` defaults to bfloat16 on CUDA (UMT5 overflows in fp16) and float32 elsewhere; the VAE always
        loads in float32. ``max_sequence_length``: text tokens (512, ``WanPipeline.__call__``'s and Wan's
        own). ``local_files_only``, ``revision``, ``variant`` as in :meth:`DiffusersTeacher.from_pretrained`;
        ``attention_slicing`` is accepted for a uniform call and ignored (the transformer uses SDPA).

        Raises:
            UserError: the folder / id does not exist, cannot be downloaded, or is not a Wan text-to-video layout.
        """
        name, dev, dt, _, local, src, attempts = _plan(id_or_path, device, dtype, False, local_files_only,
                                                       torch.bfloat16)
        comps, facts = load_with_attempts(
            lambda lfo: _load_wan(src, dt, lfo, revision, variant), attempts, local, name, src,
            "give a folder saved with WanPipeline.save_pretrained (transformer, text_encoder, tokenizer, scheduler "
            "and vae; no vae for a pixel-space model)")
        teacher = cls(*comps, name=name, facts=facts, max_sequence_length=max_sequence_length)
        teacher.to(dev)
        return teacher

    # ------------------------------------------------------------------ protocol
    def _embed_texts(self, texts: list[str]) -> Tensor:
        L = self.max_sequence_length
        if not self._truncation_warned:
            longest = max(len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"])
            if longest > L:
                self._truncation_warned = True
                warnings.warn(f"teacher {self.name!r}: prompts longer than {L} tokens are truncated", stacklevel=3)
        return wan_text_embeddings(self.text_encoder, self.tokenizer, texts, L).to(self.dtype)

    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        check_latents(x_t, self.latent_channels, "x_t")
        pt, ph, pw = self.patch_size
        F, h, w = x_t.shape[2:]
        if F % pt or h % ph or w % pw:
            raise ValueError(f"teacher {self.name!r}: x_t frames x size {F}x{h}x{w} must be divisible by the "
                             f"transformer's patch {pt}x{ph}x{pw}")
        den = self.denoiser  # looked up per call: adapters / wrappers added later are used
        dt = _module_dtype(den)
        timestep = self.schedule.model_timestep(t.to(x_t.device)).to(x_t.device)  # sigma(t) * T, as WanPipeline
        out = den(hidden_states=x_t.to(dt), timestep=timestep, encoder_hidden_states=embeds.to(x_t.device, dt),
                  return_dict=False)[0]
        return out.to(x_t.dtype)

    def encode(self, video: Tensor) -> Tensor:
        """Videos ``[B,F,3,H,W]`` in [0, 1] (``F = 4k + 1``) -> normalised latents ``[B,C,F',H/8,W/8]``
        (differentiable). Pixel space: ``2 * video - 1`` resized to ``native_resolution``."""
        if self.vae is None:
            return PixelVideoMixin.encode(self, video)
        video = check_video(video)
        self.latent_frames(video.shape[1])
        H, W = video.shape[-2:]
        f = self.vae_scale_factor
        if H % f or W % f:
            raise ValueError(f"teacher {self.name!r}: frame size {H}x{W} must be divisible by the VAE factor {f}")
        x = (video * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.device, _module_dtype(self.vae))
        z = self.vae.encode(x).latent_dist.mode()
        mean, std = self.latents_mean.to(z), self.latents_std.to(z)
        return ((z - mean) / std).to(video.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B,C,F',h,w]`` -> videos ``[B,F,3,H,W]`` in [0, 1] with ``F = 4 (F' - 1) + 1``
        (differentiable). Pixel space: ``(x + 1) / 2``."""
        if self.vae is None:
            return PixelVideoMixin.decode(self, latents)
        latents = check_latents(latents, self.latent_channels)
        vdt = _module_dtype(self.vae)
        z = latents.to(self.vae.device, vdt)
        z = z * self.latents_std.to(z) + self.latents_mean.to(z)
        video = self.vae.decode(z, return_dict=False)[0]  # [B,3,F,H,W] in [-1, 1]
        return ((video.to(latents.dtype) + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------------------- component loading
def _common(lfo: bool, revision: str | None) -> dict:
    return {"local_files_only": lfo, "revision": revision}


def _clip_side(src: str, index: Mapping, dt: torch.dtype, lfo: bool, revision: str | None, variant: str | None):
    """VAE (``None`` for a pixel-space folder), CLIP text encoder, tokenizer and schedule of an SD-style folder."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    common = _common(lfo, revision)
    vae = (AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dt, variant=variant, **common)
           if _index_entry(index, "vae") else None)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=variant,
                                                 **transformers_dtype_kw(dt), **common)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **common)
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler.load_config(src, subfolder="scheduler", **common))
    return (None if vae is None else vae.eval()), text_encoder.eval(), tokenizer, schedule


def _unet_class(src: str, lfo: bool, revision: str | None) -> str:
    from diffusers import UNet2DConditionModel

    # any model class reads the JSON; the recorded _class_name says which UNet it is
    cfg = UNet2DConditionModel.load_config(src, subfolder="unet", **_common(lfo, revision))
    return str(cfg.get("_class_name", ""))


def _load_modelscope(src: str, dt: torch.dtype, lfo: bool, revision: str | None, variant: str | None):
    from diffusers import UNet3DConditionModel

    index = _read_index_or_fail(src, lfo, revision, "TextToVideoSDPipeline")
    _check_pipeline(index, src, "TextToVideoSDPipeline", ("unet", "text_encoder", "tokenizer", "scheduler"))
    kind = _unet_class(src, lfo, revision)
    if kind and kind != "UNet3DConditionModel":
        raise UserError(f"teacher {src!r}: unet/ holds a {kind}, a ModelScope teacher needs a UNet3DConditionModel")
    unet = UNet3DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, variant=variant,
                                                **_common(lfo, revision))
    vae, text_encoder, tokenizer, schedule = _clip_side(src, index, dt, lfo, revision, variant)
    return (unet.eval(), vae, text_encoder, tokenizer, schedule), read_video_facts(index)


def _load_animatediff(src: str, dt: torch.dtype, lfo: bool, revision: str | None, variant: str | None):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    index = _read_index_or_fail(src, lfo, revision, "AnimateDiffPipeline")
    if index.get("_class_name") != "AnimateDiffPipeline" and "motion_adapter" not in index:
        raise UserError(f"teacher {src!r} is a {index.get('_class_name', 'pipeline')}, not an AnimateDiffPipeline "
                        "layout; to combine an SD 1.x model with a motion adapter pass motion_adapter=<folder or id>")
    _check_pipeline(index, src, "AnimateDiffPipeline", ("unet", "text_encoder", "tokenizer", "scheduler"))
    common = _common(lfo, revision)
    kind = _unet_class(src, lfo, revision)
    if kind == "UNetMotionModel":  # what AnimateDiffPipeline.save_pretrained writes (motion modules included)
        unet = UNetMotionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, variant=variant, **common)
    else:
        if _index_entry(index, "motion_adapter") is None:
            raise UserError(f"teacher {src!r}: unet/ holds a {kind or 'UNet'} and there is no motion_adapter/; an "
                            "AnimateDiff layout needs a UNetMotionModel or a UNet2DConditionModel + MotionAdapter")
        unet2d = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, variant=variant, **common)
        adapter = MotionAdapter.from_pretrained(src, subfolder="motion_adapter", torch_dtype=dt, **common)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter).to(dt)
    vae, text_encoder, tokenizer, schedule = _clip_side(src, index, dt, lfo, revision, variant)
    return (unet.eval(), vae, text_encoder, tokenizer, schedule), read_video_facts(index)


def _load_sd_with_adapter(src: str, adapter: Any, dt: torch.dtype, lfo: bool, revision: str | None,
                          variant: str | None, beta_schedule: str | None):
    from diffusers import DDPMScheduler, MotionAdapter, UNetMotionModel

    unet2d, vae, text_encoder, tokenizer, schedule = load_components(src, dt, lfo, revision, variant)
    if isinstance(adapter, torch.nn.Module):
        motion = adapter
    else:
        adapter_lfo = True if looks_local(adapter) else lfo
        try:
            motion = MotionAdapter.from_pretrained(adapter, torch_dtype=dt, local_files_only=adapter_lfo)
        except Exception as e:  # noqa: BLE001 - one clear message naming the adapter
            raise UserError(f"motion adapter {adapter!r} could not be loaded: {short_error(e)}; give a MotionAdapter "
                            f"folder or a hub id such as {ANIMATEDIFF_ADAPTER}") from None
    try:
        unet = UNetMotionModel.from_unet2d(unet2d, motion).to(dt)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"motion adapter does not fit the UNet of {src!r}: {short_error(e)}; use an adapter trained "
                        "for this SD version (SD 1.x adapters need an SD 1.x model)") from None
    if beta_schedule is not None:
        config = dict(DDPMScheduler.load_config(src, subfolder="scheduler", **_common(lfo, revision)))
        config["beta_schedule"] = beta_schedule
        config.pop("trained_betas", None)
        schedule = NoiseSchedule.from_diffusers(config)
    facts = read_video_facts(read_model_index(src, lfo, revision))
    return (unet.eval(), vae, text_encoder, tokenizer, schedule), facts


def _load_wan(src: str, dt: torch.dtype, lfo: bool, revision: str | None, variant: str | None):
    import transformers
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer

    index = _read_index_or_fail(src, lfo, revision, "WanPipeline")
    _check_pipeline(index, src, "WanPipeline", ("transformer", "text_encoder", "tokenizer", "scheduler"))
    if index.get("_class_name") not in (None, "WanPipeline"):
        raise UserError(f"teacher {src!r} is a {index['_class_name']}, not a WanPipeline (text-to-video) layout")
    if _index_entry(index, "transformer_2") is not None or index.get("expand_timesteps"):
        raise UserError(f"teacher {src!r} is a Wan 2.2 layout (two experts / expanded timesteps); only Wan 2.1-style "
                        "text-to-video models (one transformer) are supported")
    common = _common(lfo, revision)
    transformer = WanTransformer3DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dt, variant=variant,
                                                        **common)
    vae = None
    if _index_entry(index, "vae") is not None:
        vae = AutoencoderKLWan.from_pretrained(src, subfolder="vae", torch_dtype=torch.float32, variant=variant,
                                               **common).eval()
    lib, te_name = (_index_entry(index, "text_encoder") + [None, None])[:2]
    te_cls = getattr(transformers, str(te_name), None) if lib == "transformers" else None
    if te_cls is None or not hasattr(te_cls, "from_pretrained"):
        raise UserError(f"teacher {src!r}: text_encoder {te_name!r} is not a transformers model class")
    text_encoder = te_cls.from_pretrained(src, subfolder="text_encoder", variant=variant,
                                          **transformers_dtype_kw(dt), **common)
    tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **common)
    schedule = NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler.load_config(src, subfolder="scheduler",
                                                                                         **common))
    ptype = read_prediction_type(index, src)
    if ptype != "flow":  # a studio-trained model predicting x0 (or eps) on the flow noise path
        schedule = schedule.with_prediction_type(ptype)
    return (transformer.eval(), vae, text_encoder.eval(), tokenizer, schedule), read_video_facts(index)


# --------------------------------------------------------------------------------------- hub factories
def make_modelscope_t2v(**kw: Any) -> ModelScopeTeacher:
    """ModelScope T2V 1.7B (``ali-vilab/text-to-video-ms-1.7b``)."""
    return ModelScopeTeacher.from_pretrained(MODELSCOPE_T2V, **kw)


def make_animatediff(**kw: Any) -> AnimateDiffTeacher:
    """AnimateDiff: SD 1.5 + ``guoyww/animatediff-motion-adapter-v1-5-2``."""
    kw.setdefault("motion_adapter", ANIMATEDIFF_ADAPTER)
    return AnimateDiffTeacher.from_pretrained(SD15, **kw)


def make_wan21_t2v_13b(**kw: Any) -> WanTeacher:
    """Wan 2.1 T2V 1.3B (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``)."""
    return WanTeacher.from_pretrained(WAN21_T2V_13B, **kw)


def video_teacher_class(layout: str | None):
    """The teacher class of a :func:`video_layout` result."""
    return {"modelscope": ModelScopeTeacher, "animatediff": AnimateDiffTeacher, "wan": WanTeacher}.get(layout)
