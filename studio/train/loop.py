"""The one optimisation loop of the studio.

A method is a list of ``Stage`` objects; ``Trainer.run`` drives them in order with: seeding, a
progress line (step, it/s, loss, ETA), previews every ``preview_every`` steps, atomic checkpoints every
``checkpoint_every`` steps and at the end of each stage, ``resume`` from the last checkpoint, a NaN
guard, and Ctrl-C (and SIGTERM inside :func:`sigterm_as_interrupt`) saving a checkpoint before it exits.
Callbacks receive every step's record (the app's live progress) and may cancel by returning ``False`` or
via ``Trainer.cancel()``.

Reliability
-----------
* The guard: a step whose loss or gradients are non-finite, or whose whole gradient is zero (nothing to
  learn; e.g. a score function replaced non-finite values by 0), is skipped with a warning. One such step is
  harmless; after ``max_bad_steps`` consecutive ones training stops with ``TrainingDiverged``, the message
  saying which of the two it was, and the last good checkpoint kept.
* Parameters are checked after every optimizer step. When a step makes one non-finite, or so large that
  its square overflows (past ~1e19 in float32, where every norm, distance or covariance built on it is Inf:
  a learning rate far too high), the parameters and optimizer states are put back as they were
  before the step (when they hold at most ``RESTORE_MAX_ELEMENTS`` values, so the copy is cheap; larger
  models are left as they are) and training stops at once with ``TrainingDiverged`` ("training diverged"),
  before anything downstream (a renderer's input check) sees the values. Nothing is saved then: the last good
  checkpoint stays.
* Two checkpoints: ``checkpoints/last.safetensors`` and the one before it, ``previous.safetensors``. On
  ``resume`` a missing or corrupt (truncated) ``last`` falls back to ``previous`` with a warning naming the
  corrupt file; with no good one the run stops with a ``UserError`` naming the file and the fix.
* ``Trainer.train_seconds``: training seconds summed over every segment of a resumed run (stored in each
  checkpoint as ``train_seconds``).

Several optimizers and update ratios (generator students: a LoRA student, a critic, a discriminator)
-----------------------------------------------------------------------------------------------------
``StepOutput.loss`` is either

* one tensor: it is backpropagated and *every* optimizer of ``stage.optimizers()`` steps (the 3D stages), or
* a dict ``{optimizer_name: loss}``: each loss is backpropagated into the parameters of *its* optimizer only
  (``loss.backward(inputs=those parameters)``) and only the named optimizers step this iteration.

That one rule serves both patterns of the video methods:

* update ratios, DMD / Stream-R1's two-time-scale rule (the critic steps every iteration, the generator every
  5th): return ``{"generator": l_g, "critic": l_c}`` when ``step % 5 == 0`` and ``{"critic": l_c}`` otherwise;
* "generator loss, then discriminator loss" (MCM): ``{"generator": l_g, "discriminator": l_d}`` with ``l_g``
  through ``D(G(z))`` and ``l_d`` on ``G(z).detach()``. The generator loss leaves no gradient on D (no
  ``requires_grad`` toggling needed), and both losses are taken at the weights from before this iteration's
  update. That equals MCM's "G step, then D step on sg(y)": the D loss does not involve G's weights and the
  G step does not change D. (A D loss on a *fresh* sample of the updated G would need a second iteration.)

Losses are backpropagated in dict order; the record's ``loss`` is their sum and ``loss/<name>`` each one.

EMA: a stage may register EMAs (:class:`studio.students.ema.EMA`) with an optional ``emas() -> {name: EMA}``.
The Trainer updates an EMA after every iteration in which an optimizer holding one of its parameters stepped
(an EMA of a generator that steps every 5th iteration updates every 5th; an EMA whose parameters no optimizer
holds updates every iteration) and saves its state in the checkpoint.

Gradient accumulation, clipping, what ``step`` counts
-----------------------------------------------------
``grad_accum = k``: one step calls ``train_step(step, progress)`` k times with the same ``step`` (the stage
draws a fresh micro-batch per call); every loss is divided by k before its backward, so the optimizers see
the mean gradient of the k micro-batches and step once. ``step`` (records, ``Stage.steps``, checkpoints,
``after_step``, update ratios) counts optimizer steps, not micro-batches; ``after_step`` and the record's
logs get the last micro-batch's ``StepOutput``. ``max_grad_norm > 0`` clips, after accumulation, the gradient
norm of each stepping optimizer's parameters separately (Stream-R1 clips generator and critic at 10 each); the
norms are logged as ``grad_norm/<name>`` (before clipping). The NaN guard covers every loss of every
micro-batch and the accumulated gradients of the stepping optimizers; a skipped step drops all gradients,
steps nothing and still advances ``step``. Ctrl-C in the middle of an accumulated step saves the stage's state
as it is then: the micro-batches already drawn are not replayed on resume.

Multi-process / multi-GPU with ``accelerate`` (``TrainerConfig.accelerate``)
---------------------------------------------------------------------------
``False`` (the default) is the plain single-process loop, exactly as before. ``True`` trains through one
``accelerate.Accelerator``; ``"auto"`` does so when the program was started with several processes
(``accelerate launch`` / ``torchrun``: ``WORLD_SIZE > 1``) or ``mixed_precision`` asks for fp16 / bf16.
Then:

* A stage with the optional ``modules() -> {attribute_name: nn.Module}`` (its *trainable* modules, each the
  value of the stage attribute of that name) has them and its optimizers prepared by the Accelerator
  (``DistributedDataParallel``, device placement) once at the start of the stage. While ``train_step`` runs,
  those attributes hold the prepared modules (forward through them: that is how DDP averages gradients); at
  every other call (``state_dict``, ``load_state_dict``, ``preview``, ``after_step``) and after the stage they
  hold the plain modules again, so state keys carry no ``module.`` prefix. The stage's optimizers must stay
  the same objects for the whole stage. Under DDP a trainable module should belong to one optimizer (the
  per-optimizer backward above reduces a module's gradients in the backward of that optimizer's loss).
* A stage without ``modules()`` (e.g. the Gaussian stage, whose parameters change shape under densification)
  trains as in the plain loop, in one process only; with more processes the Trainer refuses with a
  ``UserError`` (run such stages without ``accelerate launch``; ``studio batch`` shards prompts instead).
* Gradients: ``accelerator.backward``; the micro-batches before the last one of a step run under
  ``accelerator.no_sync`` (no all-reduce), the last one synchronises. The NaN guard's verdict is all-reduced,
  so all ranks skip a step together (each rank also backpropagates a non-finite loss, to keep DDP's
  collectives matched, before the step is dropped); cancelling is all-reduced the same way.
* Seeds: rank r seeds its global RNGs with ``seed + r`` (different data / noise per rank, reproducible);
  stages draw per-rank randomness from the global RNG or from generators seeded with
  ``process_info().seed(seed)``. The initial weights are the same on every rank: DDP broadcasts rank 0's
  parameters when it wraps a module, and the Trainer broadcasts rank 0's EMA weights. Note a stage's own
  generator is saved in its ``state_dict`` from the main process only, so for exact multi-process resume draw
  per-rank randomness from the global RNG, whose state the Trainer saves for every rank.
* Only the main process writes checkpoints and previews, prints progress and runs callbacks; logged losses
  are the main process's. All ranks read the checkpoint on resume (each restores its own RNG state), so
  ``out_dir`` must be on a file system every rank sees; the ranks wait for each other after a save.
* Launching: on GPUs ``accelerate launch --multi_gpu --num_processes N train.py`` (or ``torchrun``). On a
  machine without CUDA the same commands start N CPU processes that the Trainer joins over gloo (it passes
  ``cpu=True`` to accelerate). Note ``accelerate launch --cpu --num_processes N`` on one machine starts a
  *single* process (accelerate's multi-CPU mode expects ``mpirun``).
* ``mixed_precision`` (``"no"``, ``"bf16"``, ``"fp16"``; ``None``: whatever ``accelerate launch`` was told)
  wraps ``train_step`` in ``accelerator.autocast()``. With fp16 the loss is scaled (GradScaler), gradients
  are unscaled before clipping and the guard; an overflow lowers the scale and skips the step without counting
  as a bad step while the scale is at least 1 (fp16 needs a GPU; it is not exercised by the CPU tests).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .checkpoint import CorruptCheckpoint, checkpoint_ok, load_checkpoint, save_checkpoint
from ..students.ema import EMA, unwrap_module


class TrainingDiverged(RuntimeError):
    pass


class TrainingCancelled(RuntimeError):
    pass


#: Parameters (of the optimizers stepping in an iteration) up to this many values are copied, with their
#: optimizer states, before each optimizer step, so a step that makes them non-finite can be undone.
RESTORE_MAX_ELEMENTS = 4_000_000


class Terminated(KeyboardInterrupt):
    """SIGTERM inside :func:`sigterm_as_interrupt`: a ``KeyboardInterrupt`` (the Trainer saves a checkpoint as on
    Ctrl-C), distinguishable by callers that exit with 143 rather than 130."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM (``timeout``, ``docker stop``, Slurm, ``kill``) as Ctrl-C inside this block: the handler raises
    :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread, so a running ``Trainer`` saves a checkpoint
    and re-raises. The previous handler is restored on exit. A no-op outside the main thread (only it may install
    signal handlers: the app's worker threads) and where there is no SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _sigterm_deferred():
    """Hold SIGTERM back (delivered at the end of the block) while the Ctrl-C checkpoint is written, so a second
    SIGTERM cannot cut that save short. Main thread on POSIX only; elsewhere a no-op."""
    can = (threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
           and hasattr(signal, "SIGTERM"))
    if not can:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclass
class StepOutput:
    loss: torch.Tensor | dict[str, torch.Tensor]  # one loss (all optimizers step) or {optimizer_name: loss}
    logs: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. renderer meta for densification


class Stage(Protocol):
    """What the loop needs from a stage (methods compose these from studio parts).

    Optional, for generator students (see the module docstring): ``modules() -> dict[str, nn.Module]`` (the
    trainable modules, by the name of the stage attribute holding each; needed for multi-process training)
    and ``emas() -> dict[str, EMA]`` (EMAs the Trainer updates and checkpoints).
    """

    name: str
    steps: int

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(self, step: int, progress: float) -> StepOutput: ...

    def after_step(self, step: int, out: StepOutput) -> None: ...  # e.g. densification, after optimizer.step

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def preview(self) -> torch.Tensor | None: ...  # [H,W,3] in [0,1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a multi-process run (rank 0 of 1 on CPU otherwise)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, base: int) -> int:
        """The per-rank seed ``base + rank`` (what the Trainer seeds the global RNGs with)."""
        return int(base) + self.rank


def cpu_processes() -> bool:
    """Several processes on a machine without CUDA: accelerate must be told ``cpu=True`` to join them (gloo);
    left alone it would treat each process as a separate single-process run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


_GROUP_EXIT_HOOK = False


def destroy_group_at_exit() -> bool:
    """Register (once per process) an ``atexit`` hook that destroys the default process group while the
    interpreter is still alive. A process that exits with a gloo group still up can abort in interpreter
    finalisation ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489): a rare race
    that failed a two-process CI run here. Every place the studio joins processes (``process_info``, the batch
    runner, ``Trainer`` under accelerate) calls this after accelerate has set up the group; returns whether the
    hook is registered."""
    global _GROUP_EXIT_HOOK
    if not _GROUP_EXIT_HOOK and torch.distributed.is_available() and torch.distributed.is_initialized():
        import atexit

        def _destroy() -> None:
            if torch.distributed.is_initialized():
                with contextlib.suppress(Exception):
                    torch.distributed.destroy_process_group()

        atexit.register(_destroy)
        _GROUP_EXIT_HOOK = True
    return _GROUP_EXIT_HOOK


def partial_state():
    """accelerate's ``PartialState`` for this process (CPU-only machines join several processes with gloo), with
    the group's exit hook registered (``destroy_group_at_exit``)."""
    from accelerate import PartialState

    s = PartialState(cpu=cpu_processes())
    destroy_group_at_exit()
    return s


def process_info() -> ProcessInfo:
    """Rank, world size and device as ``accelerate`` sees them (its ``PartialState``: under ``accelerate launch``
    / ``torchrun`` one process per GPU, or several CPU processes joined with gloo on a machine without GPUs;
    in one process ``cuda`` when a GPU exists, else ``cpu``). Stages trained with ``TrainerConfig.accelerate``
    put their data on ``device`` and seed per-rank generators with ``seed(s)``."""
    s = partial_state()
    return ProcessInfo(int(s.process_index), int(s.num_processes), torch.device(s.device))


@dataclass
class TrainerConfig:
    out_dir: Path
    seed: int = 0
    checkpoint_every: int = 200
    preview_every: int = 50
    log_every: int = 10
    max_bad_steps: int = 10
    progress: bool = True
    accelerate: bool | str = False  # False | True | "auto" (see the module docstring)
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str | None = None  # None (accelerate's launch setting) | "no" | "bf16" | "fp16"
    max_grad_norm: float = 0.0  # > 0: clip each stepping optimizer's gradient norm
    find_unused_parameters: bool = False  # DDP option, for modules some of whose parameters get no gradient


_MIXED = (None, "no", "bf16", "fp16")


def _use_accelerate(cfg: TrainerConfig) -> bool:
    if cfg.accelerate is True or cfg.accelerate is False:
        return bool(cfg.accelerate)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.mixed_precision in ("bf16", "fp16")


def _validate(cfg: TrainerConfig) -> None:
    if cfg.accelerate not in (True, False, "auto"):
        raise UserError(f"TrainerConfig.accelerate={cfg.accelerate!r} is not valid; use False, True or 'auto'")
    if isinstance(cfg.grad_accum, bool) or not isinstance(cfg.grad_accum, int) or cfg.grad_accum < 1:
        raise UserError(f"TrainerConfig.grad_accum={cfg.grad_accum!r} is not valid; use an integer >= 1")
    if cfg.mixed_precision not in _MIXED:
        raise UserError(f"TrainerConfig.mixed_precision={cfg.mixed_precision!r} is not valid; use one of "
                        f"{', '.join(repr(m) for m in _MIXED)}")
    if cfg.mixed_precision in ("bf16", "fp16") and not _use_accelerate(cfg):
        raise UserError(f"mixed_precision={cfg.mixed_precision!r} needs accelerate=True or 'auto' "
                        "(mixed precision runs through accelerate)")
    if not (cfg.max_grad_norm >= 0 and math.isfinite(cfg.max_grad_norm)):
        raise UserError(f"TrainerConfig.max_grad_norm={cfg.max_grad_norm!r} is not valid; use 0 (off) or a "
                        "positive number")


# -- how gradients travel: one process, or through accelerate ---------------------------------------------
class _Plain:
    """The single-process loop without accelerate."""

    rank, world, is_main, scaler = 0, 1, True, None

    def backward(self, loss: torch.Tensor, inputs: list[torch.Tensor] | None) -> None:
        loss.backward(inputs=inputs) if inputs is not None else loss.backward()

    def no_sync(self, modules) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_true(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag AND-ed over all ranks (one collective)."""
        return tuple(flags)

    def any_true(self, flag: bool) -> bool:
        return flag

    def unscale(self, opts) -> None:
        pass

    def step(self, opts) -> None:
        for o in opts:
            o.step()

    def lower_scale(self) -> float:
        return 0.0

    def gather_rng(self) -> list | None:
        return None

    def wait(self) -> None:
        pass


def _inner_optimizer(o):
    while hasattr(o, "optimizer") and isinstance(o.optimizer, torch.optim.Optimizer):
        o = o.optimizer
    return o


class _Accelerated(_Plain):
    """The loop through one ``accelerate.Accelerator`` (DDP when there are several processes)."""

    def __init__(self, cfg: TrainerConfig):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        kw = {} if cfg.mixed_precision is None else {"mixed_precision": cfg.mixed_precision}
        wanted = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and AcceleratorState._shared_state:
            # One process running several trainings (the app, tests): accelerate's state is a process-wide
            # singleton that refuses (or silently keeps) another mixed-precision setting; nothing distributed
            # is lost by resetting it in a single process.
            with contextlib.suppress(Exception):
                if AcceleratorState().mixed_precision != wanted:
                    AcceleratorState._reset_state()
        self.acc = Accelerator(
            cpu=cpu_processes(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)], **kw)
        destroy_group_at_exit()
        self.rank, self.world = int(self.acc.process_index), int(self.acc.num_processes)
        self.is_main = bool(self.acc.is_main_process)
        self.device = self.acc.device
        self.scaler = self.acc.scaler
        if self.world > 1 and self.device.type == "cpu":
            # Several processes on one machine: split the cores, or OpenMP threads thrash each other.
            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // self.world)))

    def backward(self, loss, inputs) -> None:
        self.acc.backward(loss, **({} if inputs is None else {"inputs": inputs}))

    def no_sync(self, modules) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for m in modules:
            stack.enter_context(self.acc.no_sync(m))
        return stack

    def autocast(self):
        return self.acc.autocast()

    def _reduce(self, flags: tuple[bool, ...], op) -> tuple[bool, ...]:
        if self.world <= 1:
            return tuple(flags)
        import torch.distributed as dist

        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=op)
        return tuple(bool(v > 0.5) for v in t.tolist())

    def all_true(self, *flags: bool) -> tuple[bool, ...]:
        import torch.distributed as dist

        return self._reduce(flags, dist.ReduceOp.MIN)

    def any_true(self, flag: bool) -> bool:
        import torch.distributed as dist

        return self._reduce((flag,), dist.ReduceOp.MAX)[0]

    def unscale(self, opts) -> None:
        if self.scaler is not None:
            for o in opts:
                self.scaler.unscale_(_inner_optimizer(o))

    def step(self, opts) -> None:
        if self.scaler is None or not opts:
            for o in opts:
                o.step()
            return
        for o in opts:  # the GradScaler recipe for several optimizers: step each, update once
            self.scaler.step(_inner_optimizer(o))
        self.scaler.update()

    def lower_scale(self) -> float:
        """After a skipped fp16 step: back the loss scale off (the same on every rank) and reset the scaler."""
        s = self.scaler
        new = float(s.get_scale()) * float(s.get_backoff_factor())
        s.update(new)
        return new

    def gather_rng(self) -> list | None:
        if self.world <= 1:
            return None
        import torch.distributed as dist

        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        out: list = [None] * self.world
        dist.all_gather_object(out, mine)
        return out

    def wait(self) -> None:
        self.acc.wait_for_everyone()


@dataclass
class _StageRun:
    """What the Trainer keeps for the stage it is running."""

    raw: dict[str, nn.Module] = field(default_factory=dict)  # modules() by attribute, unwrapped
    wrapped: dict[str, nn.Module] = field(default_factory=dict)  # the same, prepared (DDP) under accelerate
    opts: dict[str, Any] | None = None  # prepared optimizers (fixed for the stage); None: ask the stage each step
    emas: dict[str, EMA] = field(default_factory=dict)
    ema_owners: dict[str, set[str]] = field(default_factory=dict)

    def optimizers(self, stage) -> dict[str, Any]:
        return self.opts if self.opts is not None else stage.optimizers()

    @contextlib.contextmanager
    def forward_modules(self, stage):
        """The stage's attributes hold the prepared modules inside this block (train_step)."""
        swap = {k: m for k, m in self.wrapped.items() if m is not self.raw[k]}
        for k, m in swap.items():
            setattr(stage, k, m)
        try:
            yield
        finally:
            for k in swap:
                setattr(stage, k, self.raw[k])


def _params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]


def _stack_flags(flags: list[torch.Tensor]) -> list[bool]:
    """Scalar bool tensors (possibly on several devices) read back with one host sync per device."""
    dev = flags[0].device
    return [bool(v) for v in torch.stack([f.to(dev) for f in flags]).tolist()]


def _grad_verdict(params: list[torch.Tensor]) -> tuple[bool, bool]:
    """(every gradient finite, some gradient value non-zero) for ``params``; a missing gradient counts as zero."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True, False
    fin = _stack_flags([torch.isfinite(g).all() for g in grads])
    nonzero = _stack_flags([g.ne(0).any() for g in grads])
    return all(fin), any(nonzero)


def _sane(p: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``p`` is finite and its square is too (|x| <= sqrt(dtype max), ~1.8e19 in float32
    and bfloat16; float16, whose square root of max is only 256, is checked for finiteness only)."""
    if not p.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=p.device)
    top = float(torch.finfo(p.dtype).max)
    return p.detach().abs().le(math.sqrt(top) if top > 1e30 else top).all()  # False for NaN and Inf too


def _all_sane(params: list[torch.Tensor]) -> bool:
    """No parameter diverged: every value finite, and small enough that a norm or variance of it stays finite (a
    value past ~1e19 in float32 has no finite square, so any distance, norm or renderer covariance built on it
    overflows later, far from the step that caused it)."""
    return not params or all(_stack_flags([_sane(p) for p in params]))


def _snapshot(opts: list) -> tuple | None:
    """Copies of the optimizers' parameters and states (None when they hold more than ``RESTORE_MAX_ELEMENTS``)."""
    inner = [_inner_optimizer(o) for o in opts]
    params = list({id(p): p for o in inner for g in o.param_groups for p in g["params"]}.values())
    if sum(p.numel() for p in params) > RESTORE_MAX_ELEMENTS:
        return None
    values = [p.detach().clone() for p in params]
    states = [{p: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in st.items()}
               for p, st in o.state.items()} for o in inner]
    return params, values, inner, states


def _restore(snap: tuple) -> None:
    params, values, inner, states = snap
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    for o, st in zip(inner, states):
        o.state.clear()
        o.state.update(st)


def _stage_modules(stage) -> dict[str, nn.Module] | None:
    fn = getattr(stage, "modules", None)
    if fn is None or not callable(fn):
        return None
    if isinstance(stage, nn.Module) and getattr(type(stage), "modules", None) is nn.Module.modules:
        return None  # nn.Module's own modules() (an iterator of submodules), not the Stage's
    mods = fn()
    if not isinstance(mods, dict) or not all(isinstance(m, nn.Module) for m in mods.values()):
        raise TypeError(f"stage '{stage.name}': modules() must return a dict {{attribute_name: nn.Module}}")
    for k, m in mods.items():
        held = getattr(stage, k, None)
        if not isinstance(held, nn.Module) or unwrap_module(held) is not unwrap_module(m):
            raise ValueError(f"stage '{stage.name}': modules() key {k!r} must be the name of the stage attribute "
                             "holding that module (the Trainer puts the prepared module there during train_step)")
    return {k: unwrap_module(m) for k, m in mods.items()}


def _stage_emas(stage) -> dict[str, EMA]:
    fn = getattr(stage, "emas", None)
    if fn is None or not callable(fn):
        return {}
    emas = fn() or {}
    if not isinstance(emas, dict) or not all(isinstance(e, EMA) for e in emas.values()):
        raise TypeError(f"stage '{stage.name}': emas() must return a dict {{name: studio.students.ema.EMA}}")
    return dict(emas)


class Trainer:
    def __init__(self, cfg: TrainerConfig, callbacks: list[Callable[[dict], Any]] | None = None):
        _validate(cfg)
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.history: list[dict] = []
        self._cancel = threading.Event()
        self.ckpt_path = Path(cfg.out_dir) / "checkpoints" / "last.safetensors"
        self.prev_ckpt_path = self.ckpt_path.with_name("previous.safetensors")
        self._be: _Plain = _Plain()
        self._seconds_before = 0.0  # training seconds of the segments before this one (from the checkpoint)
        self._segment_start: float | None = None  # perf_counter at the start of this segment while running
        self._segment_seconds = 0.0
        self._own_last = False  # last.safetensors was written or resumed from by this run (may be rotated)
        self._restored = False  # the last diverged step was undone

    @property
    def train_seconds(self) -> float:
        """Seconds spent training this run, summed over every segment: those recorded in the checkpoint it resumed
        from plus this ``run`` call's (live while it runs; final once it returns or raises)."""
        seg = self._segment_seconds if self._segment_start is None else time.perf_counter() - self._segment_start
        return self._seconds_before + seg

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def accelerator(self):
        """The ``accelerate.Accelerator`` of the current run (None in the plain loop)."""
        return getattr(self._be, "acc", None)

    @property
    def is_main_process(self) -> bool:
        return self._be.is_main

    # -- checkpoints -------------------------------------------------------------------------------
    def _save(self, stages, stage_idx: int, step: int, *, collective: bool = True) -> None:
        """Write the checkpoint (main process only). ``collective``: every rank calls this at the same point
        (their RNG states are gathered); False after Ctrl-C, where the other ranks may be gone."""
        rng_ranks = self._be.gather_rng() if collective else None
        if not self._be.is_main:
            if collective:
                self._be.wait()
            return
        state = {
            "stage_idx": stage_idx,
            "step": step,
            "stages": {s.name: s.state_dict() for s in stages},
            "optimizers": {s.name: {k: o.state_dict() for k, o in s.optimizers().items()} for s in stages},
            "rng": torch.get_rng_state(),
            "history": self.history[-2000:],
            "train_seconds": float(self.train_seconds),
        }
        emas = {s.name: {k: e.state_dict() for k, e in _stage_emas(s).items()} for s in stages}
        if any(emas.values()):
            state["emas"] = {k: v for k, v in emas.items() if v}
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        self._keep_previous()
        save_checkpoint(self.ckpt_path, state)
        self._own_last = True
        if collective:
            self._be.wait()  # no rank goes on (e.g. to resume from it) before the file is complete

    def _keep_previous(self) -> None:
        """Before ``last`` is replaced: keep it as ``previous`` if this run wrote (or resumed from) it and it is
        complete. A fresh run into a folder with an older run's checkpoints drops that run's ``previous``, so
        a fallback never resumes another run's state."""
        last, prev = self.ckpt_path, self.prev_ckpt_path
        if not self._own_last:
            with contextlib.suppress(FileNotFoundError):
                prev.unlink()
            return
        if not checkpoint_ok(last):
            return  # a corrupt last is overwritten; the good previous stays
        tmp = prev.with_name(f".{prev.name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(last, tmp)  # the same bytes under a second name; last is then replaced by a new file
        except OSError:
            shutil.copyfile(last, tmp)  # file systems without hard links
        os.replace(tmp, prev)

    def _resume_state(self) -> tuple[dict, Path] | None:
        """The checkpoint to resume from: ``last``, else (missing or corrupt) ``previous`` with a warning naming
        the corrupt file; None when the run has no checkpoint. Raises ``UserError`` when none is readable."""
        last, prev = self.ckpt_path, self.prev_ckpt_path
        corrupt: CorruptCheckpoint | None = None
        if last.exists():
            try:
                return load_checkpoint(last), last
            except CorruptCheckpoint as e:
                corrupt = e
        if not prev.exists():
            if corrupt is None:
                return None
            raise UserError(f"cannot resume: {corrupt.reason_text()}, and there is no previous good checkpoint "
                            f"({prev.name}) to fall back to. Delete '{last}' and start the run again without "
                            "--resume (training restarts from step 0)")
        try:
            state = load_checkpoint(prev)
        except CorruptCheckpoint as e:
            first = f"{corrupt.reason_text()} and " if corrupt is not None else f"'{last}' is missing and "
            raise UserError(f"cannot resume: {first}{e.reason_text()}. Delete both and start the run again without "
                            "--resume (training restarts from step 0)") from None
        if self._be.is_main:
            why = corrupt.reason_text() if corrupt is not None else f"'{last}' is missing"
            warnings.warn(f"{why}; resuming from the previous good checkpoint '{prev}' (stage {state['stage_idx']} "
                          f"step {state['step']}); the steps after it are trained again", RuntimeWarning, stacklevel=3)
        return state, prev

    def _load(self, stages, state: dict) -> tuple[int, int]:
        for s in stages:
            if s.name in state["stages"]:
                s.load_state_dict(state["stages"][s.name])
                for k, o in s.optimizers().items():
                    if k in state["optimizers"].get(s.name, {}):
                        _load_optimizer(o, state["optimizers"][s.name][k])
                saved = state.get("emas", {}).get(s.name, {})
                for k, e in _stage_emas(s).items():
                    if k in saved:
                        e.load_state_dict(saved[k])
        be = self._be
        ranks = state.get("rng_ranks")
        if be.world == 1:
            torch.set_rng_state(state["rng"])
        elif ranks is not None and len(ranks) == be.world:
            torch.set_rng_state(ranks[be.rank]["cpu"])
            if "cuda" in ranks[be.rank] and getattr(be, "device", torch.device("cpu")).type == "cuda":
                torch.cuda.set_rng_state(ranks[be.rank]["cuda"], be.device)
        else:
            # Saved by another number of processes, or after Ctrl-C: reseed per rank, deterministically.
            if be.is_main:
                warnings.warn("the checkpoint holds no RNG state for each of these processes; reseeding each "
                              "rank from the seed, the rank and the step", RuntimeWarning, stacklevel=2)
            seed_everything(self.cfg.seed + be.rank + 1_000_003 * (int(state["step"]) + 1))
        self.history = list(state.get("history", []))
        self._seconds_before = float(state.get("train_seconds", 0.0))
        return int(state["stage_idx"]), int(state["step"])

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stages: list, *, resume: bool = False) -> list[dict]:
        cfg = self.cfg
        if _use_accelerate(cfg) and not isinstance(self._be, _Accelerated):
            self._be = _Accelerated(cfg)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed + self._be.rank)
        start_stage, start_step = 0, 0
        self._seconds_before, self._segment_seconds, self._own_last = 0.0, 0.0, False
        found = self._resume_state() if resume else None
        if found is not None:
            start_stage, start_step = self._load(stages, found[0])
            self._own_last = True
            self._log(f"resumed from {found[1]} at stage {start_stage} step {start_step}")
        self._segment_start = time.perf_counter()
        try:
            for si in range(start_stage, len(stages)):
                first = start_step if si == start_stage else 0
                self._run_stage(stages, si, first)
            self._be.wait()
        finally:
            self._segment_seconds = time.perf_counter() - self._segment_start
            self._segment_start = None
        return self.history

    def _prepare(self, stage) -> _StageRun:
        be, run = self._be, _StageRun()
        mods = _stage_modules(stage)
        run.emas = _stage_emas(stage)
        if mods is None and be.world > 1:
            raise UserError(f"stage '{stage.name}' cannot train in {be.world} processes: it has no modules() to "
                            "wrap in DistributedDataParallel (e.g. Gaussian splats, whose parameters change shape "
                            "under densification); run it in one process (without accelerate launch)")
        if mods is not None:
            run.raw = dict(mods)
            run.wrapped = dict(mods)
            if isinstance(be, _Accelerated):
                opts = stage.optimizers()
                prepared = be.acc.prepare(*mods.values(), *opts.values())
                prepared = list(prepared) if isinstance(prepared, (tuple, list)) else [prepared]
                run.wrapped = dict(zip(mods, prepared[:len(mods)]))
                run.opts = dict(zip(opts, prepared[len(mods):]))
                self._check_ddp_ownership(stage, run)
        if be.world > 1 and run.emas:
            import torch.distributed as dist

            for e in run.emas.values():  # the same EMA weights on every rank, as DDP does for the live ones
                for s in e.shadow:
                    t = s.to(be.device)
                    dist.broadcast(t, 0)
                    s.copy_(t.to(s.device))
        owners = {name: {id(p) for p in _params(o)} for name, o in run.optimizers(stage).items()}
        for k, e in run.emas.items():
            ids = {id(p) for p in e.params}
            run.ema_owners[k] = {name for name, ps in owners.items() if ids & ps}
        return run

    def _check_ddp_ownership(self, stage, run: _StageRun) -> None:
        if self._be.world <= 1:
            return
        owner = {id(p): name for name, o in run.opts.items() for p in _params(o)}
        for k, m in run.raw.items():
            names = {owner[id(p)] for p in m.parameters() if p.requires_grad and id(p) in owner}
            if len(names) > 1:
                raise ValueError(f"stage '{stage.name}': module {k!r} has trainable parameters in several optimizers "
                                 f"({sorted(map(str, names))}); under DDP give each optimizer its own modules")

    def _finish(self, run: _StageRun) -> None:
        be = self._be
        if isinstance(be, _Accelerated) and run.opts is not None:
            for m in run.wrapped.values():  # drop accelerate's autocast patch of forward (mixed precision)
                with contextlib.suppress(Exception):
                    be.acc.unwrap_model(m, keep_fp32_wrapper=False)
            be.acc.free_memory()  # accelerate's references to this stage's modules and optimizers

    def _iteration(self, stage, run: _StageRun, step: int, progress: float):
        """One optimizer step: ``grad_accum`` micro-batches, the NaN guard, clipping, the optimizer steps.
        Returns (status, out, losses, norms) with status "ok", "bad" (non-finite loss or gradient), "zero" (the
        whole gradient is zero), "overflow" (fp16) or "diverged" (the step made parameters non-finite)."""
        cfg, be = self.cfg, self._be
        A = cfg.grad_accum
        opts = run.optimizers(stage)
        losses: dict[str | None, float] = {}
        loss_ok = True
        out = None
        for micro in range(A):
            with (be.no_sync(run.wrapped.values()) if micro < A - 1 else contextlib.nullcontext()):
                with be.autocast(), run.forward_modules(stage):
                    out = stage.train_step(step, progress)
                items = out.loss.items() if isinstance(out.loss, dict) else ((None, out.loss),)
                for name, loss in items:
                    if name is not None and name not in opts:
                        raise ValueError(f"stage '{stage.name}': StepOutput.loss key {name!r} names no optimizer "
                                         f"(optimizers: {', '.join(opts)})")
                    if not bool(torch.isfinite(loss).all()):
                        loss_ok = False
                        if be.world == 1:
                            break  # nothing to keep in step with: skip the backward, as always
                    inputs = None
                    if name is not None:
                        inputs = _params(opts[name])
                        if not inputs:
                            raise ValueError(f"stage '{stage.name}': optimizer {name!r} has no trainable parameters")
                    be.backward(loss if A == 1 else loss / A, inputs)
                    losses[name] = losses.get(name, 0.0) + float(loss.detach()) / A
            if not loss_ok and be.world == 1:
                break
        stepping = list(opts) if None in losses else [n for n in opts if n in losses]
        norms: dict[str, float] = {}
        grad_ok = loss_ok
        nonzero = True
        unscaled = False
        if loss_ok or be.world > 1:
            be.unscale([opts[n] for n in stepping])
            unscaled = be.scaler is not None
            if cfg.max_grad_norm > 0:
                for n in stepping:
                    norms[n] = float(torch.nn.utils.clip_grad_norm_(_params(opts[n]), cfg.max_grad_norm))
                grad_ok = grad_ok and all(math.isfinite(v) for v in norms.values())
                nonzero = any(v != 0.0 for v in norms.values())
            else:
                finite, nonzero = _grad_verdict([p for n in stepping for p in _params(opts[n])])
                grad_ok = grad_ok and finite
        loss_ok, ok, zero = be.all_true(loss_ok, grad_ok, not nonzero)
        status = "ok"
        if ok and zero:
            status = "zero"  # nothing to learn from: counted as a failed step, nothing steps
        elif ok:
            stepped = [opts[n] for n in stepping]
            snap = _snapshot(stepped)
            be.step(stepped)
            (finite,) = be.all_true(_all_sane([p for o in stepped for p in _params(o)]))
            if finite:
                self._update_emas(run, stepping)
            else:
                if snap is not None:
                    _restore(snap)
                self._restored = snap is not None
                status = "diverged"
        else:
            status = "bad"
            if unscaled:
                scale = be.lower_scale()
                if loss_ok and scale >= 1.0:
                    status = "overflow"
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        return status, out, losses, norms

    @staticmethod
    def _update_emas(run: _StageRun, stepping: list[str]) -> None:
        for k, e in run.emas.items():
            owners = run.ema_owners.get(k, set())
            if not owners or owners & set(stepping):
                e.update()

    def _run_stage(self, stages, si: int, first: int) -> None:
        cfg, stage, be = self.cfg, stages[si], self._be
        bad = 0
        t0 = time.perf_counter()
        done_here = 0
        step = first
        run = self._prepare(stage)
        try:
            while step < stage.steps:
                if be.any_true(self._cancel.is_set()):
                    self._cancel.set()
                    self._save(stages, si, step)
                    raise TrainingCancelled(f"cancelled at {stage.name} step {step}; checkpoint saved")
                progress = step / max(stage.steps, 1)
                status, out, losses, norms = self._iteration(stage, run, step, progress)
                if status == "overflow":
                    if be.is_main:
                        warnings.warn(f"{stage.name} step {step}: fp16 gradient overflow, step skipped and loss scale "
                                      "lowered", RuntimeWarning, stacklevel=2)
                    step += 1
                    continue
                if status == "diverged":
                    undone = ("; the parameters are back as they were before it" if self._restored else "")
                    raise TrainingDiverged(
                        f"{stage.name}: training diverged at step {step}: the optimizer step made parameters "
                        f"non-finite or overflowing (NaN, Inf or beyond 1e19), most likely a learning rate far too "
                        f"high{undone}. Stopped. {self._kept('lower the learning rate')}")
                if status in ("bad", "zero"):
                    bad += 1
                    what = ("non-finite loss or gradient" if status == "bad" else
                            "the gradient was zero (nothing to learn; e.g. non-finite values zeroed by the score)")
                    if be.is_main:
                        warnings.warn(f"{stage.name} step {step}: {what}, step skipped ({bad} in a row)",
                                      RuntimeWarning, stacklevel=2)
                    if bad >= cfg.max_bad_steps:
                        cause, fix = (("a non-finite loss or gradient (NaN or Inf)",
                                       "lower the learning rate or look for NaN / Inf in the inputs")
                                      if status == "bad" else
                                      ("a gradient that was zero everywhere (nothing is learned: e.g. a NaN guidance "
                                       "scale or non-finite scores replaced by 0)",
                                       "look for NaN / Inf in the numbers and inputs of the run"))
                        raise TrainingDiverged(
                            f"{stage.name}: {bad} failed steps in a row at step {step}, the last with {cause}; "
                            f"stopped. {self._kept(fix)}")
                    step += 1
                    continue
                bad = 0
                stage.after_step(step, out)
                step += 1
                done_here += 1
                elapsed = time.perf_counter() - t0
                rec = {"stage": stage.name, "step": step, "steps": stage.steps, "loss": sum(losses.values()),
                       "it_s": done_here / max(elapsed, 1e-9), **{k: float(v) for k, v in out.logs.items()}}
                if None not in losses:
                    rec.update({f"loss/{k}": v for k, v in losses.items()})
                rec.update({f"grad_norm/{k}": v for k, v in norms.items()})
                rec["eta_s"] = (stage.steps - step) / max(rec["it_s"], 1e-9)
                self.history.append(rec)
                if be.is_main:
                    if cfg.preview_every and (step % cfg.preview_every == 0 or step == stage.steps):
                        rec["preview"] = self._write_preview(stage, step)
                    if cfg.progress and (step % cfg.log_every == 0 or step == stage.steps):
                        self._log(f"[{stage.name}] {step}/{stage.steps} {rec['it_s']:.2f} it/s loss {rec['loss']:.4g} "
                                  f"eta {rec['eta_s']:.0f}s")
                    for cb in self.callbacks:
                        if cb(dict(rec, stage_obj=stage)) is False:
                            self._cancel.set()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stage.steps:
                    self._save(stages, si, step)
        except KeyboardInterrupt:
            with _sigterm_deferred():  # a second SIGTERM waits until the checkpoint is complete
                self._save(stages, si, step, collective=False)
                self._log(f"interrupted: checkpoint saved to {self.ckpt_path}; continue with --resume")
            raise
        finally:
            self._finish(run)
        # End of stage: the next stage starts at step 0.
        self._save(stages, si + 1, 0)

    def _kept(self, fix: str) -> str:
        """Where the last good checkpoint is, and what to do (``fix``) before going on."""
        if self._own_last and self.ckpt_path.exists():
            return f"The last good checkpoint is kept at {self.ckpt_path}: {fix}, then resume from it with --resume"
        return f"No checkpoint had been written yet: {fix}, then start again"

    def _write_preview(self, stage, step: int) -> str | None:
        """Render the stage's preview into ``previews/<stage>_<step>.png``; returns the path (or None)."""
        img = stage.preview() if hasattr(stage, "preview") else None
        if img is None:
            return None
        from ..io import write_png

        path = Path(self.cfg.out_dir) / "previews" / f"{stage.name}_{step:06d}.png"
        write_png(path, img.detach().cpu())
        return str(path)

    def _log(self, msg: str) -> None:
        if self._be.is_main:
            print(msg, file=sys.stderr, flush=True)


def _load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state whose param-group sizes may have changed (densification): match by shape."""
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError):
        warnings.warn("optimizer state did not match the restored parameters; restarting its moments", RuntimeWarning)
