"""Per-step wall-time profile of the Gaussian score-distillation stage (issue 22, part 4).

Off by default and free when off: a stage looks for the active profiler once per step (``active()``) and, when
there is none, runs exactly as before. Turn it on around a run::

    prof = StepProfiler()
    with profiling(prof):
        methods.run(cfg, "sds", out)
    prof.summary()   # mean ms per step of each part, their sum and the measured step time

Each step is the wall time from one ``train_step`` start to the next (the last step of a run has no next start
and is dropped). It is split, exclusively (a nested part is not counted in its parent), into:

* ``teacher_forward``: the teacher's network (every ``teacher._forward`` call), its ``encode`` and the view
  prompt conditioning;
* ``render_forward`` / ``render_backward``: the rasterizer call; its backward is timed from the moment the
  gradients of its image and alpha outputs are ready to the last gradient accumulated into a Gaussian parameter
  (autograd hooks, which change no value);
* ``loss_sds``: the method's score function less its teacher calls, the stage's regularisers, and the backward
  from the loss down to the render outputs;
* ``cameras``: camera sampling, schedules, backgrounds, the SH-degree step;
* ``optimizer_step``: the stage's optimizers' ``step`` (optimizer step hooks);
* ``densification``: the strategy's pre- and post-backward calls;
* ``preview``: the stage's preview renders;
* ``other``: the rest of the step (the Trainer's checks and bookkeeping, checkpoints, callbacks, logging).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Iterator

PARTS = ("teacher_forward", "render_forward", "render_backward", "loss_sds", "cameras", "optimizer_step",
         "densification", "preview", "other")

_ACTIVE: "StepProfiler | None" = None


def active() -> "StepProfiler | None":
    """The profiler turned on by :func:`profiling` (None when profiling is off)."""
    return _ACTIVE


@contextlib.contextmanager
def profiling(prof: "StepProfiler") -> Iterator["StepProfiler"]:
    """Turn ``prof`` on for the stages that run inside this block."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, prof
    try:
        yield prof
    finally:
        _ACTIVE = prev


class StepProfiler:
    """Wall-clock seconds per part of each step (see the module doc); exclusive nested sections."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.steps: list[dict[str, float]] = []
        self._cur: dict[str, float] | None = None
        self._start: float | None = None
        self._stack: list[list] = []  # [name, start of the current uncounted slice]
        self.marks: dict[str, float] = {}

    # -- step boundaries ---------------------------------------------------------------------------
    def begin_step(self) -> None:
        now = self.clock()
        if self._cur is not None and self._start is not None:
            self._close(now)
        self._cur, self._start, self._stack, self.marks = {p: 0.0 for p in PARTS}, now, [], {}

    def _close(self, now: float) -> None:
        cur = self._cur
        cur["total"] = now - self._start
        cur["other"] = cur["total"] - sum(cur[p] for p in PARTS if p != "other")
        self.steps.append(cur)
        self._cur = None

    def end(self) -> None:
        """Close the open step at this moment (call right after the training loop returns, if wanted)."""
        if self._cur is not None and self._start is not None:
            self._close(self.clock())

    # -- timing ------------------------------------------------------------------------------------
    def add(self, part: str, seconds: float) -> None:
        if self._cur is not None:
            self._cur[part] = self._cur.get(part, 0.0) + max(0.0, float(seconds))

    @contextlib.contextmanager
    def section(self, part: str) -> Iterator[None]:
        now = self.clock()
        if self._stack:  # pause the enclosing section
            outer = self._stack[-1]
            self.add(outer[0], now - outer[1])
        self._stack.append([part, now])
        try:
            yield
        finally:
            end = self.clock()
            name, t0 = self._stack.pop()
            self.add(name, end - t0)
            if self._stack:
                self._stack[-1][1] = end

    def mark(self, key: str, keep: str = "last") -> None:
        """Remember a timestamp (``keep='max'``/``'min'`` keeps the latest / earliest of several)."""
        now = self.clock()
        old = self.marks.get(key)
        if old is None or keep == "last" or (keep == "max" and now > old) or (keep == "min" and now < old):
            self.marks[key] = now

    # -- results -----------------------------------------------------------------------------------
    def summary(self, skip: int = 2) -> dict:
        """Mean milliseconds per step of each part over the closed steps after the first ``skip`` (warm-up),
        their sum, the mean measured step time and each part's share of it."""
        rows = self.steps[skip:] if len(self.steps) > skip else self.steps
        if not rows:
            return {"steps": 0}
        ms = {p: round(1e3 * statistics.fmean(r[p] for r in rows), 3) for p in PARTS}
        total = 1e3 * statistics.fmean(r["total"] for r in rows)
        return {"steps": len(rows), "skipped_warmup_steps": min(skip, len(self.steps)), "ms_per_step": ms,
                "sum_of_parts_ms": round(sum(ms.values()), 3), "step_ms": round(total, 3),
                "step_ms_median": round(1e3 * statistics.median(r["total"] for r in rows), 3),
                "share": {p: round(ms[p] / total, 4) if total > 0 else None for p in PARTS}}
