"""``shapeworld-exact``: the exact optimal denoiser of ShapeWorld, the ground-truth teacher.

Data model. For a prompt ``y`` (and optionally a camera ``c``) the clean-image distribution is the
Gaussian-smoothed set of reference renders ``p(x0 | y, c) = 1/K sum_i N(x0; r_i, s^2 I)`` in the model
space ``x = 2 * image - 1`` (64x64, white background). With ``x_t = a x0 + sigma eps`` its exact
posterior mean is

    E[x0 | x_t] = sum_i w_i (r_i + k (x_t - a r_i)),   w = softmax_i(-|x_t - a r_i|^2 / (2 (a^2 s^2 + sigma^2))),
    k = a s^2 / (a^2 s^2 + sigma^2),

and the teacher returns the matching epsilon ``(x_t - a E[x0|x_t]) / sigma`` (DDPM scaled-linear schedule,
1000 steps, as SD). No network, no training: it is exact, so benchmarks measure the *distillation*
and not a teacher's errors.

Conditioning.
* Text: the prompt selects the objects whose ShapeWorld prompt matches (view phrases are stripped);
  the empty prompt (the unconditional branch of CFG) selects **all** objects, so CFG pushes away from
  the other objects. A view phrase ("front view", "side view", "back view", "overhead view")
  restricts the ring references to that view range when no camera is given.
* Camera (``view_conditioned=True`` and a ``camera`` vector from ``Cameras.to_vector``): the references
  are the selected objects rendered *at that camera* (exact view-conditional teacher, no Janus by
  construction). Without a camera, the references are renders from a fixed ring (8 azimuths x
  2 elevations), like a text-to-image prior that has seen the objects from a few views (Janus-prone,
  which is what makes Janus measurable).

An unknown prompt raises ``UserError`` listing the ShapeWorld prompts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cameras import Cameras, orbit_cameras
from ..errors import UserError
from ..world.objects import OBJECTS, find_object_for_prompt
from ..world.references import render_gaussian_views
from .base import ImageTeacher
from .prompts import view_suffixes
from .schedule import NoiseSchedule

VIEWS = ("front view", "side view", "back view", "overhead view")


def _view_of(text: str) -> int | None:
    t = text.lower()
    for i, v in enumerate(VIEWS):
        if v in t:
            return i
    if "left side view" in t or "right side view" in t:
        return 1
    return None


def mixture_epsilon(x_t: Tensor, a: Tensor, s: Tensor, refs: Tensor, log_prior: Tensor, smoothing: float) -> Tensor:
    """Exact posterior-mean epsilon of ``p(x0) = sum_k pi_k N(x0; r_k, smoothing^2 I)`` at ``x_t = a x0 + s eps``.

    ``x_t [B, ...]`` (images ``[B,C,H,W]`` or videos ``[B,C,F,H,W]``), ``a`` / ``s`` broadcastable ``[B,1,...]``,
    ``refs`` either per sample ``[B,K, ...]`` or shared by the batch ``[K, ...]``, ``log_prior`` ``[B,K]`` or
    ``[K]`` (``log pi_k`` up to a per-sample constant; ``-inf`` removes a reference). See the module doc for the
    formula. The squared distances are expanded (``|x|^2 - 2 a x.r + a^2 |r|^2``, one matrix product) and
    computed in float64, so thousands of video references cost one GEMM and no ``[B,K,D]`` temporary.
    """
    B = x_t.shape[0]
    dt = torch.float64 if x_t.device.type != "mps" else torch.float32
    x = x_t.reshape(B, -1).to(dt)
    a = a.reshape(B, 1).to(dt)
    s = s.reshape(B, 1).to(dt)
    shared = refs.dim() == x_t.dim()
    R = refs.reshape(refs.shape[0], -1).to(dt) if shared else refs.reshape(B, refs.shape[1], -1).to(dt)
    dots = x @ R.T if shared else torch.einsum("bd,bkd->bk", x, R)  # [B,K]
    rr = (R * R).sum(-1)  # [K] or [B,K]
    sq = (x * x).sum(-1, keepdim=True) - 2 * a * dots + a * a * rr
    var = a * a * smoothing**2 + s * s  # [B,1]
    logits = log_prior.to(dt) - sq / (2 * var)
    w = torch.softmax(logits, dim=-1)  # [B,K]
    mean_r = w @ R if shared else torch.einsum("bk,bkd->bd", w, R)
    k = a * smoothing**2 / var
    x0 = mean_r + k * (x - a * mean_r)  # = sum_k w_k (r_k + k (x - a r_k))
    return ((x - a * x0) / s).to(x_t.dtype).reshape(x_t.shape)


class ShapeWorldPixelTeacher(ImageTeacher):
    """Shared base of the exact ShapeWorld teachers: pixel space ``x = 2 * image - 1`` at ``resolution``,
    SD's scaled-linear DDPM schedule (epsilon), the objects' Gaussian sets and a white-background renderer."""

    latent_channels = 3
    vae_scale_factor = 1
    is_latent = False

    def __init__(self, *, resolution: int = 64, smoothing: float = 0.05, n_gaussians: int = 6000,
                 backend: str = "auto", seed: int = 0):
        super().__init__()
        self.native_resolution = int(resolution)
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.smoothing = float(smoothing)
        self.backend = backend
        self.objects = list(OBJECTS.values())
        self.gaussians = [o.gaussians(n_gaussians, seed=seed) for o in self.objects]

    def encode(self, images: Tensor) -> Tensor:
        x = images
        if x.shape[-1] != self.native_resolution or x.shape[-2] != self.native_resolution:
            x = torch.nn.functional.interpolate(x, size=(self.native_resolution,) * 2, mode="bilinear",
                                                align_corners=False, antialias=True)
        return x * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def _render(self, g: dict[str, Tensor], cams: Cameras) -> Tensor:
        r = render_gaussian_views(g, cams, background=(1.0, 1.0, 1.0), backend=self.backend)["images"]
        return r.permute(0, 3, 1, 2) * 2 - 1  # [V,3,H,W] model space


class ShapeWorldExactTeacher(ShapeWorldPixelTeacher):
    def __init__(self, *, resolution: int = 64, smoothing: float = 0.05, view_conditioned: bool = True,
                 n_gaussians: int = 6000, ring_azimuths: int = 8, ring_elevations=(0.0, 20.0), backend: str = "auto",
                 seed: int = 0):
        super().__init__(resolution=resolution, smoothing=smoothing, n_gaussians=n_gaussians, backend=backend,
                         seed=seed)
        self.name = "shapeworld-exact"
        self.view_conditioned = bool(view_conditioned)
        self.ring_elevations = tuple(float(e) for e in ring_elevations)
        self.ring_azimuths = int(ring_azimuths)
        az = (torch.arange(ring_azimuths) * 360.0 / ring_azimuths).repeat(len(ring_elevations))
        el = torch.tensor(self.ring_elevations).repeat_interleave(ring_azimuths)
        self.ring_cameras = orbit_cameras(el, az, 3.2, 40.0, self.native_resolution, self.native_resolution)
        self.ring_views = torch.tensor([VIEWS.index(v) for v in view_suffixes(az, el)])
        self._ring_refs: Tensor | None = None

    @property
    def ring_refs(self) -> Tensor:
        """Fixed ring references of the camera-free teacher ``[n_obj, V, 3, H, W]`` (rendered on first use)."""
        if self._ring_refs is None:
            self._ring_refs = torch.stack([self._render(g, self.ring_cameras) for g in self.gaussians])
        return self._ring_refs

    # ------------------------------------------------------------------ protocol
    def _embed_texts(self, texts: list[str]) -> Tensor:
        """Multi-hot over objects (empty prompt = all) followed by a one-hot view phrase (or zeros)."""
        n = len(self.objects)
        out = torch.zeros(len(texts), n + len(VIEWS))
        for i, text in enumerate(texts):
            if not text.strip():
                out[i, :n] = 1
                continue
            obj = find_object_for_prompt(text)
            if obj is None:
                raise UserError(f"prompt {text!r} is not a ShapeWorld object; use one of: "
                                + "; ".join(o.prompt for o in self.objects)
                                + " (or pass --teacher with a diffusers model id or path)")
            out[i, self.objects.index(obj)] = 1
            v = _view_of(text)
            if v is not None:
                out[i, n + v] = 1
        return out

    def references(self, embeds: Tensor, camera: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per sample: references ``[B, K, 3, H, W]`` and a validity mask ``[B, K]``."""
        n = len(self.objects)
        B = embeds.shape[0]
        if camera is not None and self.view_conditioned:
            cams = Cameras.from_vector(camera.detach().float().cpu(), self.native_resolution, self.native_resolution)
            mask = embeds[:, :n] > 0
            size = self.native_resolution
            refs = torch.zeros(B, n, 3, size, size)
            for i in torch.nonzero(mask.any(0)).flatten().tolist():  # render only objects some sample needs
                rows = torch.nonzero(mask[:, i]).flatten()
                refs[rows, i] = self._render(self.gaussians[i], cams[rows])
            return refs, mask
        refs = self.ring_refs.reshape(1, -1, *self.ring_refs.shape[2:]).expand(B, -1, -1, -1, -1)  # [B, n*V, ...]
        V = self.ring_refs.shape[1]
        obj_mask = (embeds[:, :n] > 0).repeat_interleave(V, dim=1)
        view = embeds[:, n:]
        has_view = view.sum(-1, keepdim=True) > 0
        view_ok = view[:, self.ring_views.repeat(n)] > 0
        mask = obj_mask & (view_ok | ~has_view)
        return refs, mask

    @torch.no_grad()
    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        refs, mask = self.references(embeds.cpu(), camera)
        refs = refs.to(x_t.device, x_t.dtype)
        mask = mask.to(x_t.device)
        a = self.schedule.alpha(t, x_t)  # [B,1,1,1]
        s = self.schedule.sigma(t, x_t)
        log_prior = torch.zeros(mask.shape, dtype=x_t.dtype, device=x_t.device).masked_fill(~mask, float("-inf"))
        return mixture_epsilon(x_t, a, s, refs, log_prior, self.smoothing)


def make_shapeworld_exact(**kw) -> ShapeWorldExactTeacher:
    return ShapeWorldExactTeacher(**kw).freeze()
