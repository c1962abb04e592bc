"""Issue 15, the training loop: all-zero gradients, diverging parameters, two checkpoints with fallback on a
corrupt one, training seconds across resumes, SIGTERM saving a checkpoint like Ctrl-C."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from studio.errors import UserError
from studio.train.checkpoint import CorruptCheckpoint, checkpoint_ok, load_checkpoint
from studio.train.loop import (StepOutput, Terminated, Trainer, TrainerConfig, TrainingDiverged,
                               sigterm_as_interrupt)

REPO = Path(__file__).resolve().parents[1]


class Quad:
    """Minimise |x - target|^2 with Adam. ``zero_steps``: the loss is 0 * x (an all-zero gradient, as when a score
    function zeroed non-finite values); ``blowup_step``: the learning rate jumps to 1e30 from that step on;
    ``kbi_step``: Ctrl-C there; ``sleep``: seconds per step."""

    def __init__(self, steps=30, zero_steps=(), blowup_step=None, kbi_step=None, sleep=0.0, name="quad"):
        self.name, self.steps = name, steps
        self.x = torch.nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.Adam([self.x], lr=0.1)
        self.zero_steps, self.blowup_step, self.kbi_step, self.sleep = set(zero_steps), blowup_step, kbi_step, sleep
        self.noise = torch.Generator().manual_seed(0)
        self.before_blowup = None

    def optimizers(self):
        return {"x": self.opt}

    def train_step(self, step, progress):
        if step == self.kbi_step:
            self.kbi_step = None
            raise KeyboardInterrupt
        if self.sleep:
            time.sleep(self.sleep)
        if step == self.blowup_step:
            for g in self.opt.param_groups:
                g["lr"] = 1e30
            st = self.opt.state[self.x]
            self.before_blowup = (self.x.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
                                  float(st["step"]))
        target = torch.tensor([1.0, -2.0, 3.0]) + 0.01 * torch.randn(3, generator=self.noise)
        loss = (self.x * 0.0).sum() if step in self.zero_steps else (self.x - target).pow(2).sum()
        return StepOutput(loss)

    def after_step(self, step, out):
        pass

    def state_dict(self):
        return {"x": self.x.detach().clone(), "noise": self.noise.get_state()}

    def load_state_dict(self, s):
        with torch.no_grad():
            self.x.copy_(s["x"])
        self.noise.set_state(s["noise"])


def cfg(tmp_path, **kw):
    kw.setdefault("checkpoint_every", 5)
    return TrainerConfig(out_dir=tmp_path, progress=False, **kw)


def ckpt(tmp_path, name="last"):
    return Path(tmp_path) / "checkpoints" / f"{name}.safetensors"


# -- a) the guard ---------------------------------------------------------------------------------------
def test_all_zero_gradient_every_step_stops_the_run(tmp_path):
    st = Quad(steps=40, zero_steps=range(40))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(TrainingDiverged, match="zero") as e:
            Trainer(cfg(tmp_path, max_bad_steps=4)).run([st])
    assert "4 failed steps in a row" in str(e.value) and "check the values" not in str(e.value)
    assert any("the gradient was zero" in str(x.message) for x in w)
    assert torch.equal(st.x.detach(), torch.zeros(3))  # nothing stepped


def test_a_single_zero_gradient_step_is_skipped_not_fatal(tmp_path):
    st = Quad(steps=30, zero_steps={3, 10, 11})
    with pytest.warns(RuntimeWarning, match="gradient was zero"):
        hist = Trainer(cfg(tmp_path, max_bad_steps=3)).run([st])
    assert len(hist) == 27 and hist[-1]["loss"] < 0.5


def test_parameters_made_non_finite_by_a_step_stop_with_diverged_and_are_restored(tmp_path):
    st = Quad(steps=40, blowup_step=12)
    with pytest.raises(TrainingDiverged) as e:
        Trainer(cfg(tmp_path)).run([st])
    msg = str(e.value)
    assert "training diverged at step 12" in msg and "learning rate" in msg and "check the values" not in msg
    assert str(ckpt(tmp_path)) in msg
    # parameters and optimizer state are those from before the step that diverged
    x, m, v, n = st.before_blowup
    state = st.opt.state[st.x]
    assert torch.equal(st.x.detach(), x) and torch.equal(state["exp_avg"], m)
    assert torch.equal(state["exp_avg_sq"], v) and float(state["step"]) == n
    # the last good checkpoint is kept (step 10), nothing non-finite was saved
    saved = load_checkpoint(ckpt(tmp_path))
    assert saved["step"] == 10 and torch.isfinite(saved["stages"]["quad"]["x"]).all()


def test_lr_that_overflows_the_gaussians_is_reported_as_divergence_not_bad_input(tmp_path):
    """``--stage.lr-means 1e30``: before the guard this ran into the renderer's input check ("scales contains NaN or
    Inf values; check the values you pass") or exported a model with means ~1e30."""
    from methods.sds import SDSConfig, SDSMethod
    from studio.teachers.registry import load_teacher
    from studio.train.gaussian_stage import GaussianStageConfig

    stage_cfg = GaussianStageConfig(batch_size=1, init_points=64, lr_means=1e30)
    c = SDSConfig(prompt="a red cube", steps=20, stage=stage_cfg)
    teacher = load_teacher("shapeworld-exact")
    stages = SDSMethod().stages(c, teacher, dict(steps=20, resolution=32, guidance_scale=7.5))
    means0 = stages[0].model.params["means"].detach().clone()
    with pytest.raises(TrainingDiverged, match="training diverged at step 0") as e:
        Trainer(cfg(tmp_path)).run(stages)
    assert "learning rate" in str(e.value) and "check the values" not in str(e.value)
    assert torch.equal(stages[0].model.params["means"].detach(), means0)


def test_nan_guidance_in_a_gaussian_run_stops_instead_of_exporting_an_untrained_model(tmp_path):
    """The score functions replace non-finite values by 0: with a NaN guidance scale every step had loss 0 and
    the run ended "successfully" with an untrained model."""
    from methods.sds import SDSConfig, SDSMethod
    from studio.teachers.registry import load_teacher
    from studio.train.gaussian_stage import GaussianStageConfig

    c = SDSConfig(prompt="a red cube", steps=20, stage=GaussianStageConfig(batch_size=1, init_points=64))
    stages = SDSMethod().stages(c, load_teacher("shapeworld-exact"),
                                dict(steps=20, resolution=32, guidance_scale=float("nan")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDiverged, match="zero everywhere"):
            Trainer(cfg(tmp_path, max_bad_steps=3)).run(stages)


# -- b) two checkpoints, fallback on a corrupt one ------------------------------------------------------
def test_two_checkpoints_are_kept(tmp_path):
    Trainer(cfg(tmp_path)).run([Quad(steps=12)])
    assert load_checkpoint(ckpt(tmp_path))["stage_idx"] == 1
    assert load_checkpoint(ckpt(tmp_path, "previous"))["step"] == 10


def test_resume_on_truncated_last_falls_back_to_previous_and_matches_uninterrupted(tmp_path):
    ref = Quad(steps=30)
    Trainer(cfg(tmp_path / "a")).run([ref])
    st = Quad(steps=30, kbi_step=17)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path / "b")).run([st])
    last = ckpt(tmp_path / "b")
    assert load_checkpoint(last)["step"] == 17 and load_checkpoint(ckpt(tmp_path / "b", "previous"))["step"] == 15
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    assert not checkpoint_ok(last)
    with pytest.raises(CorruptCheckpoint, match="last.safetensors") as e:
        load_checkpoint(last)
    assert isinstance(e.value, UserError) and "--resume" in str(e.value)
    fresh = Quad(steps=30)
    with pytest.warns(RuntimeWarning, match=r"last\.safetensors' is corrupt.*previous good checkpoint"):
        Trainer(cfg(tmp_path / "b")).run([fresh], resume=True)
    assert torch.allclose(fresh.x, ref.x, atol=1e-6)
    assert checkpoint_ok(last)  # the corrupt file was replaced by a good one


def test_resume_on_corrupt_last_without_previous_names_the_file_and_the_fix(tmp_path):
    st = Quad(steps=30, kbi_step=7)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path, checkpoint_every=100)).run([st])
    assert not ckpt(tmp_path, "previous").exists()
    last = ckpt(tmp_path)
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(UserError) as e:
        Trainer(cfg(tmp_path)).run([Quad(steps=30)], resume=True)
    msg = str(e.value)
    assert str(last) in msg and "corrupt" in msg and "without --resume" in msg and "Traceback" not in msg


def test_zeroed_checkpoint_is_reported_as_corrupt(tmp_path):
    p = tmp_path / "z.safetensors"
    p.write_bytes(bytes(4096))
    with pytest.raises(CorruptCheckpoint, match="z.safetensors"):
        load_checkpoint(p)


def test_a_fresh_run_drops_the_previous_checkpoint_of_an_older_run(tmp_path):
    Trainer(cfg(tmp_path)).run([Quad(steps=12)])
    assert ckpt(tmp_path, "previous").exists()
    st = Quad(steps=30, kbi_step=3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path)).run([st])
    assert not ckpt(tmp_path, "previous").exists()  # never a fallback onto the older run's state


# -- c) training seconds across resumes ---------------------------------------------------------------
def test_train_seconds_add_up_over_resumed_segments(tmp_path):
    t1 = Trainer(cfg(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        t1.run([Quad(steps=20, kbi_step=10, sleep=0.02)])
    first = t1.train_seconds
    assert first >= 10 * 0.02
    assert load_checkpoint(ckpt(tmp_path))["train_seconds"] == pytest.approx(first, abs=0.05)
    t2 = Trainer(cfg(tmp_path))
    t2.run([Quad(steps=20, sleep=0.02)], resume=True)
    assert t2.train_seconds >= first + 10 * 0.02
    assert t2.train_seconds == pytest.approx(load_checkpoint(ckpt(tmp_path))["train_seconds"], abs=0.05)


# -- d) SIGTERM ------------------------------------------------------------------------------------------
SIGTERM_SCRIPT = r'''
import sys, time
sys.path.insert(0, {tests!r})
from studio.train.loop import Terminated, Trainer, TrainerConfig, sigterm_as_interrupt
from test_reliability_loop import Quad

ready = {ready!r}
def cb(rec):
    if rec["step"] == 3:
        open(ready, "w").close()
try:
    with sigterm_as_interrupt():
        Trainer(TrainerConfig(out_dir={out!r}, progress=False, checkpoint_every=0),
                callbacks=[cb]).run([Quad(steps=100000, sleep=0.01)])
except Terminated:
    sys.exit(143)
sys.exit(0)
'''


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    ready = tmp_path / "ready"
    script = SIGTERM_SCRIPT.format(tests=str(REPO / "tests"), ready=str(ready), out=str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the training subprocess did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "checkpoint saved" in err and "Traceback" not in err
    assert load_checkpoint(ckpt(tmp_path / "run"))["step"] >= 3


def test_sigterm_as_interrupt_restores_the_handler_and_is_a_noop_in_threads():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)
    seen = []

    def in_thread():
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == [before]
