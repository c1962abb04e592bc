"""The trainable variational score of VSD (ProlificDreamer): a LoRA on a copy of a diffusion UNet.

``LoRAScore`` models the score of the distribution of the student's *current* renders. It is

* a deep copy of a frozen diffusers ``UNet2DConditionModel`` (the teacher's, or a separate "LoRA base"
  such as SD 2.1 (v-prediction) next to an SD 2.1-base teacher, as in threestudio's ProlificDreamer);
* peft LoRA adapters (rank ``rank``, ``lora_alpha = rank``) on the attention projections
  ``to_q, to_k, to_v, to_out.0``; peft initialises ``B = 0``, so the adapters start as the identity;
* optionally a camera embedding ``TimestepEmbedding(16, time_embed_dim)`` installed as the UNet's
  ``class_embedding``: the UNet adds ``class_embedding(class_labels)`` to its time embedding, and the
  class labels are the flattened 4x4 camera-to-world matrices. Its last layer is zero-initialised, so
  at construction the LoRA score equals the base model for every camera.

Only the LoRA matrices and the camera embedding train (kept in float32 even on a half-precision base);
:meth:`LoRAScore.state_dict` / :meth:`LoRAScore.load_state_dict` hold exactly those tensors, so a
checkpoint stores a few hundred kB instead of a UNet.

Camera convention: the studio's :class:`~studio.cameras.Cameras` are OpenCV world-to-camera matrices;
the LoRA gets ``inverse(viewmat)`` flattened row-major (:func:`c2w_from_cameras`). threestudio feeds its
OpenGL-convention c2w; since the embedding is learned from scratch during distillation, the frame only
has to be consistent within a run.

Training (:meth:`LoRAScore.lora_loss`, threestudio's ProlificDreamer conventions): on the *detached*
student latents, a fresh ``t ~ U{0, ..., T-1}`` over the full range and fresh noise, the standard
diffusion regression (MSE, mean) to the base's own parameterisation (``NoiseSchedule.target``: eps for
an eps model, v for a v-prediction model), with the camera zeroed with probability 0.1 per sample
(so the zero camera stays a usable "unconditional" input, threestudio's ``lora_cfg_training``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..seeding import seeded
from ..teachers.diffusers_sd import peft_adapter_names
from ..teachers.schedule import NoiseSchedule

#: attention projections that get LoRA adapters (diffusers' Attention module names)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: length of the camera vector fed to the camera embedding (a flattened 4x4 c2w matrix)
CAMERA_DIM = 16
ADAPTER_NAME = "vsd_lora"


def c2w_from_viewmats(viewmats: Tensor) -> Tensor:
    """World-to-camera ``[B,4,4]`` -> flattened camera-to-world ``[B,16]`` (float32)."""
    return torch.linalg.inv(viewmats.detach().to(torch.float32)).reshape(-1, 16)


def c2w_from_cameras(cameras: Any) -> Tensor:
    """Flattened camera-to-world ``[B,16]`` for the LoRA's camera embedding.

    Accepts a :class:`~studio.cameras.Cameras`, a ``[B,20]`` camera vector (``Cameras.to_vector``:
    flattened viewmat + intrinsics), ``[B,4,4]`` viewmats or ``[B,16]`` flattened viewmats.
    """
    if hasattr(cameras, "viewmats"):
        return c2w_from_viewmats(cameras.viewmats)
    x = torch.as_tensor(cameras)
    if x.dim() == 3 and x.shape[-2:] == (4, 4):
        return c2w_from_viewmats(x)
    if x.dim() == 2 and x.shape[1] in (16, 20):
        return c2w_from_viewmats(x[:, :16].reshape(-1, 4, 4))
    raise ValueError(f"expected Cameras, [B,20] camera vectors, [B,4,4] or [B,16] viewmats; got shape "
                     f"{tuple(x.shape)}")


def add_lora_adapter(unet: Any, *, rank: int, adapter_name: str, target_modules: Iterable[str] = LORA_TARGETS,
                     scales: Mapping[str, float] | None = None, seed: int | None = None,
                     alpha: float | None = None, dropout: float = 0.0) -> None:
    """Add a peft LoRA ``adapter_name`` (rank ``rank``, ``lora_alpha = alpha`` (default ``rank``), dropout
    ``dropout``, peft init: ``B = 0``) to the diffusers UNet ``unet`` in place (a plain ``torch.nn.Module``
    without diffusers' ``add_adapter`` gets it through peft's ``inject_adapter_in_model``).

    Adapters the UNet already holds stay active next to the new one, at ``scales[name]`` (default 1.0);
    the new adapter gets scale 1. ``seed`` seeds the ``A`` initialisation without touching the global RNG
    (``None``: the global RNG draws). Nothing is frozen or unfrozen here (peft's ``set_adapters`` may flip
    ``requires_grad`` of adapter weights): callers set ``requires_grad`` afterwards.
    """
    from peft import LoraConfig

    existing = peft_adapter_names(unet)
    config = LoraConfig(r=int(rank), lora_alpha=int(rank) if alpha is None else alpha, lora_dropout=float(dropout),
                        init_lora_weights=True, target_modules=list(target_modules))
    with seeded(seed):
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(config, adapter_name=adapter_name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    if existing and hasattr(unet, "set_adapters"):
        scales = scales or {}
        names = sorted(existing)
        unet.set_adapters(names + [adapter_name], [float(scales.get(n, 1.0)) for n in names] + [1.0])


class LoRAScore(torch.nn.Module):
    """A LoRA-adapted, optionally camera-conditioned copy of a diffusion UNet (see module doc).

    Args:
        base: a :class:`~studio.teachers.diffusers_sd.DiffusersTeacher` (anything with ``.unet`` and
            ``.schedule``) or a ``UNet2DConditionModel`` (then ``schedule`` is required). The UNet is
            deep-copied; the original is never modified.
        schedule: the base's :class:`NoiseSchedule` (default ``base.schedule``); its ``prediction_type``
            is what the UNet outputs.
        rank: LoRA rank (``lora_alpha = rank``, i.e. scale 1).
        camera_condition: add the camera embedding (``class_labels`` = flattened c2w).
        camera_dropout: probability of zeroing a sample's camera in :meth:`lora_loss`.
        target_modules: module names that get adapters.
        seed: seed of the LoRA ``A`` initialisation (the global RNG is left untouched); ``None`` uses
            the global RNG.
    """

    def __init__(self, base: Any, schedule: NoiseSchedule | None = None, *, rank: int = 4,
                 camera_condition: bool = True, camera_dropout: float = 0.1,
                 target_modules: Iterable[str] = LORA_TARGETS, seed: int | None = 0) -> None:
        super().__init__()
        unet = getattr(base, "unet", base)
        schedule = schedule if schedule is not None else getattr(base, "schedule", None)
        if schedule is None:
            raise ValueError("LoRAScore needs the base's NoiseSchedule: pass a DiffusersTeacher or schedule=")
        if not hasattr(unet, "config") or not hasattr(unet, "time_embedding"):
            raise TypeError(f"LoRAScore needs a diffusers UNet2DConditionModel (or a teacher with .unet), got "
                            f"{type(unet).__name__}")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= float(camera_dropout) <= 1.0:
            raise ValueError(f"camera_dropout must lie in [0, 1], got {camera_dropout}")
        self.schedule = schedule
        self.rank = int(rank)
        self.camera_condition = bool(camera_condition)
        self.camera_dropout = float(camera_dropout)
        self.base_name = str(getattr(base, "name", type(unet).__name__))

        from diffusers.models.embeddings import TimestepEmbedding

        self.unet = copy.deepcopy(unet)
        for p in self.unet.parameters():
            p.requires_grad_(False)
        self.unet.eval()
        with seeded(seed):
            # LoRAs already loaded into a teacher stay active (at the teacher's scales), frozen
            add_lora_adapter(self.unet, rank=self.rank, target_modules=target_modules, adapter_name=ADAPTER_NAME,
                             scales=getattr(base, "_lora_scales", {}))
            if self.camera_condition:
                if getattr(self.unet, "class_embedding", None) is not None:
                    raise ValueError("the LoRA base UNet already has a class embedding; VSD's camera embedding "
                                     "needs a UNet without one (or use camera_condition=False)")
                time_dim = int(self.unet.time_embedding.linear_2.out_features)
                emb = TimestepEmbedding(CAMERA_DIM, time_dim)
                torch.nn.init.zeros_(emb.linear_2.weight)
                torch.nn.init.zeros_(emb.linear_2.bias)
                # installed like a UNet built with a class embedding: forward adds class_embedding(class_labels)
                # to the time embedding (class_embed_type None -> the labels go in as they are)
                self.unet.class_embedding = emb.to(self.unet.device)
        # Only the adapters and the camera embedding train, in float32.
        names = []
        for name, p in self.unet.named_parameters():
            train = f"lora_A.{ADAPTER_NAME}." in name or f"lora_B.{ADAPTER_NAME}." in name \
                or name.startswith("class_embedding.")
            p.requires_grad_(train)
            if train:
                p.data = p.data.to(torch.float32)
                names.append(f"unet.{name}")
        if not any("lora_" in n for n in names):
            raise ValueError(f"no LoRA targets {tuple(target_modules)} found in the UNet")
        self._trainable = tuple(names)

    # ------------------------------------------------------------------ parameters and state
    @property
    def trainable_names(self) -> tuple[str, ...]:
        return self._trainable

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA matrices and the camera embedding (what the optimizer gets)."""
        params = dict(self.named_parameters())
        return [params[n] for n in self._trainable]

    def make_optimizer(self, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-15,
                       weight_decay: float = 0.01) -> torch.optim.AdamW:
        """AdamW over :meth:`trainable_parameters` (threestudio's ProlificDreamer: lr 1e-4, betas (0.9, 0.99),
        eps 1e-15; weight decay: torch's AdamW default)."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        """The trainable tensors only (LoRA + camera embedding), keyed by parameter name."""
        out = destination if destination is not None else OrderedDict()
        params = dict(self.named_parameters())
        for n in self._trainable:
            out[prefix + n] = params[n] if keep_vars else params[n].detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True,  # type: ignore[override]
                        assign: bool = False):
        """Load the trainable tensors saved by :meth:`state_dict` (``strict``: exactly the same keys)."""
        params = dict(self.named_parameters())
        missing = [n for n in self._trainable if n not in state_dict]
        unexpected = [k for k in state_dict if k not in self._trainable]
        if strict and (missing or unexpected):
            raise RuntimeError(f"LoRAScore.load_state_dict: missing keys {missing[:5]}, unexpected keys "
                               f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all; a LoRA of another "
                               "rank / base / camera setting?)")
        with torch.no_grad():
            for n in self._trainable:
                if n in state_dict:
                    v = state_dict[n]
                    if tuple(v.shape) != tuple(params[n].shape):
                        raise RuntimeError(f"LoRAScore.load_state_dict: {n} has shape {tuple(v.shape)}, expected "
                                           f"{tuple(params[n].shape)}")
                    params[n].copy_(v.to(params[n].device, params[n].dtype))
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True) -> "LoRAScore":
        """The UNet stays in eval mode (no dropout in the frozen base); only the flag changes."""
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # ------------------------------------------------------------------ prediction
    def _camera_labels(self, camera_c2w: Tensor | None, batch: int) -> Tensor | None:
        if not self.camera_condition:
            return None
        dev = self.device
        if camera_c2w is None:
            return torch.zeros(batch, CAMERA_DIM, device=dev, dtype=torch.float32)
        cam = camera_c2w.reshape(camera_c2w.shape[0], -1)
        if cam.shape[1] != CAMERA_DIM:
            raise ValueError(f"camera_c2w must be [B,16] flattened c2w matrices, got {tuple(camera_c2w.shape)}")
        if cam.shape[0] == 1 and batch != 1:
            cam = cam.expand(batch, -1)
        if cam.shape[0] != batch:
            raise ValueError(f"got {cam.shape[0]} cameras for a batch of {batch}")
        return cam.to(device=dev, dtype=torch.float32)

    def forward(self, x_t: Tensor, t: Tensor | int, text_embeds: Tensor, camera_c2w: Tensor | None = None) -> Tensor:
        """Raw UNet output (the base's ``schedule.prediction_type``) at ``(x_t, t)``, in ``x_t``'s dtype.

        ``text_embeds``: ``[1 or B, L, D]``; ``camera_c2w``: ``[1 or B, 16]`` or None (the zero camera).
        """
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.dim() == 0 or t.numel() == 1 else t.reshape(-1)
        if t.numel() != B:
            raise ValueError(f"got {t.numel()} timesteps for a batch of {B}")
        emb = text_embeds if text_embeds.shape[0] == B else text_embeds.expand(B, *text_embeds.shape[1:])
        dt = self.unet.dtype
        out = self.unet(x_t.to(self.device, dt), t.to(self.device), encoder_hidden_states=emb.to(self.device, dt),
                        class_labels=self._camera_labels(camera_c2w, B), return_dict=False)[0]
        return out.to(x_t.dtype)

    def predict(self, x_t: Tensor, t: Tensor | int, text_embeds: Tensor, camera_c2w: Tensor | None = None,
                output: str = "epsilon", guidance_scale: float = 1.0) -> Tensor:
        """Prediction converted to ``output`` through the base's schedule (v -> eps: ``sigma x_t + alpha v``).

        ``guidance_scale`` is threestudio's ``guidance_scale_lora``: camera vs zero-camera CFG; 1 (the
        ProlificDreamer default) runs only the camera-conditioned branch.
        """
        B = x_t.shape[0]
        t_b = torch.as_tensor(t, device=x_t.device)
        t_b = t_b.expand(B) if t_b.dim() == 0 or t_b.numel() == 1 else t_b.reshape(-1)
        if float(guidance_scale) == 1.0 or not self.camera_condition:
            raw = self.forward(x_t, t_b, text_embeds, camera_c2w)
            return self.schedule.convert(raw, x_t, t_b, self.schedule.prediction_type, output)
        cam = self._camera_labels(camera_c2w, B)
        emb = text_embeds if text_embeds.shape[0] == B else text_embeds.expand(B, *text_embeds.shape[1:])
        raw = self.forward(torch.cat([x_t, x_t]), torch.cat([t_b, t_b]), torch.cat([emb, emb]),
                           torch.cat([torch.zeros_like(cam), cam]))
        eps = self.schedule.convert(raw, torch.cat([x_t, x_t]), torch.cat([t_b, t_b]),
                                    self.schedule.prediction_type, "epsilon")
        eps_0, eps_c = eps[:B], eps[B:]
        eps = eps_0 + float(guidance_scale) * (eps_c - eps_0)
        return self.schedule.convert(eps, x_t, t_b, "epsilon", output)

    def predict_eps(self, x_t: Tensor, t: Tensor | int, text_embeds: Tensor, camera_c2w: Tensor | None = None,
                    guidance_scale: float = 1.0) -> Tensor:
        """Epsilon of the variational score at ``(x_t, t)`` (see :meth:`predict`)."""
        return self.predict(x_t, t, text_embeds, camera_c2w, "epsilon", guidance_scale)

    # ------------------------------------------------------------------ training
    def drop_camera(self, camera_c2w: Tensor | None, generator: torch.Generator | None = None) -> Tensor | None:
        """Zero each sample's camera with probability ``camera_dropout`` (classifier-free training)."""
        if camera_c2w is None or self.camera_dropout <= 0:
            return camera_c2w
        keep = torch.rand(camera_c2w.shape[0], generator=generator) >= self.camera_dropout
        return camera_c2w * keep.to(camera_c2w.device, camera_c2w.dtype).reshape(-1, *([1] * (camera_c2w.dim() - 1)))

    def lora_loss(self, z0: Tensor, text_embeds: Tensor, camera_c2w: Tensor | None = None,
                  generator: torch.Generator | None = None, *, t: Tensor | None = None,
                  noise: Tensor | None = None) -> Tensor:
        """Diffusion loss of the LoRA on the detached latents ``z0 [B,C,h,w]`` (see module doc).

        ``t`` (default ``U{0..T-1}`` per sample) and ``noise`` (default ``N(0, I)``) may be fixed for
        tests; the camera is still dropped with probability ``camera_dropout``.
        """
        z0 = z0.detach()
        B = z0.shape[0]
        T = self.schedule.num_train_timesteps
        if t is None:
            t = torch.randint(0, T, (B,), generator=generator)
        t = torch.as_tensor(t).reshape(-1)
        t = (t.expand(B) if t.numel() == 1 else t).to(z0.device)
        if noise is None:
            noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        cam = self.drop_camera(camera_c2w, generator) if self.camera_condition else None
        x_t = self.schedule.add_noise(z0, noise, t)
        pred = self.forward(x_t, t, text_embeds.detach(), cam)
        target = self.schedule.target(z0, noise, t)
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def extra_repr(self) -> str:
        return (f"base={self.base_name!r}, rank={self.rank}, camera_condition={self.camera_condition}, "
                f"prediction_type={self.schedule.prediction_type!r}, trainable={len(self._trainable)} tensors")
