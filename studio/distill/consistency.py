"""Latent consistency distillation (LCM / video LCM, as MCM re-implements it; spec 1.1 and 2.4) as pure functions.

Notation: ``x_t = alpha(t) x0 + sigma(t) eps`` with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)`` -- every
such number comes from the model's :class:`~studio.teachers.schedule.NoiseSchedule`. Latents are video latents
``[B,C,F,h,w]`` (any ``[B,...]`` works).

**Skipping-DDIM solver** (:func:`solver_indices`, :func:`alphas_cumprod_prev`, :func:`ddim_solver_step`). ``N =
num_ddim_timesteps`` (50), ``k = T // N`` (20), grid ``tau_n = k (n + 1) - 1`` (19, 39, ..., 999; the single
definition is :func:`~studio.teachers.sampling.consistency_solver_timesteps`). A training sample draws
``n ~ U{0..N-1}`` and uses ``t_start = tau_n``, ``t_end = max(tau_n - k, 0)``. diffusers' ``DDIMSolver`` keeps a
table ``abar_prev[n] = abar[0]`` for ``n = 0`` and ``abar[tau_{n-1}]`` otherwise -- the ``abar`` table at the
solver grid *shifted by one index*. Since ``tau_{n-1} = tau_n - k`` and ``t_end(0) = 0``, ``abar_prev[n] =
abar(t_end(n))`` for every ``n``, so the deterministic DDIM step (eta = 0) is simply noising the estimates to
``t_end``::

    x_end = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat = alpha(t_end) x0_hat + sigma(t_end) eps_hat

(:meth:`NoiseSchedule.add_noise`); :func:`alphas_cumprod_prev` builds the diffusers table for cross-checks.

**Teacher guidance in the LCM form** (:func:`lcm_guided_prediction`): ``pred = cond + w (cond - uncond)`` with a
per-sample ``w ~ U[w_min, w_max]`` (MCM: [5, 15]), i.e. standard CFG ``uncond + s (cond - uncond)`` with
``s = w + 1``; combined in the teacher's own parameterisation (like :meth:`ImageTeacher.predict`), then converted
to ``(x0_hat, eps_hat)``. ``w = 0`` is the conditional prediction alone.

**Consistency function** (:func:`consistency_output`): ``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)`` with
LCM's boundary scalings :func:`~studio.teachers.sampling.consistency_scalings` (``lambda`` =
``timestep_scaling``: MCM's scripts 4, diffusers 10; ``sigma_data`` 0.5): ``c_skip(0) = 1``, ``c_out(0) = 0``.

**Loss** (:func:`latent_consistency_loss`), per sample (spec 2.4 steps 2-6)::

    x_start = alpha(t_start) x0 + sigma(t_start) eps       (n = N-1 with the zero-terminal-SNR swap: x_start = eps)
    y       = f_theta(x_start, t_start)                     (student, the only forward with grad)
    x0_hat, eps_hat = teacher CFG (LCM form, w) at (x_start, t_start)      (no grad, two branches)
    x_end   = alpha(t_end) x0_hat + sigma(t_end) eps_hat    (DDIM step)
    y_tgt   = f_{theta^-}(x_end, t_end)                     (no grad; theta^- = sg(theta) with LoRA, else an EMA)
    L       = mean_elements d(phi(y), phi^-(y_tgt))          (pseudo-Huber c = 0.001 or L2)

The no-grad half (teacher, DDIM step, target) is also available alone as :func:`lcd_targets`.
``phi`` / ``phi^-`` is MCM's motion representation and its target copy (:mod:`studio.distill.motion`; identity =
plain video LCM). With a :class:`~studio.students.video_lora.VideoLoRAStudent` the teacher branches run inside
``student.teacher_mode()`` (adapter off) and the student / stop-grad target with the adapter on. The student is
called *without* guidance and without a ``w`` embedding (MCM's LoRA student has CFG baked in).

**Mixed trajectories** (:func:`mixed_trajectory_x0`, spec 2.4 step 1): with probability ``p`` (one draw per batch)
``x0`` is replaced by the student's own one-step sample ``sg(x0_hat_theta(eps', tau_{N-1}))``.

Randomness: every draw comes from ``generator`` (a CPU generator is fine on any device; draws are made on the
generator's device and moved), in a documented order, so a seed fixes a step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..teachers.sampling import consistency_scalings, consistency_solver_timesteps
from ..teachers.schedule import NoiseSchedule

__all__ = [
    "LOSSES", "alphas_cumprod_prev", "consistency_distance", "consistency_output", "ddim_solver_step",
    "latent_consistency_loss", "lcd_targets", "lcm_guided_prediction", "mixed_trajectory_x0", "pseudo_huber",
    "solver_indices",
]

LOSSES = ("huber", "l2")


# --------------------------------------------------------------------------------------- small helpers
def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` tensor shaped ``[B,1,...,1]`` (or scalar) to broadcast against ``like``, in its dtype."""
    v = torch.as_tensor(v, device=like.device)
    v = v.to(like.dtype if like.is_floating_point() else torch.float32)
    if v.dim() == 0:
        return v
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _draw(shape: Sequence[int], generator: torch.Generator | None, like: Tensor, kind: str = "randn") -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(tuple(shape), generator=generator, device=dev).to(like.device, like.dtype)


def _teacher_context(student: Any) -> contextlib.AbstractContextManager:
    """The adapter-off context of a LoRA student (its ``teacher_mode``), else nothing."""
    mode = getattr(student, "teacher_mode", None)
    return mode() if callable(mode) else contextlib.nullcontext()


# --------------------------------------------------------------------------------------- solver grid
def solver_indices(n: Tensor | int | Sequence[int], num_train_timesteps: int = 1000,
                   num_ddim_timesteps: int = 50) -> tuple[Tensor, Tensor]:
    """``(t_start, t_end)`` long tensors for solver indices ``n`` (``[B]``, each in ``[0, N-1]``):
    ``t_start = tau_n = k (n + 1) - 1`` and ``t_end = max(tau_n - k, 0)`` with ``k = T // N``
    (T = 1000, N = 50: ``t_end = t_start - 20``, except ``t_start = 19 -> t_end = 0``)."""
    grid = torch.tensor(consistency_solver_timesteps(num_train_timesteps, num_ddim_timesteps), dtype=torch.long)
    n = torch.as_tensor(n, dtype=torch.long)
    N = grid.numel()
    if bool(((n < 0) | (n >= N)).any()):
        raise UserError(f"solver indices must lie in [0, {N - 1}] (num_ddim_timesteps = {N}), got {n.tolist()}")
    k = int(num_train_timesteps) // N
    t_start = grid.to(n.device)[n]
    return t_start, (t_start - k).clamp_min(0)


def alphas_cumprod_prev(schedule: NoiseSchedule, num_ddim_timesteps: int = 50) -> Tensor:
    """diffusers' ``DDIMSolver.ddim_alpha_cumprods_prev`` table ``[N]`` (float64): ``abar[0]`` for ``n = 0`` and
    ``abar[tau_{n-1}]`` otherwise -- the solver grid's ``abar`` shifted by one index. It equals
    ``schedule.alpha_cumprod(t_end(n))`` (module doc); :func:`ddim_solver_step` uses the schedule directly."""
    T = int(schedule.num_train_timesteps)
    tau = torch.tensor(consistency_solver_timesteps(T, num_ddim_timesteps), dtype=torch.long)
    abar = schedule.alphas_cumprod
    return torch.cat([abar[:1], abar[tau[:-1]]])


def ddim_solver_step(schedule: NoiseSchedule, x0_hat: Tensor, eps_hat: Tensor, t_end: Tensor | int) -> Tensor:
    """One deterministic DDIM step (eta = 0) of the skipping solver from the (guided) estimates at ``t_start``:
    ``x_end = alpha(t_end) x0_hat + sigma(t_end) eps_hat`` (``= sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev)
    eps_hat``; module doc). ``t_end``: scalar or ``[B]``. If ``eps_hat`` is the exact noise of ``x_start`` (so
    ``x0_hat = x0``), ``x_end`` is exactly ``alpha(t_end) x0 + sigma(t_end) eps``: both lie on one trajectory."""
    return schedule.add_noise(x0_hat, eps_hat, t_end)


# --------------------------------------------------------------------------------------- teacher and f
def lcm_guided_prediction(teacher: Any, x_t: Tensor, t: Tensor | int, cond: Any,
                          w: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` of the teacher's LCM-form guidance ``pred = cond + w (cond - uncond)`` at ``(x_t, t)``.

    ``w``: a float or a ``[B]`` tensor (one guidance weight per sample). This is standard CFG with scale ``w + 1``;
    both branches come from one :meth:`~studio.teachers.base.ImageTeacher.predict_branches` call and are combined
    in the teacher's own parameterisation (``schedule.prediction_type``), then converted through the schedule.
    ``w = 0`` gives the conditional prediction alone. Call under ``torch.no_grad()`` for distillation (the teacher
    is frozen anyway). Returned in ``x_t``'s dtype.
    """
    sched = teacher.schedule
    own = sched.prediction_type
    uncond, cond_pred = teacher.predict_branches(x_t, t, cond, output=own)
    wb = _bcast(w, cond_pred)
    pred = cond_pred + wb * (cond_pred - uncond)
    B = x_t.shape[0]
    tt = torch.as_tensor(t, device=x_t.device)
    if tt.dim() == 0:
        tt = tt.expand(B)
    x0, eps = sched.to_x0_eps(pred, x_t, tt.reshape(-1), own)
    return x0.to(x_t.dtype), eps.to(x_t.dtype)


def consistency_output(model_pred_x0: Tensor, x_t: Tensor, t: Tensor | float, timestep_scaling: float = 4.0,
                       sigma_data: float = 0.5) -> Tensor:
    """The consistency function ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat`` (``t`` scalar or ``[B]``), with
    :func:`~studio.teachers.sampling.consistency_scalings` (``c_skip = sd^2 / ((lam t)^2 + sd^2)``, ``c_out = lam t /
    sqrt((lam t)^2 + sd^2)``, ``lam = timestep_scaling``, ``sd = sigma_data``). ``f(x, 0) = x`` exactly.
    Differentiable in ``model_pred_x0`` and ``x_t``."""
    t = torch.as_tensor(t)
    c_skip, c_out = consistency_scalings(t.to(torch.float64), timestep_scaling, sigma_data)
    return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * model_pred_x0


# --------------------------------------------------------------------------------------- distances
def pseudo_huber(a: Tensor, b: Tensor, c: float = 0.001) -> Tensor:
    """Pseudo-Huber distance averaged over all elements: ``mean(sqrt((a - b)^2 + c^2) - c)``.

    ``>= 0``, ``= 0`` iff ``a = b``; ``~ |d| - c`` for ``|d| >> c`` and ``~ d^2 / (2c)`` for ``|d| << c``
    (``d = a - b``). MCM's ``huber_c`` is 0.001."""
    if c <= 0:
        raise UserError(f"huber_c must be > 0, got {c}")
    d = a - b
    return (torch.sqrt(d * d + c * c) - c).mean()


def consistency_distance(y: Tensor, y_target: Tensor, *, motion: Any = None, loss: str = "huber",
                         huber_c: float = 0.001) -> Tensor:
    """``mean_elements d(phi(y), phi^-(y_target))`` (spec 2.4 step 6).

    ``motion``: ``None`` (identity, plain LCM), one callable used on both sides, or a pair / the
    :class:`~studio.distill.motion.Motion` triple ``(phi, phi_target, ...)``: ``phi`` (trainable) on ``y``,
    ``phi_target`` on ``y_target`` under ``no_grad`` (the target side is stop-grad: ``y_target`` is detached).
    ``loss``: ``"huber"`` (:func:`pseudo_huber` with ``huber_c``) or ``"l2"`` (mean squared error).
    """
    phi, phi_t = _motion_pair(motion)
    with torch.no_grad():
        tgt = phi_t(y_target.detach())
    out = phi(y)
    if out.shape != tgt.shape:
        raise ValueError(f"motion representations differ in shape: {tuple(out.shape)} vs {tuple(tgt.shape)}")
    if loss == "huber":
        return pseudo_huber(out, tgt.detach(), huber_c)
    if loss == "l2":
        return torch.nn.functional.mse_loss(out, tgt.detach())
    raise UserError(f"consistency loss must be one of {LOSSES}, got {loss!r}")


def _identity(x: Tensor) -> Tensor:
    return x


def _motion_pair(motion: Any) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    if motion is None:
        return _identity, _identity
    if callable(motion) and not isinstance(motion, tuple):
        return motion, motion
    items = tuple(motion)
    if len(items) < 2 or not callable(items[0]) or not callable(items[1]):
        raise UserError("motion must be None, a callable, or a pair (phi, phi_target) of callables "
                        "(e.g. studio.distill.motion.make_motion(...))")
    return items[0], items[1]


# --------------------------------------------------------------------------------------- the loss
def _target_x0(student: Any, target: Any, x_end: Tensor, t_end: Tensor, cond: Any) -> Tensor:
    """``x0_hat`` of the target network at ``(x_end, t_end)``, no grad (see :func:`latent_consistency_loss`)."""
    from ..students.ema import EMA

    with torch.no_grad():
        if isinstance(target, str):
            if target != "stopgrad":
                raise UserError(f"target must be 'stopgrad', an EMA of the student or a model, got {target!r}")
            return student.predict(x_end, t_end, cond, output="sample")
        if isinstance(target, EMA):
            with target.applied():
                return student.predict(x_end, t_end, cond, output="sample")
        if hasattr(target, "predict"):
            return target.predict(x_end, t_end, cond, output="sample")
    raise UserError(f"target must be 'stopgrad', an EMA of the student or a model with predict(), got "
                    f"{type(target).__name__}")


def lcd_targets(student: Any, teacher: Any, x_start: Tensor, t_start: Tensor, t_end: Tensor, cond: Any,
                w: Tensor | float, *, target: Any = "stopgrad", timestep_scaling: float = 4.0,
                sigma_data: float = 0.5) -> dict[str, Tensor]:
    """The no-grad half of a consistency-distillation step (spec 2.4 steps 4-5), all detached:

    ``x0_teacher``, ``eps_teacher`` (:func:`lcm_guided_prediction` at ``(x_start, t_start)``, run inside
    ``student.teacher_mode()`` when the student has one), ``x_end`` (:func:`ddim_solver_step` to ``t_end``) and
    ``y_target = f_{theta^-}(x_end, t_end)`` (``target`` as in :func:`latent_consistency_loss`).
    """
    with torch.no_grad():
        with _teacher_context(student):
            x0_t, eps_t = lcm_guided_prediction(teacher, x_start.detach(), t_start, cond, w)
        x_end = ddim_solver_step(student.schedule, x0_t, eps_t, t_end)
        x0_target = _target_x0(student, target, x_end, t_end, cond)
        y_target = consistency_output(x0_target, x_end, t_end, timestep_scaling, sigma_data)
    return {"x0_teacher": x0_t.detach(), "eps_teacher": eps_t.detach(), "x_end": x_end.detach(),
            "y_target": y_target.detach()}


def latent_consistency_loss(student: Any, teacher: Any, x0: Tensor, cond: Any, *,
                            w_range: tuple[float, float] = (5.0, 15.0), num_ddim_timesteps: int = 50,
                            timestep_scaling: float = 4.0, sigma_data: float = 0.5, loss: str = "huber",
                            huber_c: float = 0.001, zero_terminal_snr_swap: bool = True, target: Any = "stopgrad",
                            motion: Any = None, generator: torch.Generator | None = None,
                            index: Tensor | Sequence[int] | None = None, w: Tensor | float | None = None,
                            noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent consistency distillation loss of one batch (module doc; spec 2.4 steps 2-6).

    Args:
        student: the trainable model (teacher protocol: ``predict(x_t, t, cond, output="sample")``), typically a
            :class:`~studio.students.video_lora.VideoLoRAStudent`; called once with grad at ``(x_start, t_start)``.
        teacher: the frozen teacher (two branches, no grad; inside ``student.teacher_mode()`` for a LoRA student).
        x0: clean latents ``[B,C,F,h,w]`` (model space: VAE latents x scaling factor), e.g. from
            :func:`mixed_trajectory_x0`.
        cond: the :class:`~studio.teachers.base.TextCond` (its negative branch is the unconditional one).
        w_range: ``w ~ U[w_min, w_max]`` per sample (LCM form; standard CFG scale ``w + 1``).
        num_ddim_timesteps: ``N`` of the skipping-DDIM grid; ``timestep_scaling`` / ``sigma_data``: the boundary
            scalings (MCM: 4 / 0.5).
        loss, huber_c: distance (:func:`consistency_distance`).
        zero_terminal_snr_swap: MCM's hard swap: samples with ``n = N - 1`` (``t_start = tau_{N-1}``, 999) start
            from pure noise, ``x_start = eps`` (what inference starts from), for student, teacher and solver.
        target: ``"stopgrad"`` (LoRA: the student itself under no-grad), an :class:`~studio.students.ema.EMA` of the
            student's parameters (full fine-tuning: its weights are swapped in for the target call), or any model
            with ``predict`` (e.g. an EMA copy).
        motion: ``None`` / a callable / ``(phi, phi_target)`` (:func:`consistency_distance`).
        generator: draws, in this order: ``n`` ``[B]`` (uniform in ``0..N-1``), ``w`` ``[B]``, ``eps``.
            ``index`` / ``w`` / ``noise`` override the corresponding draw (tests, reproductions); a draw that is
            overridden is skipped.

    Returns:
        ``(loss, info)``: the scalar loss (gradient only through ``y``) and a dict with ``y`` (the student's
        consistency output, with grad: feed it to the discriminator), and, detached, ``y_target``, ``x0``,
        ``x_start``, ``x_end``, ``t_start``, ``t_end`` (long ``[B]``), ``index`` (``n``), ``w`` ``[B]``, ``noise``,
        ``x0_student`` (the student's ``x0_hat``, detached) and ``x0_teacher`` / ``eps_teacher`` (guided).
    """
    if x0.dim() < 2:
        raise UserError(f"x0 must be batched latents [B,C,F,h,w], got shape {tuple(x0.shape)}")
    sched: NoiseSchedule = student.schedule
    T = int(sched.num_train_timesteps)
    N = int(num_ddim_timesteps)
    B = x0.shape[0]
    w_min, w_max = float(w_range[0]), float(w_range[1])
    if w_max < w_min:
        raise UserError(f"w_range must be (w_min, w_max) with w_min <= w_max, got {tuple(w_range)}")
    x0 = x0.detach()
    # ---- draws (documented order)
    if index is None:
        dev = generator.device if generator is not None else torch.device("cpu")
        n = torch.randint(0, N, (B,), generator=generator, device=dev).to(x0.device)
    else:
        n = torch.as_tensor(index, dtype=torch.long, device=x0.device).reshape(-1).expand(B).clone()
    if w is None:
        wt = w_min + (w_max - w_min) * _draw((B,), generator, x0, "rand")
    else:
        wt = torch.as_tensor(w, dtype=x0.dtype, device=x0.device).reshape(-1).expand(B).clone()
    eps = _draw(x0.shape, generator, x0) if noise is None else noise.to(x0.device, x0.dtype)
    if eps.shape != x0.shape:
        raise UserError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    t_start, t_end = solver_indices(n, T, N)
    # ---- x_start (with the zero-terminal-SNR hard swap)
    x_start = sched.add_noise(x0, eps, t_start)
    if zero_terminal_snr_swap:
        last = _bcast((n == N - 1), x_start) > 0
        x_start = torch.where(last, eps, x_start)
    # ---- student: the only forward with grad
    x0_student = student.predict(x_start, t_start, cond, output="sample")
    y = consistency_output(x0_student, x_start, t_start, timestep_scaling, sigma_data)
    # ---- teacher (two branches, LCM-form CFG), DDIM step and target: no grad
    tg = lcd_targets(student, teacher, x_start, t_start, t_end, cond, wt, target=target,
                     timestep_scaling=timestep_scaling, sigma_data=sigma_data)
    x0_t, eps_t, x_end, y_target = tg["x0_teacher"], tg["eps_teacher"], tg["x_end"], tg["y_target"]
    value = consistency_distance(y, y_target, motion=motion, loss=loss, huber_c=huber_c)
    info = {"y": y, "y_target": y_target, "x0": x0, "x_start": x_start.detach(), "x_end": x_end.detach(),
            "t_start": t_start, "t_end": t_end, "index": n, "w": wt, "noise": eps,
            "x0_student": x0_student.detach(), "x0_teacher": x0_t.detach(), "eps_teacher": eps_t.detach()}
    return value, info


# --------------------------------------------------------------------------------------- mixed trajectories
def mixed_trajectory_x0(student: Any, cond: Any, x0_real: Tensor, p: float = 0.5,
                        generator: torch.Generator | None = None, *,
                        num_ddim_timesteps: int = 50) -> tuple[Tensor, bool]:
    """The trajectory start of MCM's mixed trajectory distillation (spec 2.4 step 1): ``(x0, used_student)``.

    One uniform draw ``u`` per batch (always made, so the generator stream does not depend on ``p``); if
    ``u < p``, ``x0 = sg(x0_hat_student(eps', t = tau_{N-1}, c))`` -- one student forward from pure noise
    ``eps'`` (drawn next, shape of ``x0_real``) at the last solver timestep (999), no grad, no guidance (the
    student has CFG baked in) -- else ``x0_real`` (detached). ``p = 0`` never calls the student (plain LCM).
    MCM only mixes while the discriminator is active (the method decides; pass ``p = 0`` otherwise). Under full
    fine-tuning MCM uses its EMA target here: pass that model as ``student``.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise UserError(f"the mixed-trajectory probability p must lie in [0, 1], got {p}")
    dev = generator.device if generator is not None else torch.device("cpu")
    u = float(torch.rand((), generator=generator, device=dev))
    if u >= float(p):
        return x0_real.detach(), False
    T = int(student.schedule.num_train_timesteps)
    t_last = consistency_solver_timesteps(T, num_ddim_timesteps)[-1]
    eps = _draw(x0_real.shape, generator, x0_real)
    t = torch.full((x0_real.shape[0],), t_last, dtype=torch.long, device=x0_real.device)
    with torch.no_grad():
        x0 = student.predict(eps, t, cond, output="sample")
    return x0.detach().to(x0_real.dtype), True
