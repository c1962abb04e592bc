"""The one optimisation loop of the studio.

A method is a list of ``Stage`` objects; ``Trainer.run`` drives them in order with: seeding, a
progress line (step, it/s, loss, ETA), previews every ``preview_every`` steps, atomic checkpoints every
``checkpoint_every`` steps and at the end of each stage, ``resume`` from the last checkpoint, a NaN
guard (a step whose loss or gradients are non-finite is skipped with a warning; after
``max_bad_steps`` consecutive bad steps training stops with ``TrainingDiverged`` and the last good
checkpoint kept), and Ctrl-C saving a checkpoint before it exits. Callbacks receive every step's
record (the app's live progress) and may cancel by returning ``False`` or via ``Trainer.cancel()``.
"""
from __future__ import annotations

import random
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint


class TrainingDiverged(RuntimeError):
    pass


class TrainingCancelled(RuntimeError):
    pass


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. renderer meta for densification


class Stage(Protocol):
    """What the loop needs from a stage (methods compose these from studio parts)."""

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


@dataclass
class TrainerConfig:
    out_dir: Path
    seed: int = 0
    checkpoint_every: int = 200
    preview_every: int = 50
    log_every: int = 10
    max_bad_steps: int = 10
    progress: bool = True


class Trainer:
    def __init__(self, cfg: TrainerConfig, callbacks: list[Callable[[dict], Any]] | None = None):
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.history: list[dict] = []
        self._cancel = threading.Event()
        self.ckpt_path = Path(cfg.out_dir) / "checkpoints" / "last.safetensors"

    def cancel(self) -> None:
        self._cancel.set()

    # -- checkpoints -------------------------------------------------------------------------------
    def _save(self, stages, stage_idx: int, step: int) -> None:
        state = {
            "stage_idx": stage_idx,
            "step": step,
            "stages": {s.name: s.state_dict() for s in stages},
            "optimizers": {s.name: {k: o.state_dict() for k, o in s.optimizers().items()} for s in stages},
            "rng": torch.get_rng_state(),
            "history": self.history[-2000:],
        }
        save_checkpoint(self.ckpt_path, state)

    def _load(self, stages) -> tuple[int, int]:
        state = load_checkpoint(self.ckpt_path)
        for s in stages:
            if s.name in state["stages"]:
                s.load_state_dict(state["stages"][s.name])
                for k, o in s.optimizers().items():
                    if k in state["optimizers"].get(s.name, {}):
                        _load_optimizer(o, state["optimizers"][s.name][k])
        torch.set_rng_state(state["rng"])
        self.history = list(state.get("history", []))
        return int(state["stage_idx"]), int(state["step"])

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stages: list, *, resume: bool = False) -> list[dict]:
        cfg = self.cfg
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        start_stage, start_step = 0, 0
        if resume and self.ckpt_path.exists():
            start_stage, start_step = self._load(stages)
            self._log(f"resumed from {self.ckpt_path} at stage {start_stage} step {start_step}")
        for si in range(start_stage, len(stages)):
            first = start_step if si == start_stage else 0
            self._run_stage(stages, si, first)
        return self.history

    def _run_stage(self, stages, si: int, first: int) -> None:
        cfg, stage = self.cfg, stages[si]
        bad = 0
        t0 = time.perf_counter()
        done_here = 0
        step = first
        try:
            while step < stage.steps:
                if self._cancel.is_set():
                    self._save(stages, si, step)
                    raise TrainingCancelled(f"cancelled at {stage.name} step {step}; checkpoint saved")
                progress = step / max(stage.steps, 1)
                out = stage.train_step(step, progress)
                opts = stage.optimizers()
                loss = out.loss
                ok = bool(torch.isfinite(loss).all())
                if ok:
                    loss.backward()
                    ok = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                             for o in opts.values() for g in o.param_groups for p in g["params"])
                if not ok:
                    for o in opts.values():
                        o.zero_grad(set_to_none=True)
                    bad += 1
                    warnings.warn(f"{stage.name} step {step}: non-finite loss or gradient, step skipped ({bad} in a row)",
                                  RuntimeWarning, stacklevel=2)
                    if bad >= cfg.max_bad_steps:
                        raise TrainingDiverged(
                            f"{stage.name}: {bad} consecutive non-finite steps at step {step}; stopped. The last good "
                            f"checkpoint is kept at {self.ckpt_path} (resume with --resume, e.g. with a lower learning rate)")
                    step += 1
                    continue
                bad = 0
                for o in opts.values():
                    o.step()
                    o.zero_grad(set_to_none=True)
                stage.after_step(step, out)
                step += 1
                done_here += 1
                elapsed = time.perf_counter() - t0
                rec = {"stage": stage.name, "step": step, "steps": stage.steps, "loss": float(loss.detach()),
                       "it_s": done_here / max(elapsed, 1e-9), **{k: float(v) for k, v in out.logs.items()}}
                rec["eta_s"] = (stage.steps - step) / max(rec["it_s"], 1e-9)
                self.history.append(rec)
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
            self._save(stages, si, step)
            self._log(f"interrupted: checkpoint saved to {self.ckpt_path}; continue with --resume")
            raise
        # End of stage: the next stage starts at step 0.
        self._save(stages, si + 1, 0)

    def _write_preview(self, stage, step: int) -> str | None:
        """Render the stage's preview into ``previews/<stage>_<step>.png``; returns the path (or None)."""
        img = stage.preview() if hasattr(stage, "preview") else None
        if img is None:
            return None
        from ..io import write_png

        path = Path(self.cfg.out_dir) / "previews" / f"{stage.name}_{step:06d}.png"
        write_png(path, img.detach().cpu())
        return str(path)

    @staticmethod
    def _log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def _load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state whose param-group sizes may have changed (densification): match by shape."""
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError):
        warnings.warn("optimizer state did not match the restored parameters; restarting its moments", RuntimeWarning)
