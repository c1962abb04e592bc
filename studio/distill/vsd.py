"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023) as a pure function.

With ``z_t = alpha_t z + sigma_t eps`` (the teacher's schedule) and both networks under ``no_grad``:

    G = w(t) * (eps_pre_cfg(z_t; y_view, t) - eps_lora(z_t; y, t, c))

* ``eps_pre_cfg``: the frozen teacher with classifier-free guidance (diffusers convention, 7.5 in
  ProlificDreamer) on the (possibly view-dependent) prompt ``cond``.
* ``eps_lora``: the variational score, a :class:`~studio.students.lora_score.LoRAScore` (a LoRA on a
  copy of the teacher's UNet or of another "LoRA base" UNet, v-prediction converted to epsilon through
  its own schedule), conditioned on the camera-to-world matrix ``c``.
* There is no ``-eps`` term: the injected noise appears in both branches and cancels.
* ``w(t)``: ``"sds"`` = 1 - abar (default), ``"uniform"``, ``"fantasia3d"``; non-finite entries are
  zeroed, then an optional element-wise clamp to ``+-grad_clip``.

Text condition of the LoRA branch. As in threestudio's ProlificDreamer, the LoRA sees the
*view-independent* embedding of the plain prompt (the camera embedding carries the view), while the
teacher sees the view-dependent prompt. Callers pass it as ``lora_cond`` (a ``TextCond`` or its
``embeds``), encoded with the LoRA base's own text encoder; when omitted, ``cond.embeds`` is used, which
is only right for a LoRA that shares the teacher's text encoder and a caller without view prompts.

VSD is the ``(lambda_base, lambda_cfg, lambda_var) = (0, s - 1, 1)`` preset of the score-combination
family (DSD, spec section 3.4); its pieces (:class:`~studio.students.lora_score.LoRAScore`,
:func:`lora_embeddings`, :func:`check_lora_base`, :func:`c2w_from_cameras`) are meant to be reused there.
The LoRA's own training step is :meth:`LoRAScore.lora_loss` (on detached latents); methods add it to
the returned loss so one backward trains the student and the LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..students.lora_score import c2w_from_cameras  # noqa: F401 - re-exported for methods
from .inject import inject_gradient
from .sds import WEIGHTINGS, ScoreOutput


@dataclass
class VSDOutput(ScoreOutput):
    lora_pred: Tensor | None = None  # eps_lora at (z_t, t)
    logs: dict[str, float] = field(default_factory=dict)


def lora_embeddings(cond: Any, lora_cond: Any = None) -> Tensor:
    """The text embeddings of the LoRA branch: ``lora_cond`` (a ``TextCond`` or a tensor), else ``cond.embeds``."""
    src = cond if lora_cond is None else lora_cond
    return src if isinstance(src, Tensor) else src.embeds


def vsd(teacher, lora_score, latents: Tensor, cond, t: Tensor, *, guidance_scale: float = 7.5,
        camera_c2w: Tensor | None = None, noise: Tensor | None = None, generator: torch.Generator | None = None,
        weighting: str = "sds", lora_cond: Any = None, camera: Tensor | None = None,
        lora_guidance_scale: float = 1.0, grad_clip: float | None = None) -> VSDOutput:
    """VSD gradient and loss for student ``latents [B,C,h,w]`` (in the teacher's latent space).

    Args:
        teacher: an ``ImageTeacher`` (its ``schedule`` noises the latents).
        lora_score: the variational score: anything with ``predict_eps(x_t, t, text_embeds, camera_c2w,
            guidance_scale)`` (a :class:`~studio.students.lora_score.LoRAScore`).
        cond: the teacher's ``TextCond`` (view-dependent prompts and the negative / empty prompt).
        t: ``[B]`` timesteps.
        guidance_scale: the teacher's CFG scale (diffusers convention).
        camera_c2w: ``[B,16]`` flattened camera-to-world matrices for the LoRA (None: the zero camera).
        lora_cond: the LoRA's text condition: the plain prompt's ``TextCond`` or ``[1 or B, L, D]``
            embeddings (see module doc).
        camera: camera vectors passed to camera-aware teachers (as in :func:`~studio.distill.sds.sds`).
        lora_guidance_scale: camera vs zero-camera CFG of the LoRA (1 = camera-conditioned only).

    Returns a :class:`VSDOutput`: ``loss`` with ``d loss / d latents = G``, ``grad = G``, ``t``, ``noise``,
    ``pred`` (the teacher's guided epsilon) and ``lora_pred``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    sched = teacher.schedule
    embeds = lora_embeddings(cond, lora_cond)
    with torch.no_grad():
        z_t = sched.add_noise(latents.detach(), noise, t)
        eps_pre = teacher.predict(z_t, t, cond, guidance_scale=guidance_scale, output="epsilon", camera=camera)
        eps_lora = lora_score.predict_eps(z_t, t, embeds, camera_c2w, guidance_scale=lora_guidance_scale)
        w = sched.weight(t, weighting, latents).to(latents.dtype)
        grad = w * (eps_pre.to(latents.dtype) - eps_lora.to(latents.dtype))
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
    return VSDOutput(inject_gradient(latents, grad), grad, t, noise, eps_pre, eps_lora)


def _space(t) -> str:
    kind = "latents" if t.is_latent else "pixels"
    return f"{t.latent_channels}-channel {t.native_resolution}x{t.native_resolution} {kind}"


def check_lora_base(teacher, base, *, teacher_name: str = "", base_name: str = "", hint: str = "") -> None:
    """Raise :class:`UserError` unless ``base`` can host VSD's LoRA for ``teacher``.

    The LoRA is evaluated at the teacher's ``z_t`` and ``t``, so the base needs a diffusers UNet
    (``.unet``), the same channels and kind of space (VAE latents with the same scaling, or pixels),
    for pixel models the same resolution, and the same noise levels (``alphas_cumprod``). Latent models
    may differ in native resolution (ProlificDreamer: SD 2.1 at 768 px as the base of SD 2.1-base at
    512 px; the UNet is convolutional).
    """
    tn = teacher_name or getattr(teacher, "name", "teacher")
    bn = base_name or getattr(base, "name", "lora base")
    tail = f"; {hint}" if hint else ""
    if getattr(base, "unet", None) is None or getattr(base, "schedule", None) is None:
        raise UserError(f"VSD's LoRA base {bn!r} is not a diffusers UNet model (no .unet){tail}")
    if base.latent_channels != teacher.latent_channels or bool(base.is_latent) != bool(teacher.is_latent) \
            or (not teacher.is_latent and base.native_resolution != teacher.native_resolution):
        raise UserError(f"VSD's LoRA base {bn!r} works on {_space(base)} but teacher {tn!r} on {_space(teacher)}; "
                        f"the LoRA must work in the teacher's space{tail}")
    sf_t, sf_b = getattr(teacher, "scaling_factor", None), getattr(base, "scaling_factor", None)
    if teacher.is_latent and sf_t is not None and sf_b is not None and abs(float(sf_t) - float(sf_b)) > 1e-6:
        raise UserError(f"VSD's LoRA base {bn!r} uses VAE scaling {sf_b} but teacher {tn!r} {sf_t}: they are not the "
                        f"same latent space{tail}")
    a_t, a_b = teacher.schedule.alphas_cumprod, base.schedule.alphas_cumprod
    if a_t.shape != a_b.shape or float((a_t - a_b).abs().max()) > 1e-4:
        raise UserError(f"VSD's LoRA base {bn!r} has another noise schedule than teacher {tn!r} "
                        f"({base.schedule} vs {teacher.schedule}); both must share alphas_cumprod{tail}")
