"""A tiny method of the one protocol for testing the run skeleton: a real Trainer stage that pulls three numbers
towards 1 (seconds per run, not minutes). Importable by subprocesses (``PYTHONPATH=tests``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.runs.protocol import Method
from studio.runs.skeleton import train_stages
from studio.train.loop import StepOutput


@dataclass
class CountConfig:
    prompt: str = ""
    steps: int = 5
    lr: float = 0.1
    delay: float = 0.0
    """seconds to sleep per step (to interrupt a run in the middle)"""


class CountStage:
    name = "count"

    def __init__(self, cfg: CountConfig):
        self.steps, self.delay = cfg.steps, cfg.delay
        self.p = torch.nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.SGD([self.p], lr=cfg.lr)

    def optimizers(self):
        return {"opt": self.opt}

    def train_step(self, step, progress):
        time.sleep(self.delay)
        return StepOutput(((self.p - 1.0) ** 2).sum())

    def after_step(self, step, out):
        pass

    def state_dict(self):
        return {"p": self.p.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.p.copy_(state["p"])

    def preview(self):
        return None


class CountMethod(Method):
    name = "count"
    kind = "test"
    description = "pulls three numbers towards 1"
    Config = CountConfig

    def run(self, cfg: CountConfig, run_dir: Path, *, callbacks=None, resume=False, progress=True) -> dict:
        stage = CountStage(cfg)
        history, seconds = train_stages([stage], run_dir, seed=0, callbacks=callbacks, resume=resume, progress=False,
                                        checkpoint_every=1, preview_every=0)
        return {"p": stage.p.detach().tolist(), "train_seconds": seconds, "final_loss": history[-1]["loss"]}
