"""Process reward models: noise-aware rewards ``R(x_sigma, sigma, prompt)`` and their gradients w.r.t. ``x_sigma``.

Euphonium (spec 4.1-4.3) steers the flow SDE of an RL rollout with ``grad_x R`` of a latent, noise-aware
process reward model (PRM) and credits each step with the PRM's score. This module holds the protocol and the
exact PRMs of the studio's analytic worlds:

* :class:`ProcessReward` -- the protocol: ``reward(x, sigma, prompts) -> [B]`` and ``reward_and_grad`` (by
  autograd unless a subclass has a closed form); :meth:`ProcessReward.bind` gives the ``(x, sigma) -> (R, G)``
  callable :func:`~studio.teachers.sampling.flow_sde_rollout` takes.
* :class:`GaussianWorldReward` -- a Gaussian world ``x0 ~ N(m, s0^2 I)`` on rectified flow with the quadratic
  outcome reward ``R0(x0) = -(lam / 2) ||x0 - c||^2``; everything is closed form: the exact velocity, the PRM
  as the expected outcome reward ``E[R0 | x_sigma]`` or as the soft value ``beta log E[exp(R0 / beta) | x_sigma]``
  (the KL-tilt value function of spec 4.1), its gradient, and the moments of the tilted target
  ``p(x0) exp(R0 / beta)``. The tests of the Euphonium parts run on it.
* :class:`ShapeWorldVideoProcessReward` -- the exact process reward of ShapeWorld video: the posterior over the
  exact video teacher's reference clips given ``x_sigma``, each clip scored by the ground-truth checks
  (:func:`studio.world.video_metrics.motion_accuracy` by default): the expected outcome reward. ``support="all"``
  puts the posterior on the references of *every* prompt (the exact teacher's unconditional data), each scored
  against the asked prompt, so the value says how likely ``x_sigma`` is to become a clip that does what the
  prompt says (the target of the trained PRM);
* :class:`VideoPRMNet` -- the tiny *trained* PRM of ShapeWorld video (a small FiLM-conditioned 3D conv net on
  ``(x_sigma, sigma, prompt words)``, trained against the exact value above by
  ``scripts/train_shapeworld_prm.py``; weights shipped as ``assets/shapeworld-video-prm``);
* :class:`DenoiserProcessReward` -- a PRM built on a real video denoiser (the PRFL / ``Latent_PRM`` line: a
  video generation model re-used as a noise-aware reward model): the frozen denoiser's ``x0`` prediction at
  ``(x_sigma, t(sigma), prompt)``, pooled per channel (mean and temporal-difference energy), through a small
  trainable head. Any video teacher class the registry loads serves as the backbone (tested on a tiny Wan);
* :func:`load_process_reward` -- by name (``shapeworld-video-prm``, ``shapeworld-video-exact-prm``, ``none``) or
  by folder (``prm.json`` + ``prm.safetensors``).

``sigma`` is the flow noise level (``x_sigma = (1 - sigma) x0 + sigma eps``), a float or ``[B]``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["DenoiserProcessReward", "GaussianWorldReward", "PRM_NAMES", "ProcessReward",
           "ShapeWorldVideoProcessReward", "TRAINED_PRM_NAME", "VideoPRMNet", "load_process_reward",
           "prompt_word_ids"]

#: the shipped trained ShapeWorld video PRM (``assets/<name>``, written by ``scripts/train_shapeworld_prm.py``)
TRAINED_PRM_NAME = "shapeworld-video-prm"
#: names :func:`load_process_reward` knows besides folders
PRM_NAMES = (TRAINED_PRM_NAME, "shapeworld-video-exact-prm", "none")
PRM_FILE = "prm.json"
PRM_WEIGHTS = "prm.safetensors"


def _col(value: float | Tensor, x: Tensor) -> Tensor:
    """``value`` as a tensor broadcasting against ``x`` (``[B]`` -> ``[B,1,...]``)."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.numel() > 1 else t.reshape(())


def _batch_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


class ProcessReward:
    """The process-reward protocol. Subclasses implement :meth:`reward`; :meth:`reward_and_grad` differentiates
    it with autograd (override it where the gradient has a closed form)."""

    name = "process-reward"

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        """``[B]`` rewards of the noisy samples ``x`` (``[B, ...]``) at noise level ``sigma``."""
        raise NotImplementedError

    def reward_and_grad(self, x: Tensor, sigma: float | Tensor,
                        prompts: str | Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """``(R [B], dR/dx [B, ...])``, both detached (one forward and backward; each sample's reward depends on
        its own row only, so the gradient of the sum is the per-sample gradient)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            r = self.reward(xg, sigma, prompts)
            (g,) = torch.autograd.grad(r.sum(), xg)
        return r.detach(), g.detach()

    def bind(self, prompts: str | Sequence[str] | None = None) -> Callable[[Tensor, float], tuple[Tensor, Tensor]]:
        """``(x, sigma) -> (R, grad R)`` for the given prompts, the form a rollout queries."""
        return lambda x, sigma: self.reward_and_grad(x, sigma, prompts)


class GaussianWorldReward(ProcessReward):
    """An exactly solvable world for the Euphonium parts (see the module doc).

    Data ``x0 ~ N(mean, std^2 I)`` (every element independent), rectified flow ``x_sigma = (1 - sigma) x0 + sigma
    eps``, outcome reward ``R0(x0) = -(sharpness / 2) ||x0 - target||^2`` (summed over the elements). Given
    ``x_sigma`` the posterior of ``x0`` is ``N(mu, V)`` per element with precision ``P = 1 / std^2 + (1 - sigma)^2
    / sigma^2``, ``mu = (mean / std^2 + (1 - sigma) x / sigma^2) / P`` and ``V = 1 / P``.

    ``beta=None``: the PRM is the expected outcome reward ``E[R0 | x_sigma] = -(lam / 2) sum((mu - c)^2 + V)``;
    ``beta > 0``: the soft value ``beta log E[exp(R0 / beta) | x_sigma] = sum(-(beta / 2) log(1 + lam V / beta) -
    beta lam (mu - c)^2 / (2 (beta + lam V)))``, whose gradient ``/ beta`` is the exact score correction of the
    tilted target. Both gradients are closed form (the tests check them against autograd).
    """

    name = "gaussian-world"

    def __init__(self, mean: float = 0.0, std: float = 1.0, target: float = 1.0, sharpness: float = 1.0,
                 beta: float | None = None):
        if std <= 0 or sharpness < 0 or (beta is not None and beta <= 0):
            raise UserError(f"the Gaussian world needs std > 0, sharpness >= 0 and beta > 0 (or None); got std={std}, "
                            f"sharpness={sharpness}, beta={beta}")
        self.mean, self.std, self.target = float(mean), float(std), float(target)
        self.sharpness = float(sharpness)
        self.beta = None if beta is None else float(beta)

    # ------------------------------------------------------------------ the world
    def posterior(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu, V, dmu/dx)`` of ``x0 | x_sigma`` (each element independent; ``sigma > 0``)."""
        s = _col(sigma, x)
        if bool((s <= 0).any()):
            raise UserError("the posterior at sigma = 0 is a point mass; query sigma > 0")
        a = 1.0 - s
        prec = 1.0 / self.std ** 2 + a * a / (s * s)
        mu = (self.mean / self.std ** 2 + a * x / (s * s)) / prec
        return mu, (1.0 / prec).expand_as(x), (a / (s * s) / prec).expand_as(x)

    def velocity(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The exact flow velocity ``E[eps - x0 | x_sigma]``."""
        s = _col(sigma, x)
        mu = self.posterior(x, sigma)[0]
        return (x - (1.0 - s) * mu) / s - mu

    def sample_x0(self, shape: Sequence[int], generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64) -> Tensor:
        return self.mean + self.std * torch.randn(tuple(shape), generator=generator, dtype=dtype)

    def outcome_reward(self, x0: Tensor) -> Tensor:
        """``[B]``: ``R0(x0) = -(lam / 2) ||x0 - c||^2``."""
        return -0.5 * self.sharpness * _batch_sum((x0 - self.target) ** 2)

    def tilted_moments(self, beta: float | None = None) -> tuple[float, float]:
        """Mean and variance (per element) of the tilted target ``p(x0) exp(R0(x0) / beta)`` (default: this
        world's ``beta``)."""
        b = self.beta if beta is None else float(beta)
        if b is None:
            raise UserError("tilted_moments needs beta")
        prec = 1.0 / self.std ** 2 + self.sharpness / b
        return (self.mean / self.std ** 2 + self.sharpness * self.target / b) / prec, 1.0 / prec

    # ------------------------------------------------------------------ the PRM
    def _value(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        mu, V, dmu = self.posterior(x, sigma)
        lam, d = self.sharpness, mu - self.target
        if self.beta is None:
            return -0.5 * lam * _batch_sum(d * d + V), -lam * d * dmu
        b = self.beta
        r = -0.5 * b * torch.log1p(lam * V / b) - b * lam * d * d / (2.0 * (b + lam * V))
        return _batch_sum(r), -b * lam * d / (b + lam * V) * dmu

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        return self._value(x, sigma)[0]

    def reward_and_grad(self, x: Tensor, sigma: float | Tensor,
                        prompts: str | Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        r, g = self._value(x.detach(), sigma)
        return r, g


class ShapeWorldVideoProcessReward(ProcessReward):
    """The exact process reward of ShapeWorld video: ``R(x_sigma, prompt) = sum_i w_i(x_sigma) r_i``.

    The exact video teacher's data for a prompt is the mixture ``1/k sum_i N(ref_i, s^2 I)`` of its reference clips
    (model space ``2 video - 1``); at ``x_sigma = (1 - sigma) x0 + sigma eps`` the posterior weight of clip ``i``
    is ``softmax_i(-||x_sigma - (1 - sigma) ref_i||^2 / (2 ((1 - sigma)^2 s^2 + sigma^2)))``. Each reference clip
    is scored once by ``clip_reward(videos [k,F,3,H,W] in [0, 1], prompts) -> [k]``, the ground-truth check
    (default: :func:`~studio.world.video_metrics.motion_accuracy` per clip), so ``R`` is the expected outcome
    reward of the clip ``x_sigma`` will denoise to. Its gradient is exact (autograd through the softmax).
    Flow schedule (``sigma``) only; ``teacher`` is a :class:`~studio.teachers.shapeworld_video.
    ShapeWorldVideoExactTeacher`.
    """

    name = "shapeworld-video-exact-prm"

    def __init__(self, teacher, clip_reward: Callable[[Tensor, list[str]], Tensor] | None = None,
                 support: str = "prompt"):
        if not teacher.schedule.is_flow:
            raise UserError("the ShapeWorld process reward is defined on the flow schedule; load the exact video "
                            "teacher with schedule='flow'")
        if support not in ("prompt", "all"):
            raise UserError(f"support must be 'prompt' (the prompt's own references) or 'all' (every prompt's), "
                            f"got {support!r}")
        self.teacher = teacher
        self.clip_reward = clip_reward
        self.support = support
        self._scores: dict[str, Tensor] = {}

    def _reference_scores(self, prompt: str) -> tuple[Tensor, Tensor]:
        """``(references [k,3,F,H,W] float64, their scores against prompt [k])`` of the posterior's support."""
        from ..world.clips import parse_video_prompt, video_prompt

        key = video_prompt(*parse_video_prompt(prompt))
        refs = self.teacher.references(key if self.support == "prompt" else "")  # [k,3,F,H,W] float64
        if key not in self._scores:
            videos = ((refs.permute(0, 2, 1, 3, 4) + 1) / 2).float().clamp(0, 1)  # [k,F,3,H,W]
            if self.clip_reward is None:
                from ..world.video_metrics import motion_accuracy
                scores = motion_accuracy(videos, [key] * refs.shape[0], per_clip=True)
            else:
                scores = self.clip_reward(videos, [key] * refs.shape[0])
            self._scores[key] = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        return refs, self._scores[key]

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        if prompts is None:
            raise UserError("the ShapeWorld process reward needs the prompt of each sample")
        plist = [prompts] * x.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(plist) != x.shape[0]:
            raise UserError(f"{len(plist)} prompts for {x.shape[0]} samples; give one prompt per sample (or one)")
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = []
        for b, p in enumerate(plist):
            refs, scores = self._reference_scores(p)
            a, sb = 1.0 - s[b], s[b]
            var = a * a * self.teacher.smoothing ** 2 + sb * sb
            d2 = ((x[b].to(torch.float64)[None] - a * refs.to(x.device)) ** 2).reshape(refs.shape[0], -1).sum(1)
            w = torch.softmax(-d2 / (2 * var), dim=0)
            out.append((w * scores.to(x.device)).sum())
        return torch.stack(out).to(x.dtype)


# --------------------------------------------------------------------------------------- trained PRMs
def prompt_word_ids(prompts: Sequence[str]) -> Tensor:
    """``[B, 4]`` long: the ShapeWorld words of each prompt (shape, colour, motion, camera) as indices into
    :data:`~studio.world.clips.SHAPES`, ``COLORS``, ``MOTIONS``, ``CAMERAS` (``UserError`` names the grammar)."""
    from ..world.clips import CAMERAS, COLORS, MOTIONS, SHAPES, parse_video_prompt

    rows = []
    for p in prompts:
        shape, color, motion, camera = parse_video_prompt(p)
        rows.append([SHAPES.index(shape), list(COLORS).index(color), MOTIONS.index(motion), CAMERAS.index(camera)])
    return torch.tensor(rows, dtype=torch.long)


class VideoPRMNet(torch.nn.Module, ProcessReward):
    """The tiny trained ShapeWorld video PRM: ``R(x_sigma, sigma, prompt)`` in [0, 1] (module doc).

    Input ``x`` ``[B,3,F,H,W]`` in pixel model space (``2 video - 1``; any ``F, H, W``: the features are pooled),
    scaled by ``1 / sqrt((1 - sigma)^2 / 2 + sigma^2)`` (about unit variance at every noise level); three 3D
    convolutions (``width``, ``2 width``, ``4 width`` channels; strides ``(1,2,2)``, 2, 2), each followed by SiLU and
    a FiLM modulation from the condition (the four prompt words' embeddings plus Fourier features of ``sigma``);
    mean- and max-pooled, joined with the condition, a 2-layer MLP, a sigmoid. ``reward_and_grad`` is autograd
    (the protocol's). Frozen (eval, no parameter grads) unless :meth:`trainable` is called.
    """

    name = TRAINED_PRM_NAME

    def __init__(self, width: int = 16, cond_dim: int = 32, hidden: int = 64, in_channels: int = 3):
        from ..world.clips import CAMERAS, COLORS, MOTIONS, SHAPES

        torch.nn.Module.__init__(self)
        self.config = {"class": "VideoPRMNet", "width": int(width), "cond_dim": int(cond_dim), "hidden": int(hidden),
                       "in_channels": int(in_channels)}
        nn = torch.nn
        self.words = nn.ModuleList([nn.Embedding(n, cond_dim) for n in (len(SHAPES), len(COLORS), len(MOTIONS),
                                                                        len(CAMERAS))])
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32) * math.pi, persistent=False)
        self.sigma_proj = nn.Linear(16, cond_dim)
        chans = [in_channels, width, 2 * width, 4 * width]
        strides = [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
        self.convs = nn.ModuleList([nn.Conv3d(chans[i], chans[i + 1], 3, stride=strides[i], padding=1)
                                    for i in range(3)])
        self.films = nn.ModuleList([nn.Linear(cond_dim, 2 * chans[i + 1]) for i in range(3)])
        for f in self.films:
            nn.init.zeros_(f.weight)
            nn.init.zeros_(f.bias)
        self.mlp = nn.Sequential(nn.Linear(2 * chans[-1] + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def cond(self, sigma: Tensor, words: Tensor) -> Tensor:
        ang = sigma.float()[:, None] * self.freqs
        c = self.sigma_proj(torch.cat([ang.sin(), ang.cos()], dim=1))
        for i, emb in enumerate(self.words):
            c = c + emb(words[:, i])
        return torch.nn.functional.silu(c)

    def logits(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str]) -> Tensor:
        plist = [prompts] * x.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(plist) != x.shape[0]:
            raise UserError(f"{len(plist)} prompts for {x.shape[0]} samples; give one prompt per sample (or one)")
        dev = self.sigma_proj.weight.device
        s = torch.as_tensor(sigma, dtype=torch.float32, device=dev).reshape(-1).expand(x.shape[0])
        c = self.cond(s, prompt_word_ids(plist).to(dev))
        scale = torch.rsqrt((1 - s) ** 2 / 2 + s * s).reshape(-1, 1, 1, 1, 1)
        h = x.to(dev, torch.float32) * scale
        for conv, film in zip(self.convs, self.films):
            h = torch.nn.functional.silu(conv(h))
            g, b = film(c).chunk(2, dim=1)
            h = h * (1 + g[:, :, None, None, None]) + b[:, :, None, None, None]
        feat = torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4)), c], dim=1)
        return self.mlp(feat).squeeze(1)

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        if prompts is None:
            raise UserError("the ShapeWorld PRM needs the prompt of each sample")
        return torch.sigmoid(self.logits(x, sigma, prompts)).to(x.dtype)

    def freeze(self) -> "VideoPRMNet":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def save_pretrained(self, folder: str | Path, info: dict | None = None) -> Path:
        """``folder/prm.json`` (config + ``info``) and ``folder/prm.safetensors``, each written atomically."""
        return _save_prm(folder, self.config, self.state_dict(), info)

    @classmethod
    def from_config(cls, config: dict) -> "VideoPRMNet":
        return cls(**{k: v for k, v in config.items() if k in ("width", "cond_dim", "hidden", "in_channels")})


class DenoiserProcessReward(torch.nn.Module, ProcessReward):
    """A process reward model on a real video denoiser (module doc; spec 4.2's ``Latent_PRM`` role).

    ``R(x_sigma, sigma, prompt) = head([mean_{F,h,w} x0_hat, sqrt(mean_{F,h,w} (d_F x0_hat)^2)])`` with ``x0_hat``
    the frozen teacher's (CFG-free) ``x0`` prediction at ``t = timestep_from_sigma(sigma)`` and ``d_F`` the
    frame-to-frame difference (motion energy per channel): ``2 C`` features, ``head`` = Linear-SiLU-Linear. The
    gradient w.r.t. ``x_sigma`` runs through the whole denoiser (one forward and backward per query, as the
    released PRM). Only the head trains; ``backbone`` (the name or path the teacher loads from) is recorded so
    :func:`load_process_reward` rebuilds it from ``prm.json``. Latent teachers score latents (no decode).
    """

    name = "denoiser-prm"

    def __init__(self, teacher, backbone: str, hidden: int = 32, seed: int = 0):
        torch.nn.Module.__init__(self)
        self.teacher = teacher
        C = int(teacher.latent_channels)
        self.config = {"class": "DenoiserProcessReward", "backbone": str(backbone), "hidden": int(hidden)}
        g = torch.Generator().manual_seed(int(seed))
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * C, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def features(self, x: Tensor, sigma: float | Tensor, prompts: Sequence[str]) -> Tensor:
        sched = self.teacher.schedule
        lo, hi = float(sched.sigma(torch.tensor([0]))[0]), float(sched.sigma(torch.tensor([sched.num_train_timesteps - 1]))[0])
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).clamp(lo, hi)
        t = sched.timestep_from_sigma(s).to(x.device)
        cond = self.teacher.encode_prompt(list(prompts))
        x0 = self.teacher.predict(x.to(self.teacher.dtype), t, cond, guidance_scale=1.0, output="sample").float()
        mean = x0.mean((2, 3, 4))
        motion = ((x0[:, :, 1:] - x0[:, :, :-1]) ** 2).mean((2, 3, 4)).add(1e-12).sqrt() if x0.shape[2] > 1 \
            else torch.zeros_like(mean)
        return torch.cat([mean, motion], dim=1)

    def reward(self, x: Tensor, sigma: float | Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        plist = [prompts or ""] * x.shape[0] if prompts is None or isinstance(prompts, str) else list(prompts)
        if len(plist) != x.shape[0]:
            raise UserError(f"{len(plist)} prompts for {x.shape[0]} samples; give one prompt per sample (or one)")
        return self.head(self.features(x, sigma, plist)).squeeze(1).to(x.dtype)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    def save_pretrained(self, folder: str | Path, info: dict | None = None) -> Path:
        """``folder/prm.json`` (config with the backbone + ``info``) and the head as ``folder/prm.safetensors``."""
        return _save_prm(folder, self.config, {f"head.{k}": v for k, v in self.head.state_dict().items()}, info)


def _save_prm(folder: str | Path, config: dict, state: dict, info: dict | None) -> Path:
    import json

    from safetensors.torch import save_file

    from ..io.atomic import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / PRM_WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    atomic_write_text(folder / PRM_FILE, json.dumps({**config, **(info or {})}, indent=2))
    return folder


def load_process_reward(name_or_path: str | Path, *, teacher=None) -> ProcessReward | None:
    """A process reward model by name or folder (frozen):

    * ``shapeworld-video-prm`` -- the shipped trained ShapeWorld PRM (:class:`VideoPRMNet`, ``assets/``);
    * ``shapeworld-video-exact-prm`` -- the exact one (:class:`ShapeWorldVideoProcessReward`, ``support="all"``,
      on ``teacher`` if it is the exact video teacher, else a fresh one);
    * ``none`` -- ``None`` (no process reward: Flow-GRPO / DanceGRPO);
    * a folder with ``prm.json`` + ``prm.safetensors`` (a :class:`VideoPRMNet`, or a
      :class:`DenoiserProcessReward` whose backbone loads by its recorded name or path).
    """
    import json

    from safetensors.torch import load_file

    spec = str(name_or_path).strip()
    if spec.lower() == "none":
        return None
    if spec.lower() == "shapeworld-video-exact-prm":
        from .shapeworld_video import ShapeWorldVideoExactTeacher

        exact = teacher if isinstance(teacher, ShapeWorldVideoExactTeacher) else ShapeWorldVideoExactTeacher()
        return ShapeWorldVideoProcessReward(exact, support="all")
    if spec.lower() == TRAINED_PRM_NAME:
        from ..assets import shipped_model_path

        folder = shipped_model_path(TRAINED_PRM_NAME, "train_shapeworld_prm.py", marker=PRM_FILE,
                                    kind="process reward model")
    else:
        folder = Path(spec).expanduser()
        if not (folder / PRM_FILE).is_file():
            raise UserError(f"process reward {spec!r}: not one of {', '.join(PRM_NAMES)} nor a folder with {PRM_FILE}")
    try:
        config = json.loads((folder / PRM_FILE).read_text())
        state = load_file(str(folder / PRM_WEIGHTS))
    except (OSError, ValueError) as e:
        raise UserError(f"process reward {spec!r}: {folder} is unreadable ({e}); retrain it") from e
    kind = config.get("class")
    if kind == "VideoPRMNet":
        prm = VideoPRMNet.from_config(config)
        prm.load_state_dict(state)
        return prm.freeze()
    if kind == "DenoiserProcessReward":
        from .registry import load_video_teacher

        backbone = teacher if teacher is not None and config.get("backbone") in (None, getattr(teacher, "name", None)) \
            else load_video_teacher(config["backbone"])
        prm = DenoiserProcessReward(backbone, config["backbone"], hidden=int(config.get("hidden", 32)))
        prm.head.load_state_dict({k[len("head."):]: v for k, v in state.items()})
        for p in prm.head.parameters():
            p.requires_grad_(False)
        return prm.eval()
    raise UserError(f"process reward {spec!r}: {PRM_FILE} names an unknown class {kind!r}")
