"""The one training loop: NaN guard, atomic checkpoints, resume, cancel, Ctrl-C."""
import math
import warnings

import pytest
import torch

from studio.train.checkpoint import load_checkpoint, save_checkpoint
from studio.train.loop import StepOutput, Trainer, TrainerConfig, TrainingCancelled, TrainingDiverged


class QuadStage:
    """Minimise |x - target|^2 with Adam; optionally poison some steps with NaN."""

    def __init__(self, name="quad", steps=30, nan_steps=(), kbi_step=None):
        self.name, self.steps = name, steps
        self.x = torch.nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.Adam([self.x], lr=0.1)
        self.nan_steps, self.kbi_step = set(nan_steps), kbi_step
        self.noise = torch.Generator().manual_seed(0)

    def optimizers(self):
        return {"x": self.opt}

    def train_step(self, step, progress):
        if step == self.kbi_step:
            self.kbi_step = None
            raise KeyboardInterrupt
        target = torch.tensor([1.0, -2.0, 3.0]) + 0.01 * torch.randn(3, generator=self.noise)
        loss = (self.x - target).pow(2).sum()
        if step in self.nan_steps:
            loss = loss * float("nan")
        return StepOutput(loss, {"x0": float(self.x[0].detach())})

    def after_step(self, step, out):
        pass

    def state_dict(self):
        return {"x": self.x.detach().clone(), "noise": self.noise.get_state()}

    def load_state_dict(self, s):
        with torch.no_grad():
            self.x.copy_(s["x"])
        self.noise.set_state(s["noise"])

    def preview(self):
        return None


def cfg(tmp_path, **kw):
    return TrainerConfig(out_dir=tmp_path, progress=False, checkpoint_every=10, **kw)


def test_converges_and_checkpoints(tmp_path):
    st = QuadStage(steps=60)
    hist = Trainer(cfg(tmp_path)).run([st])
    assert len(hist) == 60 and hist[-1]["loss"] < hist[0]["loss"] * 0.05
    state = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert state["stage_idx"] == 1 and torch.allclose(state["stages"]["quad"]["x"], st.x.detach())


def test_nan_steps_are_skipped_with_warning(tmp_path):
    st = QuadStage(steps=20, nan_steps={3, 4})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        hist = Trainer(cfg(tmp_path)).run([st])
    assert len(hist) == 18 and all(math.isfinite(h["loss"]) for h in hist)
    assert torch.isfinite(st.x).all()


def test_repeated_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    st = QuadStage(steps=40, nan_steps=set(range(15, 40)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDiverged, match="last good checkpoint"):
            Trainer(cfg(tmp_path, max_bad_steps=5)).run([st])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert state["step"] == 10 and torch.isfinite(state["stages"]["quad"]["x"]).all()


def test_resume_equals_uninterrupted(tmp_path):
    ref = QuadStage(steps=30)
    Trainer(cfg(tmp_path / "a")).run([ref])
    # Interrupted at step 17 by Ctrl-C: a checkpoint is saved, then resumed in a fresh process-like setup.
    st = QuadStage(steps=30, kbi_step=17)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path / "b")).run([st])
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")["step"] == 17
    fresh = QuadStage(steps=30)
    Trainer(cfg(tmp_path / "b")).run([fresh], resume=True)
    assert torch.allclose(fresh.x, ref.x, atol=1e-6)


def test_cancel_from_callback(tmp_path):
    st = QuadStage(steps=50)
    with pytest.raises(TrainingCancelled):
        Trainer(cfg(tmp_path), callbacks=[lambda rec: rec["step"] < 5]).run([st])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["step"] == 5


def test_checkpoint_round_trip_nested(tmp_path):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    state = {"a": {"b": [torch.arange(3), 2.5, None, "s"]}, "opt": opt.state_dict(), "t": (1, 2)}
    p = save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(p)
    assert torch.equal(back["a"]["b"][0], torch.arange(3)) and back["a"]["b"][1:] == [2.5, None, "s"]
    assert back["t"] == (1, 2) and torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_checkpoint(tmp_path / "missing.safetensors")
