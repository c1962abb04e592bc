"""MCM's motion representations ``phi`` of video latents ``[B,C,F,h,w]`` (spec 2.3; ``prepare_cd_target``).

The consistency loss of MCM compares ``phi(y)`` with ``phi^-(y_target)`` instead of the raw latents, so that the
student's *appearance* is no longer tied to the (low-quality) training videos while their *motion* still is.

* ``raw`` (:func:`raw`): the identity -- plain video LCM.
* ``diff`` (:func:`temporal_diff`): ``z[:, :, 1:] - z[:, :, :-1]`` (``[B,C,F-1,h,w]``). Blind to anything constant
  over time: adding a frame-constant tensor ``A`` to a clip leaves it unchanged.
* ``freq_low`` / ``freq_high`` (:func:`freq_low`, :func:`freq_high`): a FreeInit-style Gaussian low-pass in 3-D
  (time, height, width) frequency space, and its complement ``z - low(z)``. With normalised frequencies
  ``f_t, f_h, f_w in [-1/2, 1/2)`` (``torch.fft.fftfreq``) the filter is::

      H(f) = exp(-d^2 / (2 d_s^2)),   d^2 = (d_s / d_t)^2 (2 f_t)^2 + (2 f_h)^2 + (2 f_w)^2

  (FreeInit's ``gaussian_low_pass_filter`` written on centred frequencies ``2f in [-1, 1)``; the cutoffs
  ``d_s`` (spatial) and ``d_t`` (temporal) default to FreeInit's 0.25: a component at the spatial Nyquist
  frequency is attenuated by ``exp(-8)``). MCM's own cutoff for ``freql`` / ``freqh`` could not be read;
  0.25 is FreeInit's default. The DC component passes unchanged (``H(0) = 1``).
* ``learn`` / ``hlearn`` (:class:`LearnedMotionHead`): a learnable per-frame residual head ``phi(z) = z + h(z)``
  trained jointly with the student, the target side using an EMA copy (decay 0.95). ``learn`` (what MCM's
  scripts ship): ``h = SiLU -> Conv1x1(C->64) -> GroupNorm(32) -> SiLU -> Conv1x1(64->C)``. ``hlearn``: five
  3x3 convolutions ``C->64->64->64->64->C``, each but the last followed by ``GroupNorm(32) -> SiLU``, with the
  same leading SiLU (reconstructed from "5 layers, k=3": the exact layout of MCM's variant is unverified).
  The last convolution is zero-initialised, so ``phi`` is exactly the identity at step 0 (the ``learn`` loss then
  equals the ``raw`` loss). Nothing in the loss stops ``h`` from drifting towards a degenerate map
  (``h(z) = -z`` zeroes it); the zero init, the EMA target and a small learning rate are MCM's only guards --
  methods should monitor ``||phi(y)|| / ||y||`` (:func:`motion_norm_ratio`).

The GMFlow-style correlation options (``lcor`` / ``gcor`` / ``sgcor``) are not implemented.

:func:`make_motion` builds ``(phi, phi_target, update_target)`` for any of these names.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..seeding import seeded
from ..students.ema import EMA
from ..teachers.video_base import batch_to_frames, frames_to_batch

__all__ = [
    "MOTIONS", "EMATarget", "FreqFilter", "LearnedMotionHead", "Motion", "Raw", "TemporalDiff",
    "freq_high", "freq_low", "gaussian_lowpass_3d", "make_motion", "motion_norm_ratio", "raw", "temporal_diff",
]

MOTIONS = ("raw", "diff", "freq_low", "freq_high", "learn", "hlearn")
_ALIASES = {"freql": "freq_low", "freqh": "freq_high", "identity": "raw", "none": "raw"}


def _check(z: Tensor) -> Tensor:
    if z.dim() != 5:
        raise ValueError(f"motion representations take video latents [B,C,F,h,w], got shape {tuple(z.shape)}")
    return z


# --------------------------------------------------------------------------------------- fixed representations
def raw(z: Tensor) -> Tensor:
    """Identity (plain video LCM)."""
    return z


def temporal_diff(z: Tensor) -> Tensor:
    """``z[:, :, 1:] - z[:, :, :-1]`` -> ``[B,C,F-1,h,w]``."""
    z = _check(z)
    if z.shape[2] < 2:
        raise UserError(f"the 'diff' motion representation needs at least 2 latent frames, got {z.shape[2]}")
    return z[:, :, 1:] - z[:, :, :-1]


def gaussian_lowpass_3d(frames: int, height: int, width: int, d_s: float = 0.25, d_t: float = 0.25,
                        device: torch.device | str | None = None) -> Tensor:
    """The FreeInit-style Gaussian low-pass ``H`` ``[F,h,w]`` (float32) on ``torch.fft.fftn``'s (unshifted)
    frequency grid (module doc); both cutoffs must be > 0."""
    if not (d_s > 0 and d_t > 0):
        raise UserError(f"low-pass cutoffs must be > 0, got d_s={d_s}, d_t={d_t}")
    ft = 2 * torch.fft.fftfreq(frames, dtype=torch.float64)
    fh = 2 * torch.fft.fftfreq(height, dtype=torch.float64)
    fw = 2 * torch.fft.fftfreq(width, dtype=torch.float64)
    gt, gh, gw = torch.meshgrid(ft, fh, fw, indexing="ij")
    d2 = (d_s / d_t) ** 2 * gt ** 2 + gh ** 2 + gw ** 2
    return torch.exp(-d2 / (2 * d_s ** 2)).to(device=device, dtype=torch.float32)


def freq_low(z: Tensor, d_s: float = 0.25, d_t: float = 0.25) -> Tensor:
    """3-D (F, h, w) Gaussian low-pass of ``z`` (module doc); real, shape of ``z``; linear and differentiable."""
    z = _check(z)
    H = gaussian_lowpass_3d(*z.shape[2:], d_s=d_s, d_t=d_t, device=z.device)
    Z = torch.fft.fftn(z.float(), dim=(-3, -2, -1))
    return torch.fft.ifftn(Z * H, dim=(-3, -2, -1)).real.to(z.dtype)


def freq_high(z: Tensor, d_s: float = 0.25, d_t: float = 0.25) -> Tensor:
    """The complementary high-pass ``z - freq_low(z)``."""
    return z - freq_low(z, d_s, d_t)


class Raw(nn.Module):
    """``raw`` as a module (no parameters)."""

    def forward(self, z: Tensor) -> Tensor:
        return z


class TemporalDiff(nn.Module):
    """``diff`` as a module (no parameters)."""

    def forward(self, z: Tensor) -> Tensor:
        return temporal_diff(z)


class FreqFilter(nn.Module):
    """``freq_low`` (``high=False``) / ``freq_high`` (``high=True``) as a module (no parameters)."""

    def __init__(self, high: bool = False, d_s: float = 0.25, d_t: float = 0.25) -> None:
        super().__init__()
        self.high, self.d_s, self.d_t = bool(high), float(d_s), float(d_t)

    def forward(self, z: Tensor) -> Tensor:
        return (freq_high if self.high else freq_low)(z, self.d_s, self.d_t)

    def extra_repr(self) -> str:
        return f"high={self.high}, d_s={self.d_s}, d_t={self.d_t}"


# --------------------------------------------------------------------------------------- learned head
class LearnedMotionHead(nn.Module):
    """MCM's learnable motion head ``phi(z) = z + h(z)``, applied to every latent frame independently
    (``[B,C,F,h,w]`` -> same shape; module doc for the layouts of ``variant="learn"`` / ``"hlearn"``).

    Args:
        channels: latent channels ``C`` (4 for ModelScope / AnimateDiff).
        variant: ``"learn"`` (1x1 convs, 2 layers) or ``"hlearn"`` (3x3 convs, 5 layers).
        hidden: hidden width (64); ``groups``: GroupNorm groups (32; must divide ``hidden``).
        seed: seeds the initialisation without touching the global RNG (``None``: global RNG).
    """

    def __init__(self, channels: int, variant: str = "learn", hidden: int = 64, groups: int = 32,
                 seed: int | None = 0) -> None:
        super().__init__()
        if variant not in ("learn", "hlearn"):
            raise UserError(f"LearnedMotionHead variant must be 'learn' or 'hlearn', got {variant!r}")
        if int(channels) < 1 or int(hidden) < 1 or int(hidden) % int(groups):
            raise UserError(f"LearnedMotionHead needs channels >= 1 and hidden divisible by groups, got "
                            f"channels={channels}, hidden={hidden}, groups={groups}")
        self.channels, self.variant, self.hidden = int(channels), variant, int(hidden)
        k = 1 if variant == "learn" else 3
        widths = [self.channels, self.hidden] if variant == "learn" else [self.channels] + [self.hidden] * 4
        with seeded(seed):
            layers: list[nn.Module] = [nn.SiLU()]
            for a, b in itertools.pairwise(widths):
                layers += [nn.Conv2d(a, b, k, padding=k // 2), nn.GroupNorm(int(groups), b), nn.SiLU()]
            last = nn.Conv2d(self.hidden, self.channels, k, padding=k // 2)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            layers.append(last)
            self.h = nn.Sequential(*layers)

    def residual(self, z: Tensor) -> Tensor:
        """``h(z)`` per frame, ``[B,C,F,h,w]``."""
        z = _check(z)
        if z.shape[1] != self.channels:
            raise ValueError(f"LearnedMotionHead was built for {self.channels} channels, got {z.shape[1]}")
        return batch_to_frames(self.h(frames_to_batch(z)), z.shape[0])

    def forward(self, z: Tensor) -> Tensor:
        return z + self.residual(z)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, variant={self.variant!r}, hidden={self.hidden}"


class EMATarget(nn.Module):
    """The EMA target ``phi^-`` of a learned head: evaluates the head's architecture with the
    :class:`~studio.students.ema.EMA` shadow weights (``torch.func.functional_call``, no copy of the module, so it is
    always in sync with the EMA state, also after a checkpoint restore of ``ema``).

    The live head is held outside the module tree (its parameters are not parameters of the target: an optimizer
    or a state dict collecting this module sees none). :meth:`update` is ``ema.update()``; register :attr:`ema`
    with the Trainer (a stage's ``emas()``) to have it updated after each generator step and checkpointed --
    then do not also call :meth:`update`.
    """

    def __init__(self, head: nn.Module, decay: float = 0.95) -> None:
        super().__init__()
        self.__dict__["_head"] = head  # not a submodule (see the class doc)
        self.ema = EMA(head, float(decay), warmup=False)

    @property
    def head(self) -> nn.Module:
        return self.__dict__["_head"]

    def update(self) -> None:
        """``shadow <- d shadow + (1 - d) live`` (MCM: ``d = 0.95`` after every generator step)."""
        self.ema.update()

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half() move the shadow weights too
        self.ema.shadow = [fn(s) for s in self.ema.shadow]
        return super()._apply(fn, *args, **kwargs)

    def forward(self, z: Tensor) -> Tensor:
        params = dict(zip(self.ema.names, self.ema.shadow))
        return torch.func.functional_call(self.head, params, (z,), strict=False)

    def extra_repr(self) -> str:
        return f"decay={self.ema.decay}, updates={self.ema.num_updates}"


class Motion(NamedTuple):
    """What :func:`make_motion` returns: the representation ``phi`` (an ``nn.Module``; its parameters, if any, go
    to the generator optimizer), its target ``phi_target`` (``phi`` itself for fixed representations; an
    :class:`EMATarget` for learned ones) and ``update_target()`` (the EMA step; a no-op for fixed ones)."""

    phi: nn.Module
    phi_target: nn.Module
    update_target: Callable[[], None]


def _noop() -> None:
    return None


def make_motion(name: str, channels: int = 4, *, ema_decay: float = 0.95, d_s: float = 0.25, d_t: float = 0.25,
                hidden: int = 64, groups: int = 32, seed: int | None = 0) -> Motion:
    """``(phi, phi_target, update_target)`` for motion representation ``name`` (:data:`MOTIONS`; MCM's spellings
    ``freql`` / ``freqh`` are accepted). ``channels``: latent channels (learned heads); ``ema_decay``: the target
    head's EMA decay (MCM 0.95); ``d_s`` / ``d_t``: frequency cutoffs; ``hidden`` / ``groups`` / ``seed``: the head."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key == "raw":
        phi: nn.Module = Raw()
    elif key == "diff":
        phi = TemporalDiff()
    elif key in ("freq_low", "freq_high"):
        phi = FreqFilter(high=key == "freq_high", d_s=d_s, d_t=d_t)
    elif key in ("learn", "hlearn"):
        head = LearnedMotionHead(channels, key, hidden=hidden, groups=groups, seed=seed)
        target = EMATarget(head, ema_decay)
        return Motion(head, target, target.update)
    else:
        raise UserError(f"unknown motion representation {name!r}; choose one of {', '.join(MOTIONS)} "
                        "(or MCM's 'freql' / 'freqh')")
    return Motion(phi, phi, _noop)


@torch.no_grad()
def motion_norm_ratio(phi: Callable[[Tensor], Tensor], y: Tensor) -> float:
    """``||phi(y)|| / ||y||`` (a collapse monitor for learned heads, spec 2.9: 1 at init, towards 0 if ``h -> -z``).
    Only meaningful for shape-preserving representations."""
    num = float(phi(y).float().norm())
    den = float(y.float().norm())
    return num / den if den > 0 else math.nan
