"""Delta Denoising Score (DDS, Hertz et al. 2023) and DreamSteerer's two modifications, as pure functions.

DDS edits a latent ``z`` (initialised at the source latent ``z_src``) with the difference of two guided noise
predictions at the **same** timestep ``t`` and the **same** noise ``eps`` (spec dreamsteerer.md 2.2)::

    z_t     = alpha_t z     + sigma_t eps            z_src_t = alpha_t z_src + sigma_t eps
    G       = w(t) * M * ( eps^w_tgt(z_t; y, t) - eps^w_src(z_src_t; y_src, t) )

* ``eps^w`` is classifier-free guidance ``eps(., neg) + w (eps(., y) - eps(., neg))`` (``w = 7.5`` in both
  branches, DDS's official value). The two branches are combined in epsilon space (every parameterisation
  is affine in the prediction, so this equals guiding natively; see :mod:`studio.teachers.base`).
* ``w(t)``: DDS uses 1 (``weighting="uniform"``, default); the SDS weightings are accepted.
* **Naive personalised DDS**: the personalised teacher in both branches (``source_teacher=None``).
* **DDS-S** (source score bias correction, spec 3): the source branch uses the **pretrained** model, so the
  personalised model's drift on the class prompt ("language drift") is not subtracted. Pass the pretrained
  teacher as ``source_teacher``; for a DreamBooth-LoRA teacher :class:`AdaptersOff` gives the same UNet with
  its LoRA adapters disabled. Knob ``uncond_model_target`` (spec 3, [R]): the target branch's unconditional
  prediction comes from the personalised model (``"personalized"``, default) or the pretrained one.
* **DDS-SM** (automatic subject mask, spec 4): ``M [B,1,h,w]`` in [0, 1] broadcast over channels. It comes
  from the cross-attention probabilities of the subject token(s) in the source branch: install a
  :class:`CrossAttentionCapture` on the pretrained UNet and pass it as ``source_capture``; the maps are in
  ``DDSOutput.attn_maps`` and :func:`subject_mask` turns them into ``M`` (mean over layers and heads,
  min-max normalised, threshold or soft, optional dilation; :func:`ema_mask` accumulates over steps).

The loss is ``inject_gradient(latents, G, scale)``: ``d loss / d latents = scale * G``. DDS's official
optimiser (plain SGD, lr 0.1 on ``sum(z * sg[G]) * 2000 / (H W)``) is the step ``z <- z - eta G`` with
:func:`dds_step_size` ``eta = 0.1 * 2000 / (H W)`` (0.0488 at 64x64); use ``scale = 2000 / (H W)`` with SGD
lr 0.1 to reproduce it.

All reconstructed choices ([R]/[S] in the spec): the mask's token / layers / threshold / dilation / EMA, the
target branch's unconditional model, and the mask's broadcast over channels.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .inject import inject_gradient
from .sds import WEIGHTINGS, ScoreOutput

UNCOND_MODELS = ("personalized", "pretrained")

#: DDS's official timestep range: ``randint(50, 949)``, i.e. t in {50, ..., 948}
DDS_T_MIN, DDS_T_MAX = 50, 949


def sample_dds_timesteps(n: int, t_min: int = DDS_T_MIN, t_max: int = DDS_T_MAX,
                         generator: torch.Generator | None = None) -> Tensor:
    """``n`` integer timesteps uniform in ``[t_min, t_max)`` (DDS: ``[50, 949)``)."""
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    return torch.randint(int(t_min), int(t_max), (int(n),), generator=generator)


def dds_step_size(height: int, width: int, lr: float = 0.1, loss_scale: float = 2000.0) -> float:
    """DDS's effective step ``eta``: SGD with ``lr`` on ``loss_scale * sum(z * sg[G]) / (H W)`` moves
    ``z`` by ``-eta G`` with ``eta = lr * loss_scale / (H W)`` (0.0488 for 64x64 latents)."""
    return float(lr) * float(loss_scale) / float(height * width)


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """``uncond + w (cond - uncond)``; ``w = 1`` returns ``cond`` exactly, ``w = 0`` ``uncond`` exactly."""
    w = float(guidance_scale)
    if w == 1.0:
        return cond
    if w == 0.0:
        return uncond
    return uncond + w * (cond - uncond)


def dds_direction(eps_target: Tensor, eps_source: Tensor, weight: Tensor | float = 1.0,
                  mask: Tensor | None = None) -> Tensor:
    """``w * M * (eps_target - eps_source)``; ``mask`` ``[B,1,h,w]`` (or anything broadcastable) in [0, 1]."""
    if eps_target.shape != eps_source.shape:
        raise ValueError(f"target and source predictions differ in shape: {tuple(eps_target.shape)} vs "
                         f"{tuple(eps_source.shape)}")
    g = weight * (eps_target - eps_source)
    if mask is not None:
        check_mask(mask, g)
        g = mask.to(g.dtype) * g
    return g


def check_mask(mask: Tensor, like: Tensor) -> None:
    if mask.dim() != like.dim() or mask.shape[-2:] != like.shape[-2:] or mask.shape[1] not in (1, like.shape[1]) \
            or mask.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"mask must be [B or 1, 1 or C, h, w] for latents {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")


class AdaptersOff:
    """A view of a LoRA teacher that predicts with its adapters disabled: the pretrained model of a
    DreamBooth-LoRA personalisation, without a second UNet (spec 3, "DB-LoRA: adapters disabled").

    Forwards ``schedule``, ``predict`` and ``predict_branches`` to ``teacher`` inside
    ``teacher.lora_disabled()``; other attributes (``unet``, ``encode_prompt``, ...) are the teacher's.
    """

    def __init__(self, teacher: Any) -> None:
        if not hasattr(teacher, "lora_disabled"):
            raise TypeError(f"{type(teacher).__name__} has no lora_disabled(): pass the pretrained teacher instead")
        self.teacher = teacher

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)

    def predict(self, *args, **kw) -> Tensor:
        with self.teacher.lora_disabled():
            return self.teacher.predict(*args, **kw)

    def predict_branches(self, *args, **kw) -> tuple[Tensor, Tensor]:
        with self.teacher.lora_disabled():
            return self.teacher.predict_branches(*args, **kw)


def guided_eps(teacher: Any, x_t: Tensor, t: Tensor, cond: Any, guidance_scale: float, *,
               uncond_teacher: Any = None, camera: Tensor | None = None) -> Tensor:
    """``eps^w`` of ``teacher`` at ``(x_t, t)``; with ``uncond_teacher`` the unconditional branch comes from
    that model instead (the two are combined in epsilon space). Keeps the graph (no ``no_grad`` here)."""
    if uncond_teacher is None or float(guidance_scale) == 1.0:
        return teacher.predict(x_t, t, cond, guidance_scale=guidance_scale, output="epsilon", camera=camera)
    cond_eps = teacher.predict(x_t, t, cond, guidance_scale=1.0, output="epsilon", camera=camera)
    uncond_eps = uncond_teacher.predict_branches(x_t, t, cond, "epsilon", camera)[0]
    return cfg_combine(uncond_eps, cond_eps, guidance_scale)


# ------------------------------------------------------------------------------- cross-attention maps
@dataclass
class AttentionRecord:
    """Cross-attention probabilities of the chosen tokens in one layer of one forward call.

    ``probs``: ``[N, heads, h_l * w_l, K]`` (``N`` = the UNet's batch, ``K`` = number of tokens);
    ``full_shape``: the shape of the whole probability tensor ``(N * heads, h_l * w_l, L)``.
    """

    name: str
    probs: Tensor
    full_shape: tuple[int, ...]


def _layer_side(name: str) -> str:
    return "down" if name.startswith("down_blocks") else "up" if name.startswith("up_blocks") else "mid"


class _CaptureProcessor:
    """Wraps a cross-attention processor: records ``softmax(Q K^T / sqrt(d))`` for the chosen token columns,
    then lets the original processor compute the output (so the UNet's output is unchanged)."""

    def __init__(self, owner: "CrossAttentionCapture", name: str, inner: Any) -> None:
        self.owner, self.name, self.inner = owner, name, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if self.owner.active and encoder_hidden_states is not None:
            with torch.no_grad():
                self.owner.record(self.name, attn, hidden_states, encoder_hidden_states, temb)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class CrossAttentionCapture:
    """Records cross-attention (``attn2``) probabilities of token columns ``tokens`` of a diffusers
    ``UNet2DConditionModel`` (or a teacher with ``.unet``) while :meth:`recording`.

    ``sides``: which layers, any of ``"down"``, ``"mid"``, ``"up"`` (default down and up, the
    prompt-to-prompt convention); ``resolutions``: keep only layers whose side ``h_l`` (in latent pixels) is
    in this set (None: all), e.g. ``{16}`` for SD's 16x16 layers at 64x64 latents (needs ``latent_hw`` at
    :meth:`maps`, so filtering happens there). Use as a context manager (installs and restores the
    processors) and wrap the forward passes to record in ``with cap.recording(): ...``.

    Only the ``attn2`` processors are replaced; the wrapped original still computes the output (SDPA
    stays), and the probabilities are recomputed from ``to_q`` / ``to_k`` under ``no_grad``.
    """

    def __init__(self, unet: Any, tokens: Sequence[int], *, sides: Sequence[str] = ("down", "up"),
                 resolutions: Sequence[int] | None = None) -> None:
        self.unet = getattr(unet, "unet", unet)
        if not hasattr(self.unet, "attn_processors"):
            raise TypeError(f"{type(self.unet).__name__} is not a diffusers UNet (no attn_processors)")
        self.tokens = [int(k) for k in tokens]
        if not self.tokens:
            raise ValueError("CrossAttentionCapture needs at least one token index")
        bad = set(sides) - {"down", "mid", "up"}
        if bad:
            raise ValueError(f"sides must be among down / mid / up, got {sorted(bad)}")
        self.sides = tuple(sides)
        self.resolutions = None if resolutions is None else {int(r) for r in resolutions}
        self.records: list[AttentionRecord] = []
        self.active = False
        self._saved: dict[str, Any] | None = None

    # -- installation
    def __enter__(self) -> "CrossAttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        procs = {}
        for name, proc in self._saved.items():
            if ".attn2." in name and _layer_side(name) in self.sides:
                procs[name] = _CaptureProcessor(self, name, proc)
            else:
                procs[name] = proc
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None
        self.active = False

    @contextlib.contextmanager
    def recording(self, clear: bool = True) -> Iterator["CrossAttentionCapture"]:
        if self._saved is None:
            raise RuntimeError("enter the CrossAttentionCapture (with ...) before recording")
        if clear:
            self.records = []
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def record(self, name: str, attn: Any, hidden: Tensor, context: Tensor, temb: Tensor | None) -> None:
        h = hidden
        if getattr(attn, "spatial_norm", None) is not None:
            h = attn.spatial_norm(h, temb)
        if h.dim() == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        ctx = attn.norm_encoder_hidden_states(context) if getattr(attn, "norm_cross", None) else context
        q = attn.head_to_batch_dim(attn.to_q(h))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        probs = attn.get_attention_scores(q, k, None)  # [N*heads, HW, L]
        L = probs.shape[-1]
        if max(self.tokens) >= L or min(self.tokens) < -L:
            raise ValueError(f"token index out of range for a context of {L} tokens: {self.tokens}")
        heads = attn.heads
        sel = probs[..., self.tokens].float()
        self.records.append(AttentionRecord(name, sel.reshape(-1, heads, *sel.shape[1:]).detach(),
                                            tuple(probs.shape)))

    # -- aggregation
    def maps(self, latent_hw: tuple[int, int], batch: int | None = None) -> Tensor:
        """The recorded maps averaged over layers, heads and tokens, upsampled (bilinear) to ``latent_hw``:
        ``[N or batch, 1, h, w]`` (not normalised). ``batch``: keep the **last** ``batch`` rows of each call
        (the conditional half of a CFG batch ``[uncond, cond]``; ``None`` keeps all)."""
        return aggregate_attention(self.records, latent_hw, batch=batch, resolutions=self.resolutions)


def aggregate_attention(records: Sequence[AttentionRecord], latent_hw: tuple[int, int], *, batch: int | None = None,
                        resolutions: set[int] | None = None) -> Tensor:
    """Mean over records (layers), heads and tokens of ``probs``, each layer's map upsampled bilinearly to
    ``latent_hw`` -> ``[N, 1, h, w]``. Layers are placed on their grid ``h_l = h / f``, ``w_l = w / f`` with
    ``f = sqrt(h w / (h_l w_l))``."""
    H, W = int(latent_hw[0]), int(latent_hw[1])
    out, n = None, 0
    for rec in records:
        p = rec.probs
        if batch is not None:
            p = p[-int(batch):]
        hw = p.shape[2]
        f = math.sqrt(H * W / hw)
        hl, wl = int(round(H / f)), int(round(W / f))
        if hl * wl != hw:
            raise ValueError(f"layer {rec.name}: {hw} positions do not tile a {H}x{W} latent")
        if resolutions is not None and hl not in resolutions:
            continue
        m = p.mean(dim=(1, 3)).reshape(p.shape[0], 1, hl, wl)
        if (hl, wl) != (H, W):
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        out = m if out is None else out + m
        n += 1
    if out is None:
        raise ValueError("no cross-attention maps recorded (no matching layers, or nothing ran while recording)")
    return out / n


def subject_mask(maps: Tensor, *, threshold: float | None = 0.4, dilate: int = 0, eps: float = 1e-8) -> Tensor:
    """Maps ``[B,1,h,w]`` -> mask in [0, 1]: per-sample min-max normalisation, then ``>= threshold`` (hard,
    {0, 1}) or the normalised map itself (``threshold=None``, soft); ``dilate`` latent pixels of max-pool
    dilation (hard or soft). A constant map normalises to 0 (soft) and thresholds to all-ones (nothing to
    tell apart, so nothing is masked out)."""
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be [B,1,h,w], got {tuple(maps.shape)}")
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    norm = torch.where(span > eps, (maps - lo) / span.clamp_min(eps), torch.zeros_like(maps))
    if threshold is None:
        m = norm
    else:
        m = torch.where(span > eps, (norm >= float(threshold)).to(maps.dtype), torch.ones_like(maps))
    if dilate > 0:
        m = F.max_pool2d(m, kernel_size=2 * int(dilate) + 1, stride=1, padding=int(dilate))
    return m


def ema_mask(previous: Tensor | None, new: Tensor, decay: float = 0.9) -> Tensor:
    """Exponential moving average of attention maps over steps: ``decay * previous + (1 - decay) * new``
    (``new`` itself when there is no previous)."""
    if previous is None:
        return new
    return decay * previous + (1.0 - decay) * new


def token_indices(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``tokenizer(prompt)`` (with the start token at 0, as the UNet sees
    the padded sequence). Raises ``ValueError`` naming the word when it is not in the prompt."""
    ids = tokenizer(prompt)["input_ids"]
    sub = tokenizer(word, add_special_tokens=False)["input_ids"]
    for i in range(len(ids) - len(sub) + 1):
        if sub and ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    raise ValueError(f"subject word {word!r} is not a token sequence of the prompt {prompt!r}")


# ------------------------------------------------------------------------------------------------ DDS
@dataclass
class DDSOutput(ScoreOutput):
    source_pred: Tensor | None = None  # eps^w of the source branch at the source latent
    mask: Tensor | None = None  # the mask applied (None: none)
    attn_maps: Tensor | None = None  # [B,1,h,w] source-branch cross-attention maps (with source_capture)
    target_attn_maps: Tensor | None = None  # [B,1,h,w] target-branch maps (with target_capture)
    logs: dict[str, float] = field(default_factory=dict)


def dds(teacher: Any, latents: Tensor, source_latents: Tensor, cond: Any, source_cond: Any, t: Tensor, *,
        guidance_scale: float = 7.5, source_guidance_scale: float | None = None, source_teacher: Any = None,
        uncond_model_target: str = "personalized", mask: Tensor | None = None,
        source_capture: CrossAttentionCapture | None = None, target_capture: CrossAttentionCapture | None = None,
        weighting: str = "uniform", scale: float = 1.0,
        grad_clip: float | None = None, noise: Tensor | None = None, camera: Tensor | None = None,
        generator: torch.Generator | None = None) -> DDSOutput:
    """DDS / DDS-S / DDS-SM gradient and loss for the edited ``latents [B,C,h,w]`` (module doc).

    Args:
        teacher: the target-branch model (the personalised teacher).
        source_latents: ``z_src`` ``[B or 1, C, h, w]`` (the source image's latent, never differentiated).
        cond / source_cond: ``TextCond`` of the target prompt ``y`` and the source prompt ``y_src`` (their
            negative embeddings are the unconditional branches).
        t: ``[B]`` timesteps, shared by both branches (so is ``noise``).
        source_guidance_scale: the source branch's CFG (default: ``guidance_scale``).
        source_teacher: the source-branch model: None = ``teacher`` (naive personalised DDS); the pretrained
            teacher or ``AdaptersOff(teacher)`` = DDS-S.
        uncond_model_target: ``"personalized"`` (default) or ``"pretrained"``: which model gives the target
            branch's unconditional prediction.
        mask: ``M`` ``[B or 1, 1, h, w]`` (DDS-SM); None = no mask.
        source_capture: an entered :class:`CrossAttentionCapture` on the source model's UNet: the source
            branch runs while recording, and ``attn_maps`` holds its conditional rows' maps.
        target_capture: the same for the target branch (the personalised model on ``z`` with ``y``, e.g. the
            ``V*`` / class tokens): ``target_attn_maps``; ``torch.maximum`` of the two normalised masks is the
            union for shape-changing concepts (spec 4.5). Two captures may sit on one shared UNet. (With
            ``uncond_model_target="pretrained"`` on a shared UNet it also records that unconditional call.)
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if uncond_model_target not in UNCOND_MODELS:
        raise ValueError(f"uncond_model_target must be one of {UNCOND_MODELS}, got {uncond_model_target!r}")
    if source_latents.shape[1:] != latents.shape[1:]:
        raise ValueError(f"source latents {tuple(source_latents.shape)} do not match latents {tuple(latents.shape)}")
    B = latents.shape[0]
    src_model = teacher if source_teacher is None else source_teacher
    w_src = guidance_scale if source_guidance_scale is None else source_guidance_scale
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    sched = teacher.schedule
    z_src = source_latents.detach().to(latents.dtype).expand_as(latents)
    with torch.no_grad():
        z_t = sched.add_noise(latents.detach(), noise, t)
        zs_t = sched.add_noise(z_src, noise, t)
        unc = src_model if uncond_model_target == "pretrained" else None
        rec_t = target_capture.recording() if target_capture is not None else contextlib.nullcontext()
        with rec_t:
            eps_tgt = guided_eps(teacher, z_t, t, cond, guidance_scale, uncond_teacher=unc, camera=camera)
        tmaps = target_capture.maps(tuple(latents.shape[-2:]), batch=B) if target_capture is not None else None
        rec = source_capture.recording() if source_capture is not None else contextlib.nullcontext()
        with rec:
            eps_src = src_model.predict(zs_t, t, source_cond, guidance_scale=w_src, output="epsilon", camera=camera)
        maps = source_capture.maps(tuple(latents.shape[-2:]), batch=B) if source_capture is not None else None
        w = sched.weight(t, weighting, latents).to(latents.dtype)
        grad = dds_direction(eps_tgt.to(latents.dtype), eps_src.to(latents.dtype), w, mask)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
    logs = {"dds_grad_norm": float(grad.float().norm())}
    if mask is not None:
        logs["dds_mask_mean"] = float(mask.float().mean())
    return DDSOutput(inject_gradient(latents, grad, scale), grad * scale, t, noise, eps_tgt, eps_src, mask, maps,
                     tmaps, logs)


# ------------------------------------------------------------------------------------- DDS-SM: the mask
@torch.no_grad()
def attention_subject_mask(source_teacher: Any, source_latents: Tensor, source_cond: Any, tokens: Sequence[int],
                           timesteps: Sequence[int] = (200, 400, 600), *, guidance_scale: float = 7.5,
                           threshold: float | None = 0.4, dilate: int = 1, decay: float = 0.5,
                           sides: Sequence[str] = ("down", "up"), resolutions: Sequence[int] | None = None,
                           generator: torch.Generator | None = None, camera: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DDS-SM's automatic subject mask (spec 4): the source branch's cross-attention on the subject token(s).

    Runs the source model (``source_teacher``, the pretrained model) on ``z_src`` noised at each of
    ``timesteps`` (one shared seeded noise) with the source prompt, records the cross-attention probabilities
    of ``tokens`` (:class:`CrossAttentionCapture`, mean over heads, layers of ``sides`` / ``resolutions`` and
    tokens, bilinear to the latent size), accumulates them with :func:`ema_mask` (``decay``) and turns the result
    into ``M`` with :func:`subject_mask` (min-max normalised; ``threshold`` hard mask or None soft; ``dilate``
    latent pixels). Returns ``(mask [B,1,h,w], raw_maps [B,1,h,w])``; nothing changes the model.

    Reconstructed choices [S] (spec 4, 12.7), all arguments: a static mask computed once before editing (the
    spec's running EMA over the DDS iterations, computed up front at a few fixed timesteps instead), the
    timesteps 200/400/600, EMA decay 0.5, threshold 0.4, one latent pixel of dilation, down + up layers at every
    resolution (SD: pass ``resolutions=(16,)`` for prompt-to-prompt's 16x16 maps).
    """
    if not timesteps:
        raise ValueError("attention_subject_mask needs at least one timestep")
    z = source_latents.detach()
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    sched = source_teacher.schedule
    acc = None
    with CrossAttentionCapture(getattr(source_teacher, "unet", source_teacher), tokens, sides=sides,
                               resolutions=resolutions) as cap:
        for tv in timesteps:
            t = torch.full((z.shape[0],), int(tv), dtype=torch.long, device=z.device)
            with cap.recording():
                source_teacher.predict(sched.add_noise(z, noise, t), t, source_cond, guidance_scale=guidance_scale,
                                       output="epsilon", camera=camera)
            acc = ema_mask(acc, cap.maps(tuple(z.shape[-2:]), batch=z.shape[0]), decay)
    return subject_mask(acc, threshold=threshold, dilate=dilate), acc
