"""Exponential moving average (EMA) of module weights, for the tiny-teacher scripts and for stages.

After each update ``shadow <- d * shadow + (1 - d) * live`` with

    d = 0                                   while fewer than ``start_step`` updates were made (shadow = live),
    d = min(decay, (1 + n) / (10 + n))      with the warm-up (``warmup=True``, n = the step number),
    d = decay                               without it.

The warm-up is the ``(1+n)/(10+n)`` ramp of the tiny-teacher scripts (d = 0.1 at n = 0, 0.5 at n = 8): early
shadows forget the random init quickly. ``start_step`` serves "EMA 0.99 from step 200" (Stream-R1 /
Self-Forcing create the EMA copy at that step, which is the same as tracking the live weights until then).

Modules may be wrapped for distributed training (``DistributedDataParallel``, ``accelerate``, ``torch.compile``):
the EMA reads the parameters of the *unwrapped* module (:func:`unwrap_module`), which are the very tensors
the wrapper trains, and names them without the wrapper's ``module.`` prefix, so a state saved under DDP loads
in a single process and back. Stages register their EMAs with the :class:`~studio.train.loop.Trainer` through an
optional ``emas()`` method; the Trainer updates them after the optimizer steps and keeps their state in its
checkpoints (see :mod:`studio.train.loop`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, however deeply nested; any other module is returned as is."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class EMA:
    """EMA of the parameters of ``modules`` (one module or an iterable of them; wrappers are unwrapped).

    Args:
        decay: the EMA decay ``d`` (e.g. 0.995; MCM's target head 0.95; Stream-R1 0.99).
        warmup: use ``min(decay, (1+n)/(10+n))`` (the tiny-teacher scripts' default).
        start_step: updates with ``n < start_step`` copy the live weights (``d = 0``).
        trainable_only: average only parameters with ``requires_grad`` (a LoRA student: the adapters, not the
            frozen base weights, which would double memory and never change).

    ``update(step)`` takes the step number used by the warm-up and ``start_step``; without it the EMA counts
    its own updates (``num_updates``, saved in ``state_dict``), which is what the Trainer uses: an EMA of a
    generator that steps every 5th iteration counts generator steps.
    """

    def __init__(self, modules: nn.Module | Iterable[nn.Module], decay: float, *, warmup: bool = True,
                 start_step: int = 0, trainable_only: bool = False):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.decay, self.warmup, self.start_step = float(decay), bool(warmup), int(start_step)
        self.num_updates = 0
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for i, m in enumerate(mods):
            for n, p in unwrap_module(m).named_parameters():
                if id(p) in seen or (trainable_only and not p.requires_grad):
                    continue
                seen.add(id(p))
                self.names.append(f"{i}.{n}" if len(mods) > 1 else n)
                self.params.append(p)
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        d = self.current_decay(self.num_updates if step is None else int(step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the live weights with the EMA weights."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @torch.no_grad()
    def reset(self) -> None:
        """Set the EMA weights to the live weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach())

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live and the EMA weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """``with ema.applied(): ...`` runs the block with the EMA weights in the modules (previews, export)."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> dict:
        return {"shadow": {n: s.detach().clone() for n, s in zip(self.names, self.shadow)},
                "decay": self.decay, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters (first: {missing[0]!r}); it was saved for "
                           "other modules")
        for n, s in zip(self.names, self.shadow):
            v = shadow[n]
            if v.shape != s.shape:
                raise ValueError(f"EMA state for {n!r} has shape {tuple(v.shape)}, the module {tuple(s.shape)}")
            s.copy_(v.to(s.device, s.dtype))
        self.num_updates = int(state.get("num_updates", 0))
