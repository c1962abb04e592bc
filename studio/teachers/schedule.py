"""One noise schedule object: the only place where alpha/sigma arithmetic lives.

Every teacher carries a :class:`NoiseSchedule`. Losses and methods ask it to noise latents
(:meth:`NoiseSchedule.add_noise`), to convert a prediction between parameterisations
(:meth:`NoiseSchedule.convert`), for SNRs and loss weights, and to sample timesteps; they never do
their own ``sqrt(alphas_cumprod)`` arithmetic.

Notation. A noisy sample is ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``eps ~ N(0, I)``.

* Variance-preserving (DDPM family, Stable Diffusion): ``alpha = sqrt(abar_t)``,
  ``sigma = sqrt(1 - abar_t)`` with ``abar = alphas_cumprod``.
* Rectified flow (``prediction_type="flow"``): ``alpha = 1 - s``, ``sigma = s`` with
  ``s = shift * u / (1 + (shift - 1) * u)`` and ``u = (t + 1) / T`` for the integer timestep
  ``t in [0, T-1]`` -- exactly the ``sigmas`` of diffusers' ``FlowMatchEulerDiscreteScheduler``
  (which lists them from ``t = T-1`` down to ``t = 0``). ``alphas_cumprod`` is then reported as the
  variance-preserving ``abar`` with the same SNR: ``alpha^2 / (alpha^2 + sigma^2)``.

Parameterisations understood by :meth:`NoiseSchedule.convert` (aliases in brackets):

* ``"epsilon"`` (eps, noise): the noise ``eps``.
* ``"sample"`` (x0): the clean sample ``x0``.
* ``"v_prediction"`` (v): ``v = alpha * eps - sigma * x0`` (diffusers' ``get_velocity``).
* ``"flow"`` (velocity): the rectified-flow velocity ``u = eps - x0 = d x_t / d s``.

All four are affine in the prediction for fixed ``(x_t, t)``, so classifier-free guidance gives the
same result in any of them (see :mod:`studio.teachers.base`).

Timesteps. Discrete training timesteps are long tensors in ``[0, T-1]``. Fractions follow
threestudio's ``min_step_percent`` / ``max_step_percent``: ``t = int(T * fraction)``
(:meth:`sample_timesteps`, :meth:`from_continuous`, :meth:`to_continuous` = ``t / T``). Floating-point
timesteps are accepted everywhere and interpolated linearly in the tables (exactly, analytically,
for the flow schedule).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

_ALIASES = {
    "epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon",
    "v_prediction": "v_prediction", "v": "v_prediction", "v-prediction": "v_prediction",
    "sample": "sample", "x0": "sample", "x_0": "sample",
    "flow": "flow", "velocity": "flow", "flow_prediction": "flow", "flow_matching": "flow",
}

#: smallest alphas_cumprod kept at a zero-terminal-SNR step (fp16's smallest subnormal), so that
#: eps -> x0 conversions stay finite there.
MIN_ALPHA_CUMPROD = 2.0 ** -24

_WEIGHTINGS = ("sds", "uniform", "fantasia3d", "sqrt_alpha", "snr")


def canonical_prediction_type(name: str) -> str:
    """Map an alias ("eps", "v", "x0", "velocity", ...) to one of :data:`PREDICTION_TYPES`."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown prediction type {name!r}; expected one of {PREDICTION_TYPES} "
                         f"(aliases: {sorted(k for k in _ALIASES if k not in PREDICTION_TYPES)})")
    return _ALIASES[key]


# --------------------------------------------------------------------------------------- betas
def _betas_linear(T: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _betas_scaled_linear(T: int, beta_start: float, beta_end: float) -> Tensor:
    # Stable Diffusion's schedule: linear in sqrt(beta).
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2


def _betas_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal: abar(u) = cos^2((u + s) / (1 + s) * pi / 2), betas clipped at max_beta.
    u = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale ``sqrt(abar)`` so the last step has SNR exactly 0 and the first is unchanged
    (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed")."""
    a = alphas_cumprod.to(torch.float64).sqrt()
    first, last = a[0].clone(), a[-1].clone()
    a = (a - last) * (first / (first - last))
    return a ** 2


def _shift_sigma(u: Tensor, shift: float) -> Tensor:
    return shift * u / (1 + (shift - 1) * u)


# --------------------------------------------------------------------------------------- schedule
class NoiseSchedule:
    """A diffusion / flow noise schedule and the prediction type of the model that uses it.

    Args:
        alphas_cumprod: ``[T]`` cumulative products ``abar_t`` (ignored for ``prediction_type="flow"``,
            which is defined by ``shift``). Stored in float64.
        prediction_type: what the model predicts: one of :data:`PREDICTION_TYPES` (or an alias).
        num_train_timesteps: ``T``; defaults to ``len(alphas_cumprod)``.
        shift: timestep shift of a flow schedule.
        min_alpha_cumprod: the value given to zero entries of ``abar`` (a zero-terminal-SNR step, as
            diffusers' Euler scheduler does), keeping every conversion finite.
    """

    def __init__(self, alphas_cumprod: Tensor | None = None, prediction_type: str = "epsilon",
                 num_train_timesteps: int | None = None, *, shift: float | None = None,
                 min_alpha_cumprod: float = MIN_ALPHA_CUMPROD) -> None:
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.is_flow = self.prediction_type == "flow"
        if self.is_flow:
            T = int(num_train_timesteps or (len(alphas_cumprod) if alphas_cumprod is not None else 1000))
            self.shift = float(1.0 if shift is None else shift)
            if self.shift <= 0:
                raise ValueError(f"flow shift must be positive, got {self.shift}")
            s = _shift_sigma(torch.arange(1, T + 1, dtype=torch.float64) / T, self.shift)
            alpha, sigma = 1 - s, s
        else:
            if alphas_cumprod is None:
                raise ValueError("alphas_cumprod is required unless prediction_type='flow'")
            abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
            if num_train_timesteps is not None and int(num_train_timesteps) != abar.numel():
                raise ValueError(f"num_train_timesteps={num_train_timesteps} but alphas_cumprod has {abar.numel()} entries")
            T = abar.numel()
            self.zero_terminal_snr = bool(abar[-1] <= 0)
            abar = torch.where(abar <= 0, torch.full_like(abar, min_alpha_cumprod), abar).clamp(max=1.0)
            self.shift = None
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        if T < 2:
            raise ValueError("a schedule needs at least 2 timesteps")
        if self.is_flow:
            self.zero_terminal_snr = False
        self.num_train_timesteps = T
        self._alpha = alpha
        self._sigma = sigma
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_diffusers(cls, scheduler: Any, prediction_type: str | None = None) -> "NoiseSchedule":
        """Build from a diffusers scheduler object or its config (dict / FrozenDict).

        Handles ``beta_schedule`` in {"linear", "scaled_linear", "squaredcos_cap_v2"}, ``trained_betas``,
        ``rescale_betas_zero_snr`` and ``prediction_type`` of DDPM / DDIM / PNDM / Euler / DPM-Solver / LCM
        schedulers, and ``FlowMatchEulerDiscreteScheduler`` (-> ``"flow"`` with its ``shift``; a
        resolution-dependent dynamic shift is not applied) or a multistep solver on flow sigmas
        (``prediction_type="flow_prediction"`` / ``use_flow_sigmas`` with ``flow_shift``, e.g. the
        ``UniPCMultistepScheduler`` Wan 2.1 ships). ``prediction_type`` overrides the config.
        """
        config: Mapping = scheduler if isinstance(scheduler, Mapping) else getattr(scheduler, "config", None)
        if config is None:
            raise TypeError(f"expected a diffusers scheduler or its config, got {type(scheduler).__name__}")
        cls_name = str(config.get("_class_name", type(scheduler).__name__))
        T = int(config.get("num_train_timesteps", 1000))
        if prediction_type:
            flow = canonical_prediction_type(prediction_type) == "flow"
        else:  # multistep solvers on flow sigmas (Wan's UniPC: prediction_type="flow_prediction", flow_shift)
            cfg_type = str(config.get("prediction_type") or "epsilon").strip().lower()
            flow = bool(config.get("use_flow_sigmas")) or _ALIASES.get(cfg_type) == "flow"
        if "FlowMatch" in cls_name or flow:
            shift = config.get("shift") or config.get("flow_shift") or 1.0
            return cls.flow(shift=float(shift), num_train_timesteps=T)
        ptype = prediction_type or config.get("prediction_type") or "epsilon"
        trained = config.get("trained_betas")
        schedule = config.get("beta_schedule", "linear")
        if trained is not None:
            betas = torch.as_tensor(trained, dtype=torch.float64)
        elif schedule == "linear":
            betas = _betas_linear(T, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
        elif schedule == "scaled_linear":
            betas = _betas_scaled_linear(T, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
        elif schedule == "squaredcos_cap_v2":
            betas = _betas_cosine(T)
        elif getattr(scheduler, "alphas_cumprod", None) is not None:
            return cls(scheduler.alphas_cumprod, ptype, T)
        else:
            raise ValueError(f"unsupported beta_schedule {schedule!r} in {cls_name}")
        abar = torch.cumprod(1 - betas, 0)
        if config.get("rescale_betas_zero_snr", False):
            abar = rescale_zero_terminal_snr(abar)
        return cls(abar, ptype, T)

    @classmethod
    def ddpm_scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012, prediction_type: str = "epsilon",
                           zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Stable Diffusion 1.x/2.x schedule (defaults are SD's)."""
        abar = torch.cumprod(1 - _betas_scaled_linear(num_train_timesteps, beta_start, beta_end), 0)
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        return cls(abar, prediction_type, num_train_timesteps)

    @classmethod
    def ddpm_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                    prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """The original DDPM linear-beta schedule (DeepFloyd IF, pixel-space models)."""
        abar = torch.cumprod(1 - _betas_linear(num_train_timesteps, beta_start, beta_end), 0)
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        return cls(abar, prediction_type, num_train_timesteps)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
               prediction_type: str = "epsilon") -> "NoiseSchedule":
        """Cosine schedule (diffusers' ``squaredcos_cap_v2``)."""
        return cls(torch.cumprod(1 - _betas_cosine(num_train_timesteps, s, max_beta), 0), prediction_type,
                   num_train_timesteps)

    @classmethod
    def flow(cls, shift: float = 1.0, num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """Rectified-flow schedule ``x_t = (1 - s) x0 + s eps`` with shifted ``s`` (see module doc)."""
        return cls(None, "flow", num_train_timesteps, shift=shift)

    def with_prediction_type(self, prediction_type: str) -> "NoiseSchedule":
        """The same noise levels, for a model with another parameterisation (``is_flow`` still says
        whether the noise levels follow the rectified-flow path)."""
        out = copy.copy(self)
        out.prediction_type = canonical_prediction_type(prediction_type)
        out._cache = {}
        return out

    # ------------------------------------------------------------------ tables
    @property
    def alphas_cumprod(self) -> Tensor:
        """``[T]`` float64: ``alpha^2 / (alpha^2 + sigma^2)`` (the usual ``abar`` for VP schedules)."""
        return self._alpha ** 2 / (self._alpha ** 2 + self._sigma ** 2)

    @property
    def alphas(self) -> Tensor:
        """``[T]`` float64 table of ``alpha(t)``."""
        return self._alpha.clone()

    @property
    def sigmas(self) -> Tensor:
        """``[T]`` float64 table of ``sigma(t)``."""
        return self._sigma.clone()

    def __repr__(self) -> str:
        extra = f", shift={self.shift}" if self.is_flow else (", zero_terminal_snr=True" if self.zero_terminal_snr else "")
        return f"NoiseSchedule(prediction_type={self.prediction_type!r}, T={self.num_train_timesteps}{extra})"

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        key = (device.type, device.index, dtype)
        if key not in self._cache:
            self._cache[key] = (self._alpha.to(device, dtype), self._sigma.to(device, dtype))
        return self._cache[key]

    def _coef(self, t: Tensor | int | float, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """``alpha(t), sigma(t)`` in float64 (float32 on MPS), shaped ``[B]`` or broadcastable to ``x``."""
        device = x.device if x is not None else (t.device if isinstance(t, Tensor) else torch.device("cpu"))
        t = torch.as_tensor(t, device=device)
        if t.dim() > 1:
            t = t.reshape(-1)
        A, S = self._tables(device)
        T = self.num_train_timesteps
        if t.is_floating_point():
            if self.is_flow:
                u = ((t.to(A.dtype) + 1) / T).clamp(1.0 / T, 1.0)
                s = _shift_sigma(u, self.shift)
                a, sg = 1 - s, s
            else:
                tc = t.to(A.dtype).clamp(0, T - 1)
                lo = tc.floor().long().clamp(max=T - 2)
                w = tc - lo
                a = A[lo] * (1 - w) + A[lo + 1] * w
                sg = S[lo] * (1 - w) + S[lo + 1] * w
        else:
            idx = t.long()
            if bool(((idx < 0) | (idx >= T)).any()):
                raise ValueError(f"timesteps must lie in [0, {T - 1}]")
            a, sg = A[idx], S[idx]
        if x is not None:
            if a.dim() == 1 and a.numel() not in (1, x.shape[0]):
                raise ValueError(f"got {a.numel()} timesteps for a batch of {x.shape[0]}")
            shape = (-1,) + (1,) * (x.dim() - 1) if a.dim() == 1 else ()
            a, sg = a.reshape(shape), sg.reshape(shape)
        return a, sg

    @staticmethod
    def _out_dtype(x: Tensor | None) -> torch.dtype:
        return x.dtype if x is not None and x.is_floating_point() else torch.float32

    def alpha(self, t: Tensor | int | float, x: Tensor | None = None) -> Tensor:
        """``alpha(t)``: ``[B]`` (or scalar), or ``[B,1,...,1]`` broadcastable to ``x`` when given
        (in ``x``'s device and dtype)."""
        return self._coef(t, x)[0].to(self._out_dtype(x))

    def sigma(self, t: Tensor | int | float, x: Tensor | None = None) -> Tensor:
        """``sigma(t)``, shaped as :meth:`alpha`."""
        return self._coef(t, x)[1].to(self._out_dtype(x))

    def alpha_cumprod(self, t: Tensor | int | float, x: Tensor | None = None) -> Tensor:
        """``abar(t) = alpha^2 / (alpha^2 + sigma^2)``, shaped as :meth:`alpha`."""
        a, s = self._coef(t, x)
        return (a * a / (a * a + s * s)).to(self._out_dtype(x))

    def snr(self, t: Tensor | int | float, x: Tensor | None = None) -> Tensor:
        """Signal-to-noise ratio ``alpha^2 / sigma^2``, shaped as :meth:`alpha`."""
        a, s = self._coef(t, x)
        return (a * a / (s * s)).to(self._out_dtype(x))

    def log_snr(self, t: Tensor | int | float, x: Tensor | None = None) -> Tensor:
        a, s = self._coef(t, x)
        return (2 * (a.log() - s.log())).to(self._out_dtype(x))

    def weight(self, t: Tensor | int | float, kind: str = "sds", x: Tensor | None = None) -> Tensor:
        """Score-distillation weighting ``w(t)`` (threestudio names), shaped as :meth:`alpha`.

        ``"sds"``: ``1 - abar`` (DreamFusion); ``"uniform"``: 1; ``"fantasia3d"``:
        ``sqrt(abar) (1 - abar)``; ``"sqrt_alpha"``: ``sqrt(abar)`` (PlacidDreamer BSD);
        ``"snr"``: ``alpha^2 / sigma^2``.
        """
        a, s = self._coef(t, x)
        abar = a * a / (a * a + s * s)
        if kind == "sds":
            w = 1 - abar
        elif kind == "uniform":
            w = torch.ones_like(abar)
        elif kind == "fantasia3d":
            w = abar.sqrt() * (1 - abar)
        elif kind == "sqrt_alpha":
            w = abar.sqrt()
        elif kind == "snr":
            w = a * a / (s * s)
        else:
            raise ValueError(f"unknown weighting {kind!r}; expected one of {_WEIGHTINGS}")
        return w.to(self._out_dtype(x))

    # ------------------------------------------------------------------ noising and conversion
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | int | float) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` (``t``: scalar or ``[B]``)."""
        a, s = self._coef(t, x0)
        return (a * x0 + s * eps).to(x0.dtype)

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor | int | float) -> Tensor:
        """The v-prediction target ``alpha eps - sigma x0`` (diffusers' ``get_velocity``)."""
        a, s = self._coef(t, x0)
        return (a * eps - s * x0).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor | int | float, kind: str | None = None) -> Tensor:
        """The regression target of parameterisation ``kind`` (default: this schedule's)."""
        kind = canonical_prediction_type(kind or self.prediction_type)
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "flow":
            return eps - x0
        return self.velocity(x0, eps, t)

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor | int | float, src: str | None = None) -> tuple[Tensor, Tensor]:
        """Recover ``(x0, eps)`` from a prediction of type ``src`` (default: this schedule's) at ``x_t``."""
        src = canonical_prediction_type(src or self.prediction_type)
        a, s = self._coef(t, x_t)
        tiny = torch.finfo(a.dtype).tiny
        p, x = pred.to(a.dtype), x_t.to(a.dtype)
        if src == "epsilon":
            eps = p
            x0 = (x - s * p) / a.clamp_min(tiny)
        elif src == "sample":
            x0 = p
            eps = (x - a * p) / s.clamp_min(tiny)
        elif src == "v_prediction":
            # x_t = a x0 + s eps, v = a eps - s x0  (inverse of [[a, s], [-s, a]])
            n = (a * a + s * s).clamp_min(tiny)
            x0 = (a * x - s * p) / n
            eps = (s * x + a * p) / n
        else:  # flow: u = eps - x0
            n = (a + s).clamp_min(tiny)
            x0 = (x - s * p) / n
            eps = (x + a * p) / n
        return x0, eps

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor | int | float, dst: str) -> Tensor:
        """The prediction of type ``dst`` given ``(x0, eps)``."""
        dst = canonical_prediction_type(dst)
        if dst == "epsilon":
            return eps
        if dst == "sample":
            return x0
        if dst == "flow":
            return eps - x0
        a, s = self._coef(t, x0)
        return a.to(x0.dtype) * eps - s.to(x0.dtype) * x0

    def convert(self, pred: Tensor, x_t: Tensor, t: Tensor | int | float, src: str | None = None,
                dst: str = "epsilon") -> Tensor:
        """Convert a prediction at ``(x_t, t)`` from parameterisation ``src`` (default: this schedule's
        ``prediction_type``) to ``dst``. Computed in float64 (float32 on MPS), returned in ``pred``'s dtype."""
        src = canonical_prediction_type(src or self.prediction_type)
        dst = canonical_prediction_type(dst)
        if src == dst:
            return pred
        x0, eps = self.to_x0_eps(pred, x_t, t, src)
        return self.from_x0_eps(x0, eps, t, dst).to(pred.dtype)

    def pred_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | int | float, src: str | None = None) -> Tensor:
        """Shorthand for ``convert(pred, x_t, t, src, "sample")``."""
        return self.convert(pred, x_t, t, src, "sample")

    # ------------------------------------------------------------------ timesteps
    def _step_bounds(self, t_min: float, t_max: float) -> tuple[int, int]:
        if not (0.0 <= t_min <= t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min <= t_max <= 1 (fractions of T), got t_min={t_min}, t_max={t_max}")
        T = self.num_train_timesteps
        return min(int(math.floor(T * t_min + 1e-3)), T - 1), min(int(math.floor(T * t_max + 1e-3)), T - 1)

    def sample_timesteps(self, n: int, t_min: float = 0.02, t_max: float = 0.98,
                         generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
        """``n`` long timesteps uniform in ``[int(T t_min), int(T t_max)]`` (inclusive), threestudio's
        ``min_step_percent`` / ``max_step_percent`` convention."""
        lo, hi = self._step_bounds(t_min, t_max)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(lo, hi + 1, (int(n),), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def timestep_range(self, t_min: float = 0.02, t_max: float = 0.98) -> tuple[int, int]:
        """The inclusive integer range :meth:`sample_timesteps` draws from."""
        return self._step_bounds(t_min, t_max)

    def to_continuous(self, t: Tensor | int) -> Tensor:
        """Integer timesteps -> fractions ``t / T`` (float32)."""
        return torch.as_tensor(t).to(torch.float32) / self.num_train_timesteps

    def from_continuous(self, u: Tensor | float) -> Tensor:
        """Fractions in [0, 1] -> long timesteps ``clamp(int(T u), 0, T-1)`` (inverse of :meth:`to_continuous`
        on the integer grid)."""
        u = torch.as_tensor(u, dtype=torch.float64)
        # (+1e-3 of a step absorbs float32 round-off, so from_continuous(to_continuous(t)) == t)
        return torch.floor(u * self.num_train_timesteps + 1e-3).long().clamp(0, self.num_train_timesteps - 1)

    def model_timestep(self, t: Tensor | int | float) -> Tensor:
        """The timestep value a network is called with: ``t`` itself for DDPM-family models; for flow
        models (diffusers' convention) the shifted ``sigma * T``."""
        if not self.is_flow:
            return torch.as_tensor(t)
        return (self._coef(t, None)[1] * self.num_train_timesteps).to(torch.float32)

    def timestep_from_sigma(self, sigma: Tensor | float) -> Tensor:
        """Float timesteps ``t`` (the index convention above) with ``sigma(t) == sigma``: the inverse of
        :meth:`sigma` on ``[sigma(0), sigma(T-1)]``, float64.

        Flow schedules invert the shift analytically: ``u = sigma / (shift - (shift - 1) sigma)``,
        ``t = T u - 1``. Variance-preserving schedules invert the piecewise-linear interpolation of the
        (increasing) ``sigma`` table that :meth:`sigma` uses for float ``t``. Samplers use it to place a
        noise level given as a sigma (a flow shift other than the model's, Self-Forcing's unwarped
        timesteps) on the model's own timestep axis. A sigma outside the table raises ``ValueError``.
        """
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
        S, T = self._sigma, self.num_train_timesteps
        lo_s, hi_s = float(S[0]), float(S[-1])
        tol = 1e-9
        if bool(((s < lo_s - tol) | (s > hi_s + tol)).any()):
            raise ValueError(f"sigma must lie in [{lo_s:.6g}, {hi_s:.6g}] (the schedule's noise levels), got "
                             f"{s.min().item():.6g}..{s.max().item():.6g}")
        s = s.clamp(lo_s, hi_s)
        if self.is_flow:
            u = s / (self.shift - (self.shift - 1) * s)
            return (u * T - 1).clamp(0, T - 1)
        idx = torch.searchsorted(S, s.reshape(-1)).clamp(1, T - 1)
        lo = idx - 1
        w = (s.reshape(-1) - S[lo]) / (S[idx] - S[lo]).clamp_min(torch.finfo(torch.float64).tiny)
        return (lo.to(torch.float64) + w).reshape(s.shape)
