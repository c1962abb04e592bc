"""Balanced Score Distillation: every testable property of spec section 2.6 (placiddreamer_dreampolish.md)."""
import math

import pytest
import torch

from studio.distill.bsd import bsd, bsd_direction, combine, min_norm_alpha, offset_noise_like
from studio.teachers.base import ImageTeacher
from studio.teachers.schedule import NoiseSchedule


class BranchTeacher(ImageTeacher):
    """Pixel teacher returning fixed, input-independent eps per branch (picked by the embedding's first value)."""

    latent_channels, vae_scale_factor, native_resolution, is_latent = 3, 1, 8, False

    def __init__(self, eps_y: torch.Tensor, eps_neg: torch.Tensor):
        super().__init__()
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("eps_y", eps_y)
        self.register_buffer("eps_neg", eps_neg)
        self.freeze()

    def _embed_texts(self, texts):
        return torch.tensor([[0.0 if t == "" else 1.0] for t in texts])

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        is_y = embeds[:, 0].view(-1, 1, 1, 1) > 0.5
        B = x_t.shape[0] // 2 if x_t.shape[0] == 2 * self.eps_y.shape[0] else x_t.shape[0]
        y = self.eps_y[:B].repeat(x_t.shape[0] // B, 1, 1, 1)
        n = self.eps_neg[:B].repeat(x_t.shape[0] // B, 1, 1, 1)
        return self.scale * torch.where(is_y, y, n) + 0.0 * x_t

    def encode(self, images):
        return images * 2 - 1

    def decode(self, z):
        return (z + 1) / 2


def _rand_pairs(n, shape=(3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randn(n, *shape, generator=g, dtype=torch.float64)


def test_alpha_is_exact_min_norm_against_grid():  # property 1
    c, s = _rand_pairs(400)
    s[::4] = c[::4] * 0.3 + 0.01 * s[::4]  # near-parallel cases hit the clipping branches
    alpha = min_norm_alpha(c, s)
    d = combine(c, s, alpha).flatten(1).norm(dim=1)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    best = torch.stack([combine(c, s, torch.full((len(c),), float(a), dtype=torch.float64)).flatten(1).norm(dim=1)
                        for a in grid]).min(0).values
    assert bool((d <= best + 1e-6).all())


def test_common_descent_and_interior_equality():  # property 2
    c, s = _rand_pairs(300, seed=1)
    alpha = min_norm_alpha(c, s)
    d = combine(c, s, alpha).flatten(1)
    dd = (d * d).sum(1)
    dc, ds = (d * c.flatten(1)).sum(1), (d * s.flatten(1)).sum(1)
    assert bool((dc >= dd - 1e-9).all()) and bool((ds >= dd - 1e-9).all())
    inner = (alpha > 1e-6) & (alpha < 1 - 1e-6)
    assert inner.sum() > 50
    torch.testing.assert_close(dc[inner], dd[inner], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ds[inner], dd[inner], rtol=1e-9, atol=1e-9)


def test_clipping_cases():  # property 3
    c = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    s = 2.0 * c + 0.1 * torch.randn_like(c)  # <s, c> >= ||c||^2 -> alpha = 1, G ~ c
    assert float((s * c).sum()) >= float((c * c).sum())
    assert float(min_norm_alpha(c, s)) == 1.0
    s2 = 0.3 * c  # <s, c> >= ||s||^2 -> alpha = 0, G ~ s
    assert float(min_norm_alpha(c, s2)) == 0.0
    torch.testing.assert_close(combine(c, s2, min_norm_alpha(c, s2)), s2)


def test_scale_invariance():  # property 4
    c, s = _rand_pairs(50, seed=2)
    a = min_norm_alpha(c, s)
    for k in (0.01, 3.0, 1e4):
        torch.testing.assert_close(min_norm_alpha(k * c, k * s), a)
        torch.testing.assert_close(combine(k * c, k * s, a), k * combine(c, s, a))


def test_degenerate_c_equals_s_is_defined_and_nonzero():  # property 5
    c = torch.randn(2, 3, 4, 4)
    alpha = min_norm_alpha(c, c.clone())
    assert torch.equal(alpha, torch.full((2,), 0.5))
    eps = torch.randn(2, 3, 4, 4)
    abar = torch.tensor([0.5, 0.2])
    # standard form with lam (eps_y - eps_neg) == eps_neg: pick eps_y accordingly
    lam = 4.0
    eps_neg = eps
    eps_y = eps_neg + eps_neg / lam
    g, a = bsd_direction(eps_y, eps_neg, torch.zeros_like(eps), abar, lam=lam)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    torch.testing.assert_close(g, abar.sqrt().view(-1, 1, 1, 1) * eps_neg, rtol=1e-5, atol=1e-6)


def test_auto_form_with_frozen_alpha_is_scaled_sds():  # property 6
    g = torch.Generator().manual_seed(3)
    eps_y, eps_neg, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lam = 1.0
    for alpha in (0.5, 0.2, 0.8):
        c = lam * (eps_y - eps_neg)
        s = eps_neg - eps
        got = combine(c, s, torch.tensor(alpha, dtype=torch.float64))
        omega = alpha * lam / (1 - alpha)
        sds_dir = (eps_neg + omega * (eps_y - eps_neg)) - eps
        torch.testing.assert_close(got, (1 - alpha) * sds_dir)
    # lam = 1, alpha = 1/2 -> half of (eps_y - eps)
    torch.testing.assert_close(combine(eps_y - eps_neg, eps_neg - eps, torch.tensor(0.5, dtype=torch.float64)),
                               0.5 * (eps_y - eps))


def test_standard_minus_auto_with_frozen_alpha_has_zero_mean():  # property 7
    """bsd() in the standard form on a stub teacher that ignores its input: its alpha depends on the teacher's
    branches only (frozen across noise draws), and G_standard - G_auto(same alpha, same w) = (1 - alpha) w eps
    for every draw, whose Monte-Carlo mean is zero."""
    g = torch.Generator().manual_seed(4)
    eps_y = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    eps_neg = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    teacher = BranchTeacher(eps_y, eps_neg).double()
    cond = teacher.encode_prompt(["a red cube"], negative="")
    cond.embeds, cond.negative_embeds = cond.embeds.double(), cond.negative_embeds.double()
    lam, t = 2.0, torch.tensor([300])
    w = float(teacher.schedule.alpha_cumprod(t, eps_y).reshape(-1)[0].sqrt())
    c = lam * (eps_y - eps_neg)
    diffs, alphas = [], []
    for _ in range(2000):
        eps = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
        z = torch.zeros(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        out = bsd(teacher, z, cond, t, lam=lam, form="standard", noise=eps)
        alpha = out.alpha.reshape(-1, 1, 1, 1)
        auto_same_alpha = w * combine(c, eps_neg - eps, alpha)
        diff = out.grad - auto_same_alpha
        torch.testing.assert_close(diff, (1 - alpha) * w * eps, rtol=1e-9, atol=1e-12)
        diffs.append(diff)
        alphas.append(float(alpha))
    assert max(alphas) - min(alphas) < 1e-12 and 0.0 < alphas[0] < 1.0  # frozen, interior
    mean = torch.stack(diffs).mean(0)
    assert float(mean.abs().max()) < 5 * (1 - alphas[0]) * w / math.sqrt(len(diffs))
    assert teacher.scale.grad is None


def test_bsd_injects_exact_gradient_and_teacher_gets_none():  # property 8
    g = torch.Generator().manual_seed(5)
    eps_y, eps_neg = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    teacher = BranchTeacher(eps_y, eps_neg)
    teacher.scale.requires_grad_(True)  # even a trainable-looking parameter must not receive a grad
    z = torch.randn(2, 3, 8, 8, requires_grad=True)
    cond = teacher.encode_prompt(["a red cube"], negative="")
    t = torch.tensor([100, 700])
    for form in ("standard", "auto"):
        z.grad = None
        out = bsd(teacher, z, cond, t, lam=7.0, form=form, scale=0.1, generator=g)
        out.loss.backward()
        torch.testing.assert_close(z.grad, out.grad)
        assert teacher.scale.grad is None
        abar = teacher.schedule.alpha_cumprod(t, z).reshape(-1)
        ref, _ = bsd_direction(eps_y, eps_neg, out.noise, abar, lam=7.0, form=form)
        torch.testing.assert_close(out.grad, 0.1 * ref)
        assert out.alpha.shape == (2,)


def test_global_alpha_mode_and_bad_arguments():
    g = torch.Generator().manual_seed(6)
    eps_y, eps_neg = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    gd, a = bsd_direction(eps_y, eps_neg, torch.zeros_like(eps_y), torch.full((3,), 0.5), per_sample=False)
    assert a.dim() == 0
    with pytest.raises(ValueError, match="form"):
        bsd_direction(eps_y, eps_neg, eps_y, torch.ones(3), form="nope")
    with pytest.raises(ValueError, match="lambda"):
        bsd_direction(eps_y, eps_neg, eps_y, torch.ones(3), lam=0.0)


def test_weight_is_monotone():  # property 9 (the t_max and camera schedules: test_gaussian_stage_options.py)
    sched = NoiseSchedule.ddpm_scaled_linear()
    w = sched.alpha_cumprod(torch.arange(1000)).sqrt().reshape(-1)
    assert bool((w[1:] < w[:-1]).all())


def test_offset_noise_is_per_channel_shared_and_off_by_default():
    z = torch.zeros(4, 3, 16, 16)
    plain = offset_noise_like(z, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    off = offset_noise_like(z, 0.1, torch.Generator().manual_seed(0))
    shift = off - plain
    # shift = (plain + s) - plain: s up to the rounding of one float32 addition, <= 1 ulp of |off| (2 allowed)
    assert torch.allclose(shift, shift[:1, :, :1, :1].expand_as(shift), rtol=0,
                          atol=2 * torch.finfo(torch.float32).eps * float(off.abs().max()))
    assert float(shift.abs().max()) > 0
