"""Score-distillation building blocks: gradient injection, SDS, timestep schedules."""
import pytest
import torch

from studio.distill.inject import inject_gradient
from studio.distill.sds import sds
from studio.distill.timesteps import TimestepSampler
from studio.teachers.base import ImageTeacher
from studio.teachers.schedule import NoiseSchedule


class StubTeacher(ImageTeacher):
    """Pixel-space teacher whose epsilon is a fixed tensor plus a trainable-looking parameter."""

    latent_channels, vae_scale_factor, native_resolution, is_latent = 3, 1, 8, False

    def __init__(self, eps_value: float = 0.3):
        super().__init__()
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.w = torch.nn.Parameter(torch.tensor(eps_value))
        self.freeze()

    def _embed_texts(self, texts):
        return torch.ones(len(texts), 2)

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        # cond branch (embeds all ones) -> w; uncond ("" -> ones too) -> w; differs by prompt length below
        return self.w * torch.ones_like(x_t) + 0.0 * x_t

    def encode(self, images):
        return images * 2 - 1

    def decode(self, z):
        return (z + 1) / 2


def test_inject_gradient_is_exact():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    G = torch.randn(2, 3, 4, 4)
    loss = inject_gradient(z, G)
    loss.backward()
    assert torch.allclose(z.grad, G, atol=1e-6)
    assert loss.item() == pytest.approx(0.5 * G.pow(2).sum().item(), rel=1e-5)
    z.grad = None
    bad = G.clone()
    bad[0, 0, 0, 0] = float("nan")
    inject_gradient(z, bad, scale=2.0).backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 0, 0, 0] == 0 and torch.allclose(z.grad[1], 2 * G[1])
    with pytest.raises(ValueError, match="shape of z"):
        inject_gradient(z, G[:1])


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_sds_gradient_formula_and_teacher_frozen(weighting):
    T = StubTeacher(0.3)
    z = torch.randn(3, 3, 8, 8, requires_grad=True)
    t = torch.tensor([100, 500, 900])
    noise = torch.randn_like(z)
    cond = T.encode_prompt(["a"])
    out = sds(T, z, cond, t, guidance_scale=1.0, weighting=weighting, noise=noise)
    abar = T.schedule.alphas_cumprod[t].float()
    w = {"sds": 1 - abar, "uniform": torch.ones(3), "fantasia3d": abar.sqrt() * (1 - abar)}[weighting]
    expect = w.view(-1, 1, 1, 1) * (0.3 - noise)
    assert torch.allclose(out.grad, expect, atol=1e-5)
    out.loss.backward()
    assert torch.allclose(z.grad, expect, atol=1e-5)
    assert T.w.grad is None and not T.w.requires_grad


def test_sds_grad_clip_and_cfg_equals_cond_when_branches_agree():
    T = StubTeacher(5.0)
    z = torch.zeros(1, 3, 8, 8, requires_grad=True)
    noise = torch.zeros_like(z)
    cond = T.encode_prompt(["a"])
    out = sds(T, z, cond, torch.tensor([999]), guidance_scale=100.0, weighting="uniform", noise=noise, grad_clip=1.0)
    # both branches predict 5 -> CFG = 5; clipped to 1
    assert torch.allclose(out.grad, torch.ones_like(z))


def test_timestep_sampler_modes():
    sched = NoiseSchedule.ddpm_scaled_linear()
    g = torch.Generator().manual_seed(0)
    u = TimestepSampler(0.02, 0.98, "uniform").sample(1000, 0.5, sched, g)
    assert u.min() >= 20 and u.max() <= 980 and u.float().std() > 200
    lin = TimestepSampler(0.02, 0.98, "linear", t_max_end=0.5)
    assert lin.sample(500, 1.0, sched, g).max() <= 500
    assert lin.sample(500, 0.0, sched, g).max() > 900
    dg = TimestepSampler(0.02, 0.98, "dreamgaussian")
    a, b = dg.sample(4, 0.1, sched, g), dg.sample(4, 0.9, sched, g)
    assert (a == a[0]).all() and a[0] > b[0]
    sq = TimestepSampler(0.02, 0.98, "sqrt")
    assert sq.sample(1, 0.25, sched, g)[0] < dg.sample(1, 0.25, sched, g)[0]  # sqrt anneals faster early
    with pytest.raises(ValueError, match="mode"):
        TimestepSampler(mode="cosine")
    with pytest.raises(ValueError, match="t_min"):
        TimestepSampler(0.9, 0.1)
