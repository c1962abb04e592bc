"""Personalisation of a text-to-image teacher: DreamBooth-LoRA (PlacidDreamer stage 2, DreamSteerer) and, behind
one interface (:func:`personalize` -> :class:`Personalization`), Textual Inversion and Custom Diffusion (the
three baselines of DreamSteerer, spec dreamsteerer.md 9; see the section "the three baselines" below).

PlacidDreamer fine-tunes SD-2.1-base on the 8 enhanced multi-view images of its object with diffusers'
``train_dreambooth_lora.py`` and then distils from the personalised model (spec §2.2 stage 2, §2.7):

* a peft LoRA (rank 4, ``lora_alpha = rank``, peft init ``B = 0``) on the UNet attention projections
  ``to_q, to_k, to_v, to_out.0``; text encoder, VAE and UNet base weights frozen;
* AdamW (diffusers' defaults: betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), lr 1e-4 constant, no
  warmup, gradient-norm clipping 1.0, 400 steps, batch 2;
* instance prompt = the full text prompt, embedded once (``teacher.encode_prompt``, text encoder frozen);
  **no prior preservation** (the class prompt of the official script is never used);
* the standard denoising loss in the teacher's own parameterisation: images resized (shorter side, then
  centre crop) to the teacher's native resolution, encoded once with ``teacher.encode`` (VAE mean, or
  ``x = 2 image - 1`` for pixel-space teachers such as ``shapeworld-unet``), ``t ~ U{0..T-1}``,
  ``x_t = add_noise(x0, eps, t)``, ``MSE(unet(x_t, t, y), schedule.target(x0, eps, t))`` (eps or v).

The LoRA is trained **in place** on ``teacher.unet`` as adapter ``cfg.adapter_name`` ("personal"); other
LoRAs the teacher already holds stay active and frozen. Afterwards the teacher runs with the LoRA at
scale 1.0 for both CFG branches (the adapter is simply part of the UNet, which serves the conditional
and the unconditional branch alike), it is frozen again, and ``teacher.lora_adapters`` /
``set_lora_scale`` / ``unload_lora`` / ``lora_disabled`` know the new adapter. The prompt cache needs no
clearing: only the UNet changes, never the text encoder.

The optimisation runs in the studio's one loop (:class:`~studio.train.loop.Trainer`) as a
:class:`DreamBoothStage`, so a method may also put the stage in front of its distillation stages.

Output (``out``, a folder): ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (exactly what
``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes: ``unet.``-prefixed peft keys plus the
LoRA config as metadata), read back by ``DiffusersTeacher.load_lora(out)`` /
``from_pretrained(..., lora=out)`` or any diffusers pipeline's ``load_lora_weights``;
``dreambooth.json`` (prompt, config, image fingerprint, summary); ``checkpoints/last.safetensors`` (the
Trainer's checkpoint). With ``resume=True`` a finished run whose prompt, images, teacher and config
match is loaded instead of retrained, and an unfinished one continues from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..io.atomic import atomic_path, atomic_write_text
from ..students.lora_score import LORA_TARGETS, add_lora_adapter
from ..teachers.diffusers_sd import peft_adapter_names
from .loop import StepOutput, Trainer, TrainerConfig

__all__ = [
    "PERSONALIZATION_METHODS",
    "Personalization",
    "PersonalizeConfig",
    "PretrainedView",
    "TokenStage",
    "add_concept_token",
    "cross_attention_kv",
    "load_personalization",
    "personalize",
    "LORA_WEIGHT_NAME",
    "META_NAME",
    "DreamBoothConfig",
    "DreamBoothStage",
    "dreambooth_lora",
    "dreambooth_loss",
    "lora_state_dict",
    "prepare_instance_data",
    "save_dreambooth_lora",
]

#: file name diffusers' ``save_lora_weights`` uses (and ``load_lora_weights`` looks for in a folder)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: the run description next to the weights (prompt, config, image fingerprint, summary)
META_NAME = "dreambooth.json"
_FORMAT = "studio-dreambooth-lora/1"


@dataclass
class DreamBoothConfig:
    """DreamBooth-LoRA settings; the defaults are PlacidDreamer's (diffusers' ``train_dreambooth_lora.py``).

    Attributes:
        rank: LoRA rank (``lora_alpha = rank``).
        lr: AdamW learning rate, constant, no warmup.
        steps: optimisation steps.
        batch_size: images per step (drawn without replacement, reshuffled every pass over the images).
        seed: seeds the LoRA initialisation, the image order, timesteps, noise and flips.
        target_modules: UNet module names that get adapters (the attention projections).
        resolution: training image side; ``None``: the teacher's native resolution.
        flip: random horizontal flips (p = 0.5) of the instance images (off in PlacidDreamer).
        max_grad_norm: gradient-norm clipping of the LoRA parameters (diffusers' default 1.0; 0 = off).
        weight_decay / adam_betas / adam_eps: AdamW settings (diffusers' script defaults).
        adapter_name: name of the adapter in the teacher's UNet.
        checkpoint_every: Trainer checkpoint interval in steps when ``out`` is given (0 = only at the end).
    """

    rank: int = 4
    lr: float = 1e-4
    steps: int = 400
    batch_size: int = 2
    seed: int = 0
    target_modules: tuple[str, ...] = LORA_TARGETS
    resolution: int | None = None
    flip: bool = False
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    adapter_name: str = "personal"
    checkpoint_every: int = 100


# --------------------------------------------------------------------------------------- validation
def _teacher_unet(teacher: Any):
    unet = getattr(teacher, "unet", None)
    if unet is None or not hasattr(unet, "add_adapter") or not hasattr(teacher, "_forward"):
        name = getattr(teacher, "name", type(teacher).__name__)
        raise UserError(f"teacher {name!r} has no diffusers UNet to personalise: DreamBooth-LoRA needs a UNet "
                        "teacher (an SD 1.x/2.x model such as sd21-base, or shapeworld-unet); analytic teachers "
                        "such as shapeworld-exact cannot be fine-tuned")
    return unet


def _check_config(cfg: DreamBoothConfig) -> None:
    def positive_int(name: str) -> None:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"DreamBoothConfig.{name} must be a positive integer, got {v!r}")

    for n in ("steps", "batch_size", "rank"):
        positive_int(n)
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"DreamBoothConfig.lr must be a positive number, got {cfg.lr!r}")
    if cfg.resolution is not None:
        positive_int("resolution")
    if not cfg.target_modules:
        raise UserError("DreamBoothConfig.target_modules is empty; give UNet module names such as to_q, to_k, "
                        "to_v, to_out.0")
    if not (isinstance(cfg.max_grad_norm, (int, float)) and cfg.max_grad_norm >= 0):
        raise UserError(f"DreamBoothConfig.max_grad_norm must be >= 0 (0 = no clipping), got {cfg.max_grad_norm!r}")
    if not isinstance(cfg.adapter_name, str) or not cfg.adapter_name.strip():
        raise UserError("DreamBoothConfig.adapter_name must be a non-empty string")


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise UserError(f"instance images must be a tensor [N,3,H,W] in [0,1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"instance images must be [N,3,H,W] in [0,1] (RGB, channels first), got shape "
                        f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        raise UserError("no instance images: DreamBooth needs at least one image of the subject (PlacidDreamer "
                        "uses its 8 generated views)")
    if images.shape[-2] < 2 or images.shape[-1] < 2:
        raise UserError(f"instance images are too small ({images.shape[-2]}x{images.shape[-1]})")
    if not images.is_floating_point():
        raise UserError(f"instance images must be floating point in [0,1], got dtype {images.dtype} (divide uint8 "
                        "images by 255)")
    if not bool(torch.isfinite(images).all()):
        raise UserError("instance images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(f"instance images must lie in [0,1], got values in [{lo:.3g}, {hi:.3g}] (images in [-1,1] "
                        "or [0,255] need rescaling)")
    return images.clamp(0, 1)


# --------------------------------------------------------------------------------------- data and loss
def _square_resize(images: Tensor, res: int) -> Tensor:
    """Shorter side to ``res`` then centre crop (diffusers' Resize + CenterCrop), bilinear."""
    h, w = images.shape[-2:]
    s = min(h, w)
    if h != w:
        top, left = (h - s) // 2, (w - s) // 2
        images = images[..., top:top + s, left:left + s]
    if s != res:
        images = torch.nn.functional.interpolate(images, size=(res, res), mode="bilinear", align_corners=False,
                                                 antialias=s > res)
    return images


@torch.no_grad()
def prepare_instance_data(teacher: Any, images: Tensor, prompt: str, cfg: DreamBoothConfig | None = None
                          ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The fixed training data: ``(x0, x0_flipped or None, text_embeds [1,L,D])``.

    Images are resized to ``cfg.resolution`` (default: the teacher's native resolution) and encoded once
    with ``teacher.encode`` (no grad); the prompt is embedded once with ``teacher.encode_prompt``.
    """
    cfg = cfg or DreamBoothConfig()
    images = _check_images(images)
    res = int(cfg.resolution or teacher.native_resolution)
    f = int(getattr(teacher, "vae_scale_factor", 1))
    if res % f:
        raise UserError(f"DreamBoothConfig.resolution {res} must be divisible by the teacher's VAE factor {f}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("DreamBooth needs the instance prompt (the full text prompt), got an empty prompt")
    x = _square_resize(images.to(device=teacher.device, dtype=torch.float32), res)
    kw = {"size": res} if "size" in inspect.signature(teacher.encode).parameters else {}

    def enc(batch: Tensor) -> Tensor:
        return torch.cat([teacher.encode(batch[i:i + 8], **kw) for i in range(0, batch.shape[0], 8)]).float()

    x0 = enc(x)
    x0_flip = enc(torch.flip(x, dims=[-1])) if cfg.flip else None
    embeds = teacher.encode_prompt([prompt]).embeds.detach()
    return x0, x0_flip, embeds


def dreambooth_loss(teacher: Any, x0: Tensor, text_embeds: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Denoising loss of the teacher's UNet (with its active LoRAs) at fixed ``t [B]`` and ``noise``:
    ``MSE(unet(add_noise(x0, noise, t), t, y), schedule.target(x0, noise, t))`` in the teacher's own
    parameterisation (epsilon or v), float32 mean."""
    sched = teacher.schedule
    t = torch.as_tensor(t, device=x0.device).reshape(-1)
    t = t.expand(x0.shape[0]) if t.numel() == 1 else t
    x_t = sched.add_noise(x0, noise, t)
    emb = text_embeds if text_embeds.shape[0] == x0.shape[0] else text_embeds.expand(x0.shape[0], *text_embeds.shape[1:])
    pred = teacher._forward(x_t, t, emb)
    return torch.nn.functional.mse_loss(pred.float(), sched.target(x0, noise, t).float())


def lora_state_dict(teacher: Any, adapter_name: str = "personal") -> dict[str, Tensor]:
    """The adapter's weights as peft keys of the UNet (no ``unet.`` prefix, adapter name stripped)."""
    from peft.utils import get_peft_model_state_dict

    unet = _teacher_unet(teacher)
    if adapter_name not in peft_adapter_names(unet):
        raise UserError(f"teacher {getattr(teacher, 'name', '?')!r} has no LoRA named {adapter_name!r}")
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_dreambooth_lora(teacher: Any, out: str | Path, adapter_name: str = "personal") -> Path:
    """Write the adapter atomically to ``out/pytorch_lora_weights.safetensors`` in diffusers' LoRA format
    (``StableDiffusionLoraLoaderMixin.save_lora_weights``: ``unet.`` keys, LoRA config metadata). Returns
    the file path."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = _teacher_unet(teacher)
    state = lora_state_dict(teacher, adapter_name)
    meta = unet.peft_config[adapter_name].to_dict()
    target = Path(out) / LORA_WEIGHT_NAME
    with atomic_path(target) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp.parent), unet_lora_layers=state,
                                                         weight_name=tmp.name, safe_serialization=True,
                                                         unet_lora_adapter_metadata=meta)
    return target


# --------------------------------------------------------------------------------------- the stage

def train_only_adapter(teacher, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """Make the UNet LoRA ``adapter_name`` (just added) the only trainable part of ``teacher``'s UNet: it is
    registered with the teacher's adapter scales (so ``set_lora_scale`` / ``unload_lora`` / ``lora_adapters`` know
    it), its A / B weights are float32 and train, every other UNet parameter is frozen. Returns them by name."""
    if isinstance(getattr(teacher, "_lora_scales", None), dict):
        teacher._lora_scales[adapter_name] = 1.0
    tag = f".{adapter_name}."
    params: dict[str, torch.nn.Parameter] = {}
    for n, p in _teacher_unet(teacher).named_parameters():
        train = f"lora_A{tag}" in n or f"lora_B{tag}" in n
        p.requires_grad_(train)
        if train:
            p.data = p.data.to(torch.float32)
            params[n] = p
    return params

class DreamBoothStage:
    """One :class:`~studio.train.loop.Trainer` stage that trains a DreamBooth LoRA on ``teacher.unet`` in place.

    Construction adds the adapter (seeded init, ``B = 0``: the teacher's predictions are unchanged) and
    makes only its weights trainable (float32); :meth:`finish` freezes the teacher again.
    """

    def __init__(self, teacher: Any, images: Tensor, prompt: str, cfg: DreamBoothConfig | None = None, *,
                 name: str = "dreambooth") -> None:
        cfg = cfg or DreamBoothConfig()
        _check_config(cfg)
        unet = _teacher_unet(teacher)
        if cfg.adapter_name in peft_adapter_names(unet):
            raise UserError(f"teacher {getattr(teacher, 'name', '?')!r} already has a LoRA named "
                            f"{cfg.adapter_name!r}; remove it with teacher.unload_lora({cfg.adapter_name!r}) or set "
                            "DreamBoothConfig.adapter_name")
        self.name, self.steps, self.cfg = name, int(cfg.steps), cfg
        self.teacher, self.prompt = teacher, prompt
        self.x0, self.x0_flip, self.embeds = prepare_instance_data(teacher, images, prompt, cfg)
        targets = tuple(cfg.target_modules)
        # (linear layers, or ones a LoRA loaded earlier already wraps)
        if not any((isinstance(m, torch.nn.Linear) or hasattr(m, "base_layer"))
                   and any(n == k or n.endswith("." + k) for k in targets) for n, m in unet.named_modules()):
            raise UserError(f"no LoRA targets {targets} (linear layers) found in the UNet of teacher "
                            f"{getattr(teacher, 'name', '?')!r}; the attention projections are to_q, to_k, to_v, "
                            "to_out.0")
        scales = dict(getattr(teacher, "_lora_scales", {}) or {})
        loaded = getattr(unet, "_hf_peft_config_loaded", None)
        try:
            with warnings.catch_warnings():  # peft's note that the UNet already holds adapters is expected here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                add_lora_adapter(unet, rank=cfg.rank, adapter_name=cfg.adapter_name, target_modules=targets,
                                 scales=scales, seed=cfg.seed)
        except ValueError as e:
            if loaded is not None and not peft_adapter_names(unet):
                unet._hf_peft_config_loaded = loaded  # a failed diffusers add_adapter leaves the flag set
            raise UserError(f"could not add a LoRA on {targets} to teacher {getattr(teacher, 'name', '?')!r}: "
                            f"{e}") from None
        self._params = train_only_adapter(teacher, cfg.adapter_name)
        for p in getattr(teacher, "text_encoder", torch.nn.Module()).parameters():
            p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self.optimizer = torch.optim.AdamW(list(self._params.values()), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if cfg.max_grad_norm > 0:  # clipping between the Trainer's backward and its optimizer step
            params, max_norm = list(self._params.values()), float(cfg.max_grad_norm)

            def clip(*_: Any) -> None:
                torch.nn.utils.clip_grad_norm_(params, max_norm)

            self.optimizer.register_step_pre_hook(clip)

    # ---------------------------------------------------------------- Stage protocol
    @property
    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable LoRA tensors by UNet parameter name."""
        return dict(self._params)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"lora": self.optimizer}

    def _next_indices(self) -> Tensor:
        n, out = self.x0.shape[0], []
        while len(out) < self.cfg.batch_size:
            if self._cursor >= self._order.numel():
                self._order = torch.randperm(n, generator=self.generator)
                self._cursor = 0
            out.append(int(self._order[self._cursor]))
            self._cursor += 1
        return torch.tensor(out, dtype=torch.long)

    def train_step(self, step: int, progress: float):
        idx = self._next_indices()
        x0 = self.x0[idx.to(self.x0.device)]
        if self.x0_flip is not None:
            flip = (torch.rand(idx.numel(), generator=self.generator) < 0.5).to(x0.device)
            x0 = torch.where(flip.reshape(-1, 1, 1, 1), self.x0_flip[idx.to(x0.device)], x0)
        T = int(self.teacher.schedule.num_train_timesteps)
        t = torch.randint(0, T, (idx.numel(),), generator=self.generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device)
        loss = dreambooth_loss(self.teacher, x0, self._text_embeds(), t, noise)
        return StepOutput(loss=loss)

    def _text_embeds(self) -> Tensor:
        """The instance prompt's embedding for this step (fixed for DreamBooth: the text encoder is frozen)."""
        return self.embeds

    def after_step(self, step: int, out: Any) -> None:
        pass

    def state_dict(self) -> dict:
        return {"lora": {n: p.detach().clone() for n, p in self._params.items()},
                "generator": self.generator.get_state(), "order": self._order.clone(), "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, v in state["lora"].items():
                self._params[n].copy_(v.to(self._params[n].device, self._params[n].dtype))
        self.generator.set_state(state["generator"].to(torch.uint8))
        self._order = state["order"].to(torch.long)
        self._cursor = int(state["cursor"])

    def preview(self) -> Tensor | None:
        return None

    def remove(self) -> None:
        """Delete the adapter from the teacher again (e.g. after a failed or cancelled run)."""
        name = self.cfg.adapter_name
        if name in getattr(self.teacher, "_lora_scales", {}) and hasattr(self.teacher, "unload_lora"):
            self.teacher.unload_lora(name)
        elif name in peft_adapter_names(self.teacher.unet):
            self.teacher.unet.delete_adapters(name)

    def finish(self) -> None:
        """Freeze the teacher again (LoRA included) and drop gradients; the adapter stays active at scale 1."""
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.teacher, "freeze"):
            self.teacher.freeze()
        else:
            for p in self.teacher.parameters():
                p.requires_grad_(False)


# --------------------------------------------------------------------------------------- entry point
def _fingerprint(teacher: Any, images: Tensor, prompt: str, cfg: DreamBoothConfig) -> dict:
    x = images.detach().to("cpu", torch.float32).contiguous()
    return {"format": _FORMAT, "prompt": prompt, "teacher": str(getattr(teacher, "name", type(teacher).__name__)),
            "images_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(), "image_shape": list(x.shape),
            "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError):
        return None


def dreambooth_lora(teacher: Any, images: Tensor, prompt: str, cfg: DreamBoothConfig | None = None, *,
                    progress: bool | Callable[[dict], Any] | None = None, out: str | Path | None = None,
                    resume: bool = False) -> dict:
    """Personalise ``teacher`` in place with a DreamBooth LoRA on ``images [N,3,H,W]`` in [0,1] and ``prompt``.

    Args:
        teacher: a UNet teacher (:class:`~studio.teachers.diffusers_sd.DiffusersTeacher`, latent or pixel space).
        images: the instance images (PlacidDreamer: the 8 enhanced views), any size (resized, centre-cropped).
        prompt: the instance prompt, i.e. the full text prompt.
        cfg: :class:`DreamBoothConfig` (default: PlacidDreamer's settings).
        progress: ``True`` prints the Trainer's progress line; a callable gets every step's record
            (``step``, ``steps``, ``loss``, ``it_s``, ``eta_s``) and may return ``False`` to cancel.
        out: folder for ``pytorch_lora_weights.safetensors`` (diffusers LoRA format), ``dreambooth.json``
            and the Trainer checkpoint.
        resume: with ``out``: load a finished LoRA of the same prompt / images / teacher / config instead of
            training, or continue an unfinished run from its checkpoint.

    Returns:
        a summary: ``adapter_name``, ``steps``, ``loss_first`` / ``loss_last`` (single steps),
        ``loss_first_mean`` / ``loss_last_mean`` (means over the first / last ``min(10, steps)`` steps),
        ``seconds``, ``trainable_parameters``, ``resolution``, ``num_images``, ``out``, ``resumed``.

    Raises:
        UserError: no / malformed images, an empty prompt, a bad config, a teacher without a UNet, or an
            adapter name the teacher already uses.
    """
    cfg = cfg or DreamBoothConfig()
    _check_config(cfg)
    unet = _teacher_unet(teacher)
    images = _check_images(images)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("DreamBooth needs the instance prompt (the full text prompt), got an empty prompt")
    if cfg.adapter_name in peft_adapter_names(unet):
        raise UserError(f"teacher {getattr(teacher, 'name', '?')!r} already has a LoRA named {cfg.adapter_name!r}; "
                        f"remove it with teacher.unload_lora({cfg.adapter_name!r}) or set DreamBoothConfig.adapter_name")
    folder = Path(out) if out is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UserError(f"DreamBooth output {str(folder)!r} is a file; give a folder")
    finger = _fingerprint(teacher, images, prompt, cfg)
    meta = _read_meta(folder) if folder is not None else None
    same = meta is not None and all(meta.get(k) == v for k, v in finger.items())
    if resume and same and meta.get("complete") and (folder / LORA_WEIGHT_NAME).is_file():
        t0 = time.perf_counter()
        teacher.load_lora(str(folder), adapter_name=cfg.adapter_name, scale=1.0)
        summary = dict(meta.get("summary") or {}, resumed=True, out=str(folder),
                       load_seconds=round(time.perf_counter() - t0, 3))
        return summary
    if resume and folder is not None and meta is not None and not same:
        warnings.warn(f"DreamBooth run in {folder} was made with another prompt / images / teacher / config; "
                      "training from scratch", RuntimeWarning, stacklevel=2)

    t0 = time.perf_counter()
    stage = DreamBoothStage(teacher, images, prompt, cfg)
    callbacks = [progress] if callable(progress) else []
    try:
        with tempfile.TemporaryDirectory(prefix="dreambooth_") as tmp:
            run_dir = folder if folder is not None else Path(tmp)
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / META_NAME, json.dumps(dict(finger, complete=False), indent=2))
            trainer = Trainer(TrainerConfig(out_dir=run_dir, seed=cfg.seed, preview_every=0, progress=progress is True,
                                            checkpoint_every=cfg.checkpoint_every if folder is not None else 0,
                                            log_every=max(1, cfg.steps // 20)),
                              callbacks=callbacks)
            history = trainer.run([stage], resume=bool(resume and same and folder is not None))
    except BaseException:
        # back to the teacher as it was (the partial run stays in out/checkpoints for resume=True)
        stage.finish()
        stage.remove()
        raise
    stage.finish()
    losses = [float(r["loss"]) for r in history if r.get("stage") == stage.name]
    k = max(1, min(10, len(losses)))
    summary = {
        "adapter_name": cfg.adapter_name, "steps": cfg.steps, "batch_size": cfg.batch_size, "rank": cfg.rank,
        "lr": cfg.lr, "resolution": int(cfg.resolution or teacher.native_resolution), "num_images": int(images.shape[0]),
        "prediction_type": str(teacher.schedule.prediction_type),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_first_mean": sum(losses[:k]) / k if losses else None,
        "loss_last_mean": sum(losses[-k:]) / k if losses else None,
        "trainable_parameters": int(sum(p.numel() for p in stage.parameters.values())),
        "seconds": round(time.perf_counter() - t0, 3), "out": str(folder) if folder is not None else None,
        "resumed": False,
    }
    if folder is not None:
        save_dreambooth_lora(teacher, folder, cfg.adapter_name)
        atomic_write_text(folder / META_NAME, json.dumps(dict(finger, complete=True, summary=summary), indent=2))
    return summary


# ================================================================================ the three baselines
# DreamSteerer (spec dreamsteerer.md 9) edits with a personalised model made by one of three baselines; all three
# run behind :func:`personalize` and give a :class:`Personalization`, whose :meth:`Personalization.pretrained`
# turns the teacher back into the pretrained model (the DDS-S source branch).

#: the personalisation baselines (spec 9): Textual Inversion, DreamBooth-LoRA, Custom Diffusion
PERSONALIZATION_METHODS = ("textual-inversion", "dreambooth-lora", "custom-diffusion")
#: the concept token each baseline uses by default (diffusers' example scripts: ``<v*>`` is a new TI token,
#: "sks" DreamBooth's rare word, ``<new1>`` Custom Diffusion's modifier token)
DEFAULT_TOKENS = {"textual-inversion": "<v*>", "dreambooth-lora": "sks", "custom-diffusion": "<new1>"}
#: learning rates of diffusers' example scripts (TI README 5e-4, DreamBooth-LoRA 1e-4, Custom Diffusion 1e-5)
DEFAULT_LRS = {"textual-inversion": 5e-4, "dreambooth-lora": 1e-4, "custom-diffusion": 1e-5}
PERSONALIZATION_META = "personalization.json"
TI_WEIGHT_NAME = "learned_embeds.safetensors"
CD_WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
_P_FORMAT = "studio-personalization/1"


@dataclass
class PersonalizeConfig:
    """One personalisation baseline's settings (spec dreamsteerer.md 9).

    Attributes:
        method: ``textual-inversion`` (a new token embedding; UNet untouched), ``dreambooth-lora`` (a UNet LoRA,
            :func:`dreambooth_lora`) or ``custom-diffusion`` (cross-attention K/V of the UNet + a new modifier
            token, diffusers' ``--freeze_model crossattn_kv``).
        token: the concept token in the instance prompt; None = :data:`DEFAULT_TOKENS` of the method. For TI and
            CD it is added to the tokenizer (it must not be a word the tokenizer knows as one token).
        initializer: word whose embedding initialises the new token (TI / CD; its tokens are averaged); None =
            the last word of the prompt (the class noun in "a <v*> cube").
        steps / lr / batch_size / seed / rank / resolution / max_grad_norm: as :class:`DreamBoothConfig`;
            ``lr`` None = :data:`DEFAULT_LRS` (the tiny CPU settings of the benchmark raise them).
    """

    method: str = "dreambooth-lora"
    token: str | None = None
    initializer: str | None = None
    steps: int = 400
    lr: float | None = None
    batch_size: int = 2
    seed: int = 0
    rank: int = 4
    resolution: int | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    checkpoint_every: int = 100

    def resolved_token(self) -> str:
        return self.token or DEFAULT_TOKENS[self.method]

    def resolved_lr(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LRS[self.method])

    def dreambooth(self) -> DreamBoothConfig:
        return DreamBoothConfig(rank=self.rank, lr=self.resolved_lr(), steps=self.steps, batch_size=self.batch_size,
                                seed=self.seed, resolution=self.resolution, max_grad_norm=self.max_grad_norm,
                                weight_decay=self.weight_decay, checkpoint_every=self.checkpoint_every)


def _check_pconfig(cfg: PersonalizeConfig) -> None:
    if cfg.method not in PERSONALIZATION_METHODS:
        raise UserError(f"unknown personalisation method {cfg.method!r}; choose one of "
                        f"{', '.join(PERSONALIZATION_METHODS)}")
    _check_config(cfg.dreambooth())


def _text_parts(teacher: Any) -> tuple[Any, Any]:
    tok, enc = getattr(teacher, "tokenizer", None), getattr(teacher, "text_encoder", None)
    if tok is None or enc is None or not hasattr(enc, "get_input_embeddings"):
        raise UserError(f"teacher {getattr(teacher, 'name', '?')!r} has no CLIP tokenizer / text encoder: Textual "
                        "Inversion and Custom Diffusion need a text-to-image teacher with one (SD 1.x/2.x, "
                        "shapeworld-unet)")
    return tok, enc


def add_concept_token(teacher: Any, token: str, initializer: str | None = None,
                      vector: Tensor | None = None) -> int:
    """Add ``token`` to the teacher's tokenizer and a row to its text encoder's input embeddings (initialised
    with ``vector``, else the mean embedding of ``initializer``'s tokens, else the mean of all rows); returns
    the token id. A token the tokenizer already holds as an added token is reused (its row is set when
    ``vector`` is given). Clears the teacher's prompt cache."""
    tok, enc = _text_parts(teacher)
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise UserError(f"concept token {token!r} must be one word without spaces, e.g. <v*>")
    emb = enc.get_input_embeddings()
    if token in getattr(tok, "added_tokens_encoder", {}):
        tid = int(tok.convert_tokens_to_ids(token))
    else:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]).replace("</w>", "") == token:
            raise UserError(f"concept token {token!r} is already a word of the tokenizer; choose a new one such as "
                            "<v*> (Textual Inversion / Custom Diffusion learn a new embedding)")
        tok.add_tokens([token])
        tid = int(tok.convert_tokens_to_ids(token))
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = enc.get_input_embeddings()
        with torch.no_grad():
            init = None
            if initializer:
                iids = tok(initializer, add_special_tokens=False)["input_ids"]
                iids = [i for i in iids if i != tid]
                if iids:
                    init = emb.weight[iids].mean(0)
            emb.weight[tid] = init if init is not None else emb.weight[:tid].mean(0)
    if vector is not None:
        with torch.no_grad():
            emb.weight[tid] = vector.reshape(-1).to(emb.weight)
    if hasattr(teacher, "clear_prompt_cache"):
        teacher.clear_prompt_cache()
    return tid


def cross_attention_kv(teacher: Any) -> dict[str, torch.nn.Linear]:
    """The cross-attention (``attn2``) key / value projections of the UNet by diffusers processor-style name
    (``...attn2.to_k``); the plain ``nn.Linear`` even when a peft LoRA wraps it (its ``base_layer``)."""
    unet = _teacher_unet(teacher)
    out: dict[str, torch.nn.Linear] = {}
    for name, mod in unet.named_modules():
        if name.endswith(".attn2") and hasattr(mod, "to_k") and hasattr(mod, "to_v"):
            for k in ("to_k", "to_v"):
                lin = getattr(mod, k)
                lin = getattr(lin, "base_layer", lin)
                out[f"{name}.{k}"] = lin
    if not out:
        raise UserError(f"teacher {getattr(teacher, 'name', '?')!r} has no cross-attention layers (attn2): Custom "
                        "Diffusion fine-tunes their key / value projections")
    return out


class TokenStage(DreamBoothStage):
    """Textual Inversion / Custom Diffusion as a :class:`~studio.train.loop.Trainer` stage (in place).

    * TI (diffusers ``textual_inversion.py``): only the new token's embedding row is trained; the other rows are
      put back after every optimizer step (as the script does), UNet and the rest of the text encoder frozen.
    * CD (``train_custom_diffusion.py --freeze_model crossattn_kv``): the new modifier token's row plus the
      weights of every cross-attention ``to_k`` / ``to_v`` (the originals are kept for the pretrained view).

    The loss is :func:`dreambooth_loss` with the prompt embedded **with** grad every step (the text encoder
    carries the trainable row). Reconstructed choice [S]: no prior preservation, AdamW (weight decay 1e-2),
    constant lr, no warmup, gradient-norm clipping 1.0 -- the DreamBooth-LoRA defaults, for one code path.
    """

    def __init__(self, teacher: Any, images: Tensor, prompt: str, cfg: PersonalizeConfig, *,
                 name: str = "personalize") -> None:
        _check_pconfig(cfg)
        if cfg.method == "dreambooth-lora":
            raise ValueError("TokenStage trains textual-inversion / custom-diffusion; use DreamBoothStage")
        db = cfg.dreambooth()
        self.name, self.steps, self.cfg, self.pcfg = name, int(cfg.steps), db, cfg
        self.teacher, self.prompt = teacher, prompt
        token = cfg.resolved_token()
        if token not in prompt.split():
            raise UserError(f"the instance prompt {prompt!r} does not contain the concept token {token!r} as a word; "
                            f"write it like 'a {token} cube'")
        initializer = cfg.initializer or prompt.split()[-1]
        _, enc = _text_parts(teacher)
        self.token_id = add_concept_token(teacher, token, initializer)
        self.x0, self.x0_flip, _ = prepare_instance_data(teacher, images, prompt, db)
        teacher.freeze()
        emb = enc.get_input_embeddings()
        emb.weight.data = emb.weight.data.to(torch.float32)
        emb.weight.requires_grad_(True)
        self._emb = emb.weight
        self._orig_emb = emb.weight.detach().clone()
        self._keep = torch.ones(emb.weight.shape[0], dtype=torch.bool)
        self._keep[self.token_id] = False
        self._params = {"token_embedding": emb.weight}
        self.kv_original: dict[str, Tensor] = {}
        if cfg.method == "custom-diffusion":
            for n, lin in cross_attention_kv(teacher).items():
                self.kv_original[n] = lin.weight.detach().clone()
                lin.weight.data = lin.weight.data.to(torch.float32)
                lin.weight.requires_grad_(True)
                self._params[n] = lin.weight
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self.optimizer = torch.optim.AdamW(list(self._params.values()), lr=cfg.resolved_lr(),
                                           weight_decay=cfg.weight_decay)
        if cfg.max_grad_norm > 0:
            params, max_norm = list(self._params.values()), float(cfg.max_grad_norm)

            def clip(*_: Any) -> None:
                torch.nn.utils.clip_grad_norm_(params, max_norm)

            self.optimizer.register_step_pre_hook(clip)

    def _text_embeds(self) -> Tensor:
        return self.teacher._embed_texts([self.prompt])

    def after_step(self, step: int, out: Any) -> None:
        with torch.no_grad():  # only the new token's row may change (weight decay touches every row)
            self._emb[self._keep] = self._orig_emb[self._keep].to(self._emb)

    def state_dict(self) -> dict:
        state = {k: v.detach().clone() for k, v in self._params.items() if k != "token_embedding"}
        state["token_row"] = self._emb[self.token_id].detach().clone()
        return {"params": state, "generator": self.generator.get_state(), "order": self._order.clone(),
                "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                if k == "token_row":
                    self._emb[self.token_id] = v.to(self._emb)
                else:
                    self._params[k].copy_(v.to(self._params[k]))
        self.generator.set_state(state["generator"].to(torch.uint8))
        self._order = state["order"].to(torch.long)
        self._cursor = int(state["cursor"])

    def remove(self) -> None:
        """Put the K/V weights back (the added token row stays; prompts without the token are unaffected)."""
        with torch.no_grad():
            for n, lin in cross_attention_kv(self.teacher).items():
                if n in self.kv_original:
                    lin.weight.data = self.kv_original[n].to(lin.weight.device)

    def finish(self) -> None:
        super().finish()
        if hasattr(self.teacher, "clear_prompt_cache"):
            self.teacher.clear_prompt_cache()


class Personalization:
    """A personalised teacher (in place) and how to get the pretrained model back (the DDS-S source branch).

    Attributes: ``teacher``, ``method``, ``token``, ``prompt`` (the instance prompt), ``summary``,
    ``adapter_name`` (DreamBooth-LoRA), ``kv_original`` (Custom Diffusion: the pretrained K/V weights).
    """

    def __init__(self, teacher: Any, method: str, token: str, prompt: str, summary: dict | None = None, *,
                 adapter_name: str | None = None, kv_original: dict[str, Tensor] | None = None) -> None:
        self.teacher, self.method, self.token, self.prompt = teacher, method, token, prompt
        self.summary = dict(summary or {})
        self.adapter_name = adapter_name
        self.kv_original = dict(kv_original or {})

    @contextlib.contextmanager
    def pretrained(self) -> Iterator[None]:
        """The teacher as the pretrained model: every UNet LoRA adapter disabled (the DreamBooth LoRA and any
        steering LoRA on top) and Custom Diffusion's K/V weights swapped back. Textual Inversion changes only a
        new token's row, so prompts without the token are already pretrained."""
        kv = cross_attention_kv(self.teacher) if self.kv_original else {}
        saved = {n: kv[n].weight.data for n in self.kv_original if n in kv}
        ctx = self.teacher.lora_disabled() if hasattr(self.teacher, "lora_disabled") else contextlib.nullcontext()
        # peft's enable_adapters() (on leaving lora_disabled) sets requires_grad=True on every active adapter; put
        # the flags back so a frozen personal LoRA stays frozen while a steering LoRA trains (spec 11.7)
        flags = [(q, q.requires_grad) for q in self.teacher.unet.parameters()]
        try:
            with ctx:
                try:
                    for n, w in saved.items():
                        kv[n].weight.data = self.kv_original[n].to(w)
                    yield
                finally:
                    for n, w in saved.items():
                        kv[n].weight.data = w
        finally:
            for q, f in flags:
                if q.requires_grad != f:
                    q.requires_grad_(f)

    def source_teacher(self) -> "PretrainedView":
        return PretrainedView(self)

    def save(self, out: str | Path) -> Path:
        """Write the personalisation to ``out``: diffusers-format weights (``learned_embeds.safetensors``,
        ``pytorch_lora_weights.safetensors`` or ``pytorch_custom_diffusion_weights.safetensors`` + the token's
        ``<token>.safetensors``) and ``personalization.json``."""
        from safetensors.torch import save_file

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if self.method == "dreambooth-lora":
            save_dreambooth_lora(self.teacher, folder, self.adapter_name or "personal")
        else:
            tok, enc = _text_parts(self.teacher)
            tid = int(tok.convert_tokens_to_ids(self.token))
            row = enc.get_input_embeddings().weight[tid:tid + 1].detach().to("cpu", torch.float32).contiguous()
            name = TI_WEIGHT_NAME if self.method == "textual-inversion" else _token_file(self.token)
            with atomic_path(folder / name) as tmp:
                save_file({self.token: row}, str(tmp))
            if self.method == "custom-diffusion":
                kv = cross_attention_kv(self.teacher)
                # diffusers' CustomDiffusionAttnProcessor keys (unet.save_attn_procs of train_custom_diffusion.py)
                state = {f"{n.rsplit('.', 1)[0]}.processor.{n.rsplit('.', 1)[1]}_custom_diffusion.weight":
                         kv[n].weight.detach().to("cpu", torch.float32).contiguous() for n in self.kv_original}
                with atomic_path(folder / CD_WEIGHT_NAME) as tmp:
                    save_file(state, str(tmp))
        meta = {"format": _P_FORMAT, "method": self.method, "token": self.token, "prompt": self.prompt,
                "teacher": str(getattr(self.teacher, "name", "?")), "complete": True, "summary": self.summary}
        atomic_write_text(folder / PERSONALIZATION_META, json.dumps(meta, indent=2))
        return folder


def _token_file(token: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in token).strip("_") or "token"
    return f"{safe}.safetensors"


class PretrainedView:
    """A teacher-protocol view that predicts with the pretrained model of a :class:`Personalization` (the
    ``source_teacher`` of :func:`studio.distill.dds.dds` / :func:`studio.distill.edsd.edsd`)."""

    def __init__(self, personalization: Personalization) -> None:
        self.personalization = personalization
        self.teacher = personalization.teacher

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["teacher"], name)

    def predict(self, *args, **kw) -> Tensor:
        with self.personalization.pretrained():
            return self.teacher.predict(*args, **kw)

    def predict_branches(self, *args, **kw) -> tuple[Tensor, Tensor]:
        with self.personalization.pretrained():
            return self.teacher.predict_branches(*args, **kw)


def is_personalization_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PERSONALIZATION_META).is_file()


def load_personalization(teacher: Any, folder: str | Path) -> Personalization:
    """Load a saved personalisation (``personalization.json`` + weights) into ``teacher`` in place."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / PERSONALIZATION_META).read_text())
        method, token, prompt = meta["method"], meta["token"], meta["prompt"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"personalisation folder {str(folder)!r}: {PERSONALIZATION_META} is missing or unreadable "
                        f"({e}); give a folder written by studio edit / personalize(), or reference images") from None
    if method not in PERSONALIZATION_METHODS:
        raise UserError(f"personalisation folder {str(folder)!r} names an unknown method {method!r}")
    try:
        if method == "dreambooth-lora":
            teacher.load_lora(str(folder), adapter_name="personal", scale=1.0)
            return Personalization(teacher, method, token, prompt, meta.get("summary"), adapter_name="personal")
        name = TI_WEIGHT_NAME if method == "textual-inversion" else _token_file(token)
        vec = load_file(str(folder / name))[token]
        add_concept_token(teacher, token, vector=vec)
        kv_orig = {}
        if method == "custom-diffusion":
            state = load_file(str(folder / CD_WEIGHT_NAME))
            kv = cross_attention_kv(teacher)
            with torch.no_grad():
                for n, lin in kv.items():
                    key = f"{n.rsplit('.', 1)[0]}.processor.{n.rsplit('.', 1)[1]}_custom_diffusion.weight"
                    if key in state:
                        kv_orig[n] = lin.weight.detach().clone()
                        lin.weight.copy_(state[key].to(lin.weight))
            if not kv_orig:
                raise ValueError("no cross-attention K/V weight of this UNet is in the file")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"personalisation folder {str(folder)!r} could not be loaded into teacher "
                        f"{getattr(teacher, 'name', '?')!r}: {e}; was it made for this base model?") from None
    teacher.freeze()
    if hasattr(teacher, "clear_prompt_cache"):
        teacher.clear_prompt_cache()
    return Personalization(teacher, method, token, prompt, meta.get("summary"), kv_original=kv_orig)


def personalize(teacher: Any, images: Tensor, prompt: str, cfg: PersonalizeConfig | None = None, *,
                progress: bool | Callable[[dict], Any] | None = None, out: str | Path | None = None,
                resume: bool = False) -> Personalization:
    """Personalise ``teacher`` in place with one baseline (``cfg.method``) on ``images [N,3,H,W]`` in [0,1]
    and the instance prompt ``prompt`` (which contains ``cfg.resolved_token()``, e.g. "a <v*> cube").

    ``out``: save the result there (:meth:`Personalization.save`); with ``resume=True`` a complete saved
    personalisation of the same method / token / prompt / teacher is loaded instead of retrained.
    """
    cfg = cfg or PersonalizeConfig()
    _check_pconfig(cfg)
    _teacher_unet(teacher)
    images = _check_images(images)
    token = cfg.resolved_token()
    if not isinstance(prompt, str) or token not in prompt.split():
        raise UserError(f"the instance prompt {prompt!r} must contain the concept token {token!r} as a word, e.g. "
                        f"'a {token} cube'")
    folder = Path(out) if out is not None else None
    if resume and folder is not None and is_personalization_folder(folder):
        meta = json.loads((folder / PERSONALIZATION_META).read_text())
        if (meta.get("complete") and meta.get("method") == cfg.method and meta.get("token") == token
                and meta.get("prompt") == prompt and meta.get("teacher") == str(getattr(teacher, "name", "?"))
                and (meta.get("summary") or {}).get("config") == json.loads(json.dumps(dataclasses.asdict(cfg)))):
            p = load_personalization(teacher, folder)
            p.summary["resumed"] = True
            return p
    t0 = time.perf_counter()
    if cfg.method == "dreambooth-lora":
        summary = dreambooth_lora(teacher, images, prompt, cfg.dreambooth(), progress=progress)
        p = Personalization(teacher, cfg.method, token, prompt, summary, adapter_name=cfg.dreambooth().adapter_name)
    else:
        stage = TokenStage(teacher, images, prompt, cfg)
        callbacks = [progress] if callable(progress) else []
        try:
            with tempfile.TemporaryDirectory(prefix="personalize_") as tmp:
                trainer = Trainer(TrainerConfig(out_dir=Path(tmp), seed=cfg.seed, preview_every=0,
                                                progress=progress is True, checkpoint_every=0,
                                                log_every=max(1, cfg.steps // 20)), callbacks=callbacks)
                history = trainer.run([stage])
        except BaseException:
            stage.finish()
            stage.remove()
            raise
        stage.finish()
        losses = [float(r["loss"]) for r in history if r.get("stage") == stage.name]
        k = max(1, min(10, len(losses)))
        summary = {"steps": cfg.steps, "lr": cfg.resolved_lr(), "num_images": int(images.shape[0]),
                   "loss_first_mean": sum(losses[:k]) / k if losses else None,
                   "loss_last_mean": sum(losses[-k:]) / k if losses else None,
                   "trainable_parameters": int(sum(p.numel() for p in stage._params.values())),
                   "token_id": stage.token_id}
        p = Personalization(teacher, cfg.method, token, prompt, summary, kv_original=stage.kv_original)
    p.summary.update(method=cfg.method, token=token, seconds=round(time.perf_counter() - t0, 3), resumed=False,
                     config=json.loads(json.dumps(dataclasses.asdict(cfg))))
    if folder is not None:
        p.save(folder)
    return p
