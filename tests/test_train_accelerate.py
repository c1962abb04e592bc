"""The Trainer for generator students: two optimizers with an update ratio, EMA, gradient accumulation,
clipping, the NaN guard, resume, and a 2-process CPU run through ``accelerate launch`` (DDP over gloo)."""
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import UserError
from studio.train.checkpoint import load_checkpoint
from studio.students.ema import EMA, unwrap_module
from studio.train.loop import StepOutput, Trainer, TrainerConfig, process_info

REPO = Path(__file__).resolve().parents[1]


class GenStage:
    """A tiny GAN-flavoured generator student: G maps fixed codes z to targets y (MSE + a small adversarial
    term through D), D tells y from G(z). D steps every iteration, G every ``gen_every``-th; EMA of G.

    Data are indexed by a global micro-batch counter, so one process with batch 2b and two processes with
    batch b each (rank r takes the r-th half) see the same samples. ``rand_log`` records one draw of the global
    RNG per call (per-rank seeding and RNG restore on resume)."""

    def __init__(self, steps=12, batch=8, gen_every=3, nan_steps=(), kbi_call=None, name="gen"):
        self.name, self.steps, self.batch, self.gen_every = name, steps, batch, gen_every
        g = torch.Generator().manual_seed(1234)
        self.z = torch.randn(64, 4, generator=g)
        self.y = torch.tanh(self.z @ torch.randn(4, 6, generator=g)) + 0.3
        torch.manual_seed(7)  # the same init in every process (DDP also broadcasts rank 0's)
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
        self.disc = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-2)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=5e-3)
        self.ema = EMA(self.gen, 0.9, warmup=False)
        self.nan_steps, self.kbi_call = set(nan_steps), kbi_call
        self.calls = 0
        self.rand_log: list[float] = []
        self.counts = {"generator": 0, "discriminator": 0}
        self.opt_g.register_step_post_hook(lambda *a: self._count("generator"))
        self.opt_d.register_step_post_hook(lambda *a: self._count("discriminator"))
        self.grad_norms_at_step: list[float] = []
        self.opt_g.register_step_pre_hook(lambda *a: self.grad_norms_at_step.append(
            float(torch.cat([p.grad.flatten() for p in self.gen.parameters()]).norm())))

    def _count(self, k):
        self.counts[k] += 1

    # -- Stage protocol
    def optimizers(self):
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def modules(self):
        return {"gen": self.gen, "disc": self.disc}

    def emas(self):
        return {"gen": self.ema}

    def train_step(self, step, progress):
        if self.calls == self.kbi_call:
            self.kbi_call = None
            raise KeyboardInterrupt
        info = process_info() if os.environ.get("WORLD_SIZE", "1") != "1" else None
        rank, world = (info.rank, info.world_size) if info else (0, 1)
        start = self.calls * self.batch * world + rank * self.batch
        idx = (start + torch.arange(self.batch)) % self.z.shape[0]
        self.calls += 1
        self.rand_log.append(float(torch.rand(())))
        z, y = self.z[idx], self.y[idx]
        fake = self.gen(z)
        d_in = torch.cat([fake.detach(), y])
        logits = self.disc(d_in)
        l_d = F.softplus(logits[: len(z)]).mean() + F.softplus(-logits[len(z):]).mean()
        if step in self.nan_steps:
            l_d = l_d * float("nan")
        losses = {"discriminator": l_d}
        if step % self.gen_every == 0:
            l_g = F.mse_loss(fake, y) + 0.05 * F.softplus(-self.disc(fake)).mean()
            losses = {"generator": l_g, "discriminator": l_d}  # generator loss first, as in MCM
        return StepOutput(losses, {"mse": float(F.mse_loss(fake.detach(), y))})

    def after_step(self, step, out):
        pass

    def state_dict(self):
        return {"gen": self.gen.state_dict(), "disc": self.disc.state_dict(), "calls": self.calls}

    def load_state_dict(self, s):
        self.gen.load_state_dict(s["gen"])
        self.disc.load_state_dict(s["disc"])
        self.calls = int(s["calls"])

    def preview(self):
        return None

    @torch.no_grad()
    def full_mse(self):
        return float(F.mse_loss(self.gen(self.z), self.y))

    def weights(self):
        return torch.cat([p.detach().flatten() for m in (self.gen, self.disc) for p in m.parameters()]
                         + [s.flatten() for s in self.ema.shadow])


def cfg(tmp_path, **kw):
    kw.setdefault("checkpoint_every", 5)
    return TrainerConfig(out_dir=tmp_path, progress=False, preview_every=0, **kw)


def test_two_optimizers_update_ratio_ema_and_plain_equals_accelerate(tmp_path):
    st = GenStage(steps=12, gen_every=3)
    mse0 = st.full_mse()
    hist = Trainer(cfg(tmp_path / "plain")).run([st])
    assert st.counts == {"generator": 4, "discriminator": 12}  # steps 0, 3, 6, 9
    assert st.ema.num_updates == 4  # the EMA follows its optimizer's steps
    assert len(hist) == 12 and "loss/discriminator" in hist[0] and "loss/generator" in hist[0]
    assert "loss/generator" not in hist[1]
    assert st.full_mse() < 0.8 * mse0
    # The generator loss went through D but left D's update alone: D only moved by its own 12 steps; the EMA
    # lags behind the live generator.
    ema_w = torch.cat([s.flatten() for s in st.ema.shadow])
    live = torch.cat([p.detach().flatten() for p in st.gen.parameters()])
    assert not torch.allclose(ema_w, live)
    state = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.safetensors")
    assert state["emas"]["gen"]["gen"]["num_updates"] == 4
    assert torch.equal(state["emas"]["gen"]["gen"]["shadow"]["0.weight"], st.ema.shadow[0])
    # Through an Accelerator in one process: the same numbers.
    st2 = GenStage(steps=12, gen_every=3)
    tr = Trainer(cfg(tmp_path / "acc", accelerate=True))
    tr.run([st2])
    assert tr.accelerator is not None and st2.gen is unwrap_module(st2.gen)  # plain modules back after the stage
    assert torch.allclose(st.weights(), st2.weights(), atol=1e-6)


def test_generator_loss_leaves_no_gradient_on_discriminator(tmp_path):
    """Each loss of the dict goes into its own optimizer's parameters only."""
    st = GenStage(steps=1, gen_every=1)
    seen = {}
    st.opt_d.register_step_pre_hook(lambda *a: seen.update(d=[p.grad.clone() for p in st.disc.parameters()]))
    Trainer(cfg(tmp_path)).run([st])
    ref = GenStage(steps=1, gen_every=1)
    out = ref.train_step(0, 0.0)
    grads = torch.autograd.grad(out.loss["discriminator"], list(ref.disc.parameters()))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(seen["d"], grads))


def test_grad_accum_equals_the_bigger_batch(tmp_path):
    big = GenStage(steps=8, batch=8)
    Trainer(cfg(tmp_path / "big")).run([big])
    acc = GenStage(steps=8, batch=4)
    hist = Trainer(cfg(tmp_path / "acc", grad_accum=2)).run([acc])
    assert acc.calls == 16 and len(hist) == 8 and hist[-1]["step"] == 8  # step counts optimizer steps
    assert acc.counts == big.counts == {"generator": 3, "discriminator": 8}
    assert torch.allclose(acc.weights(), big.weights(), atol=1e-5)


def test_clipping_bounds_each_optimizers_gradient(tmp_path):
    st = GenStage(steps=6, gen_every=1)
    hist = Trainer(cfg(tmp_path, max_grad_norm=0.01)).run([st])
    assert all(n <= 0.01 * (1 + 1e-4) for n in st.grad_norms_at_step)
    assert all(h["grad_norm/generator"] > 0.01 for h in hist)  # logged before clipping: clipping did act
    free = GenStage(steps=6, gen_every=1)
    Trainer(cfg(tmp_path / "free")).run([free])
    assert max(free.grad_norms_at_step) > 0.01


def test_nan_guard_skips_the_whole_step(tmp_path):
    st = GenStage(steps=9, gen_every=3, nan_steps={3})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        hist = Trainer(cfg(tmp_path)).run([st])
    assert [h["step"] for h in hist] == [1, 2, 3, 5, 6, 7, 8, 9]
    # Step 3 would have stepped both; neither did (the generator's loss was finite, D's was not).
    assert st.counts == {"generator": 2, "discriminator": 8} and st.ema.num_updates == 2
    assert torch.isfinite(st.weights()).all()
    # With accumulation, a NaN in one micro-batch drops the whole step.
    st2 = GenStage(steps=4, batch=4, gen_every=1, nan_steps={2})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        Trainer(cfg(tmp_path / "acc", grad_accum=2)).run([st2])
    assert st2.counts == {"generator": 3, "discriminator": 3}


def test_resume_equals_uninterrupted(tmp_path):
    ref = GenStage(steps=12, gen_every=3)
    Trainer(cfg(tmp_path / "a", grad_accum=2)).run([ref])
    st = GenStage(steps=12, gen_every=3, kbi_call=14)  # Ctrl-C as the 8th step starts
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path / "b", grad_accum=2)).run([st])
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")["step"] == 7
    fresh = GenStage(steps=12, gen_every=3)
    Trainer(cfg(tmp_path / "b", grad_accum=2)).run([fresh], resume=True)
    assert fresh.ema.num_updates == ref.ema.num_updates == 4
    assert torch.allclose(fresh.weights(), ref.weights(), atol=1e-6)
    assert fresh.rand_log == ref.rand_log[14:]  # the global RNG continues where the checkpoint left it


def test_bf16_single_process(tmp_path):
    st = GenStage(steps=6, gen_every=1)
    hist = Trainer(cfg(tmp_path, accelerate="auto", mixed_precision="bf16")).run([st])
    assert len(hist) == 6 and all(math.isfinite(h["loss"]) for h in hist)
    assert all(p.dtype == torch.float32 for p in st.gen.parameters())


def test_config_errors_and_stage_without_modules(tmp_path):
    with pytest.raises(UserError, match="grad_accum"):
        Trainer(cfg(tmp_path, grad_accum=0))
    with pytest.raises(UserError, match="accelerate=True"):
        Trainer(cfg(tmp_path, mixed_precision="bf16"))
    with pytest.raises(UserError, match="accelerate"):
        Trainer(cfg(tmp_path, accelerate="yes"))

    class Wrong(GenStage):
        def modules(self):
            return {"generator": self.gen}  # not the attribute's name

    with pytest.raises(ValueError, match="attribute"):
        Trainer(cfg(tmp_path / "w")).run([Wrong(steps=1)])

    class NoModules(GenStage):  # like the Gaussian stage: the plain path, also under accelerate=True
        modules = None
        emas = None

    st = NoModules(steps=3, gen_every=1)
    Trainer(cfg(tmp_path / "n", accelerate=True)).run([st])
    assert st.counts == {"generator": 3, "discriminator": 3}


def test_ema_warmup_start_step_state_and_wrappers():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    ema = EMA(nn.DataParallel(m), 0.9, warmup=False, start_step=2)  # names of the unwrapped module
    assert ema.names == ["weight", "bias"] and ema.params[0] is m.weight
    for n in range(3):
        with torch.no_grad():
            m.weight.add_(1.0)
        before = ema.shadow[0].clone()
        ema.update()
        want = m.weight if n < 2 else 0.9 * before + 0.1 * m.weight  # d = 0 before start_step
        assert torch.allclose(ema.shadow[0], want.detach(), atol=1e-6)
    assert ema.current_decay(2) == 0.9 and EMA(m, 0.999).current_decay(0) == pytest.approx(0.1)
    live, avg = m.weight.detach().clone(), ema.shadow[0].clone()
    with ema.applied():
        assert torch.equal(m.weight, avg) and not torch.equal(m.weight, live)
    assert torch.equal(m.weight, live)
    other = EMA(m, 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(KeyError, match="other modules"):
        EMA(nn.Linear(3, 2, bias=False), 0.9).load_state_dict({"shadow": {"w": torch.zeros(2, 3)}})
    lora_like = nn.Linear(3, 2)
    lora_like.weight.requires_grad_(False)
    assert EMA(lora_like, 0.9, trainable_only=True).names == ["bias"]


SCRIPT = r'''
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import studio.train.loop as loop
from studio.train.loop import Trainer, TrainerConfig, TrainingCancelled
from test_train_accelerate import GenStage

rank = int(os.environ["RANK"])
saves = []
_save = loop.save_checkpoint
loop.save_checkpoint = lambda path, state: (saves.append(str(path)), _save(path, state))[1]
previews = []
class Stage(GenStage):
    def preview(self):
        previews.append(1)
        return torch.zeros(4, 4, 3)

out = {tmp!r}
def cfg(d):
    return TrainerConfig(out_dir=os.path.join(out, d), progress=False, checkpoint_every=4, preview_every=5,
                         accelerate="auto", grad_accum=2, max_grad_norm=5.0)

nan = {{2}} if rank == 1 else ()  # a non-finite loss on rank 1 only: both ranks must skip step 2
a = Stage(steps=10, batch=4, gen_every=3, nan_steps=nan)
Trainer(cfg("a")).run([a])
b = Stage(steps=10, batch=4, gen_every=3, nan_steps=nan)
try:
    Trainer(cfg("b"), callbacks=[lambda rec: rec["step"] < 6]).run([b])
    raise SystemExit("not cancelled")
except TrainingCancelled:
    pass
b2 = Stage(steps=10, batch=4, gen_every=3, nan_steps=nan)
Trainer(cfg("b")).run([b2], resume=True)
res = dict(rank=rank, a=a.weights().tolist(), b=b2.weights().tolist(), rand_a=a.rand_log,
           rand_b=b.rand_log + b2.rand_log, counts=a.counts, ema=a.ema.num_updates, saves=len(saves),
           previews=len(previews), cancelled_at=b.calls, exit_hook=loop._GROUP_EXIT_HOOK)
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump(res, f)
'''


def test_two_processes_with_accelerate(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU + gloo
    with socket.socket() as sock:  # a free port, not the default 29500 another run may hold
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # `accelerate launch --cpu --num_processes 2` starts ONE process on a single machine (multi-CPU runs need
    # mpirun); the torchrun-based launcher starts two, and the Trainer joins them over gloo (no CUDA here).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    # Both ranks end with identical weights (DDP-averaged gradients, the same optimizer steps and EMA).
    assert r0["a"] == r1["a"] and r0["b"] == r1["b"]
    # Each process destroys its gloo group at exit (an exit with the group up can abort: SIGABRT, seen in CI).
    assert r0["exit_hook"] and r1["exit_hook"]
    assert r0["counts"] == r1["counts"] == {"generator": 4, "discriminator": 9} and r0["ema"] == 4
    # Ranks are seeded differently (seed + rank), and only the main process wrote checkpoints and previews.
    assert r0["rand_a"][0] != r1["rand_a"][0]
    assert r0["saves"] > 0 and r1["saves"] == 0 and r0["previews"] == 4 and r1["previews"] == 0
    # Cancelled at step 6 on rank 0 only by its callback: all ranks stopped together, then resumed to the same
    # weights and the same per-rank random draws as the uninterrupted run.
    assert r0["cancelled_at"] == r1["cancelled_at"] == 12
    for r in (r0, r1):
        assert r["rand_b"] == r["rand_a"]
    assert torch.allclose(torch.tensor(r0["b"]), torch.tensor(r0["a"]), atol=1e-6)
    # 2 processes x (2 micro-batches of 4) = 1 process x (1 batch of 16): the same samples, the same mean gradient.
    ref = GenStage(steps=10, batch=16, gen_every=3, nan_steps={2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(cfg(tmp_path / "ref", max_grad_norm=5.0)).run([ref])
    assert torch.allclose(torch.tensor(r0["a"]), ref.weights(), atol=1e-5)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    assert len(ckpt["rng_ranks"]) == 2 and "0.weight" in ckpt["stages"]["gen"]["gen"]  # no "module." prefix
