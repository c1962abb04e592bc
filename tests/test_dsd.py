"""Domain Score Distillation: the properties of spec section 3.6 (placiddreamer_dreampolish.md)."""
import math

import pytest
import torch

from studio.cameras import orbit_cameras
from studio.distill.dsd import dsd, dsd_preset
from studio.distill.sds import sds
from studio.distill.vsd import c2w_from_cameras, vsd
from studio.students.lora_score import LoRAScore
from studio.teachers.base import ImageTeacher
from studio.teachers.registry import load_teacher
from studio.teachers.schedule import NoiseSchedule
from tiny_models import make_tiny_sd


class PointMassTeacher(ImageTeacher):
    """Exact denoiser of a point mass at mu_y (prompt) / mu_null (empty prompt): eps = (z_t - a mu) / s."""

    latent_channels, vae_scale_factor, native_resolution, is_latent = 3, 1, 4, False

    def __init__(self, mu_y, mu_null):
        super().__init__()
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.register_buffer("mu_y", mu_y)
        self.register_buffer("mu_null", mu_null)
        self.calls = 0
        self.freeze()

    def _embed_texts(self, texts):
        return torch.tensor([[0.0 if t == "" else 1.0] for t in texts])

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        self.calls += 1
        mu = torch.where(embeds[:, :1, None, None] > 0.5, self.mu_y, self.mu_null)
        return (x_t - self.schedule.alpha(t, x_t) * mu) / self.schedule.sigma(t, x_t)

    def encode(self, images):
        return images * 2 - 1

    def decode(self, z):
        return (z + 1) / 2


class CentredLoRA:
    """A stub variational score: the exact denoiser of a point mass at ``centre`` (the current student)."""

    def __init__(self, schedule, centre):
        self.schedule, self.centre, self.calls = schedule, centre, 0

    def predict_eps(self, x_t, t, embeds, camera_c2w=None, guidance_scale=1.0):
        self.calls += 1
        return (x_t - self.schedule.alpha(t, x_t) * self.centre) / self.schedule.sigma(t, x_t)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    teacher = load_teacher(str(make_tiny_sd(tmp_path_factory.mktemp("dsd") / "sd", sample_size=16)))
    lora = LoRAScore(teacher, rank=4, camera_condition=True, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking (non-zero) LoRA
        for p in lora.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return teacher, lora


def _inputs(teacher, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, teacher.latent_channels, 16, 16, generator=g)
    noise = torch.randn(z.shape, generator=g)
    cond = teacher.encode_prompt(["a red cube"] * B, negative="")
    t = torch.tensor([300, 800][:B])
    c2w = c2w_from_cameras(orbit_cameras(torch.zeros(B), torch.linspace(0, 90, B), 3.2, 40.0, 32, 32))
    return z, noise, cond, t, c2w


@pytest.mark.parametrize("s", [1.0, 7.5, 100.0])
def test_presets_equal_sds_vsd_and_csd(tiny, s):  # property 1
    teacher, lora = tiny
    z, noise, cond, t, c2w = _inputs(teacher)
    ref = sds(teacher, z, cond, t, guidance_scale=s, noise=noise).grad
    got = dsd(teacher, z, cond, t, **dict(zip(("lam_base", "lam_cfg", "lam_var"), dsd_preset("sds", s))),
              noise=noise).grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    ref_v = vsd(teacher, lora, z, cond, t, guidance_scale=s, camera_c2w=c2w, noise=noise).grad
    b, c, v = dsd_preset("vsd", s)
    got_v = dsd(teacher, z, cond, t, lam_base=b, lam_cfg=c, lam_var=v, lora_score=lora, camera_c2w=c2w,
                noise=noise).grad
    torch.testing.assert_close(got_v, ref_v, rtol=1e-5, atol=1e-5 * float(ref_v.abs().max()))
    with torch.no_grad():
        zt = teacher.schedule.add_noise(z, noise, t)
        e0, ey = teacher.predict_branches(zt, t, cond)
    csd = teacher.schedule.weight(t, "sds", z) * s * (ey - e0)
    got_c = dsd(teacher, z, cond, t, **dict(zip(("lam_base", "lam_cfg", "lam_var"), dsd_preset("csd", s))),
                noise=noise).grad
    torch.testing.assert_close(got_c, csd, rtol=1e-5, atol=1e-6)


def test_lam_var_zero_skips_the_lora_and_lam_cfg_zero_ignores_null():  # properties 2, 3
    mu_y, mu_null = torch.ones(1, 3, 4, 4) * 0.5, -torch.ones(1, 3, 4, 4)
    teacher = PointMassTeacher(mu_y, mu_null)
    lora = CentredLoRA(teacher.schedule, torch.zeros(1, 3, 4, 4))
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    noise, t = torch.randn(1, 3, 4, 4), torch.tensor([400])
    cond = teacher.encode_prompt(["a"], negative="")
    g1 = dsd(teacher, z, cond, t, lam_base=1.0, lam_cfg=2.0, lam_var=0.0, lora_score=lora, noise=noise).grad
    assert lora.calls == 0
    # lam_cfg = lam_base = 0: perturbing the null mode leaves G unchanged
    a = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=0.0, lam_var=1.0, lora_score=lora, noise=noise).grad
    teacher.mu_null.mul_(5).add_(3)
    b = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=0.0, lam_var=1.0, lora_score=lora, noise=noise).grad
    torch.testing.assert_close(a, b)
    assert torch.isfinite(g1).all()


def test_fixed_point_zero_lora_makes_dsd_equal_csd(tiny):  # property 4
    teacher, _ = tiny
    fresh = LoRAScore(teacher, rank=4, camera_condition=True, seed=0)  # zero-initialised B: phi == teacher
    z, noise, cond, t, c2w = _inputs(teacher, seed=3)
    got = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=4.0, lam_var=1.0, lora_score=fresh, camera_c2w=c2w,
              noise=noise).grad
    ref = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=4.0, lam_var=0.0, noise=noise).grad
    # Exact in real arithmetic; in float32 the LoRA branch evaluates the same UNet in another batch (another
    # summation order): measured <= 25 ulps of max|G| across CPU capabilities, 256 ulps allowed.
    torch.testing.assert_close(got, ref, rtol=0, atol=256 * torch.finfo(torch.float32).eps * float(ref.abs().max()))


def test_signs_with_an_analytic_teacher():  # property 5
    g = torch.Generator().manual_seed(0)
    mu_y, mu_null = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    teacher = PointMassTeacher(mu_y, mu_null)
    z0 = torch.randn(1, 3, 4, 4, generator=g)
    t = torch.tensor([500])
    cond = teacher.encode_prompt(["a"], negative="")

    def step(**lams):
        z = z0.clone().requires_grad_(True)
        out = dsd(teacher, z, cond, t, noise=torch.randn(1, 3, 4, 4, generator=g), **lams)
        return -out.grad  # descent direction

    d = step(lam_base=1.0, lam_cfg=0.0, lam_var=0.0)  # SDS residual: toward mu_y
    assert float((d * (mu_y - z0)).sum()) > 0
    torch.testing.assert_close(d, -teacher.schedule.weight(t, "sds", z0) * math.sqrt(
        float(teacher.schedule.alpha_cumprod(t))) * (z0 - mu_y) / math.sqrt(1 - float(teacher.schedule.alpha_cumprod(t))),
        rtol=1e-4, atol=1e-5)
    d = step(lam_base=0.0, lam_cfg=1.0, lam_var=0.0)  # CFG term: along mu_y - mu_null
    assert float((d * (mu_y - mu_null)).sum()) > 0
    lora = CentredLoRA(teacher.schedule, z0)
    d = step(lam_base=0.0, lam_cfg=0.0, lam_var=1.0, lora_score=lora)  # variational term: toward mu_y
    assert float((d * (mu_y - z0)).sum()) > 0
    agree = PointMassTeacher(mu_y, mu_y.clone())
    z = mu_y.clone().requires_grad_(True)
    out = dsd(agree, z, agree.encode_prompt(["a"], negative=""), t, lam_base=0.0, lam_cfg=3.0, lam_var=1.0,
              lora_score=CentredLoRA(agree.schedule, mu_y))
    assert float(out.grad.abs().max()) < 1e-4  # every branch agrees: G = 0


def test_lora_isolation_and_errors(tiny):  # property 6
    teacher, lora = tiny
    z, noise, cond, t, c2w = _inputs(teacher)
    z = z.requires_grad_(True)
    out = dsd(teacher, z, cond, t, lora_score=lora, camera_c2w=c2w, noise=noise)
    out.loss.backward()
    assert all(p.grad is None for p in lora.trainable_parameters())
    assert all(p.grad is None for p in teacher.parameters())
    z.grad = None
    lora.lora_loss(z, teacher.encode_prompt(["a red cube"]).embeds, c2w).backward()
    assert z.grad is None
    with pytest.raises(ValueError, match="lora_score"):
        dsd(teacher, z, cond, t, lam_var=1.0)
    with pytest.raises(ValueError, match="preset"):
        dsd_preset("nope", 1.0)


def _span_residual(target, basis):
    """Relative least-squares residual of ``target`` in the span of ``basis`` (flattened tensors)."""
    A = torch.stack([b.reshape(-1).double() for b in basis], 1)
    y = target.reshape(-1).double()
    coef = torch.linalg.lstsq(A, y[:, None]).solution
    return float((A @ coef - y[:, None]).norm() / y.norm())


def test_default_dsd_differs_from_vsd_at_every_cfg(tiny):
    """DSD's default is not VSD at any CFG s, nor any rescaling k VSD(s): over the diffusion times a run visits
    (one batch spanning t = 50 ... 950), G_vsd(s) = w (eps_y - eps_lora) + (s - 1) w (eps_y - eps_null) spans a
    2-d space {a A + b C} as (k, s) vary; the default schedules leave it. The constant form (0, 6.5, 1) lies in
    it (residual ~ 0): the check can fail."""
    teacher, lora = tiny
    B = 6
    g = torch.Generator().manual_seed(5)
    z = torch.randn(B, teacher.latent_channels, 16, 16, generator=g)
    noise = torch.randn(z.shape, generator=g)
    cond = teacher.encode_prompt(["a red cube"] * B, negative="")
    t = torch.linspace(50, 950, B).round().long()
    c2w = c2w_from_cameras(orbit_cameras(torch.zeros(B), torch.linspace(0, 300, B), 3.2, 40.0, 32, 32))
    kw = dict(lora_score=lora, camera_c2w=c2w, noise=noise)
    A = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=0.0, lam_var=1.0, **kw).grad   # w (eps_y - eps_lora)
    C = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=1.0, lam_var=0.0, **kw).grad   # w (eps_y - eps_null)
    for s in (1.5, 4.0, 7.5, 20.0):  # the basis does give VSD(s) exactly
        v = vsd(teacher, lora, z, cond, t, guidance_scale=s, camera_c2w=c2w, noise=noise).grad
        assert _span_residual(v, [A, C]) < 1e-5
    default = dsd(teacher, z, cond, t, **kw).grad  # the default schedules
    assert _span_residual(default, [A, C]) > 0.05  # measured 0.24
    for s in (2.0, 4.0, 7.5, 20.0):  # every swept preset too
        b, c, v = dsd_preset("dsd", s)
        assert _span_residual(dsd(teacher, z, cond, t, lam_base=b, lam_cfg=c, lam_var=v, **kw).grad, [A, C]) > 0.05
    constant = dsd(teacher, z, cond, t, lam_base=0.0, lam_cfg=6.5, lam_var=1.0, **kw).grad
    assert _span_residual(constant, [A, C]) < 1e-5


def test_schedules_pairs_callables_and_the_constant_form(tiny):
    from studio.distill.dsd import DSD_LAM_CFG, DSD_LAM_VAR, schedule_is_zero, schedule_value

    teacher, lora = tiny
    like = torch.zeros(3, 4, 2, 2)
    T = teacher.schedule.num_train_timesteps
    v = schedule_value((2.0, 10.0), torch.tensor([0, T // 2, T]), T, like)
    assert v.shape == (3, 1, 1, 1)
    torch.testing.assert_close(v.reshape(-1), torch.tensor([2.0, 6.0, 10.0]))
    v = schedule_value(lambda u: 1 + u * u, torch.tensor([0, T // 2, T]), T, like)
    torch.testing.assert_close(v.reshape(-1), torch.tensor([1.0, 1.25, 2.0]))
    assert schedule_value(3.0, torch.tensor([5]), T, like) == 3.0
    assert schedule_is_zero(0.0) and schedule_is_zero((0.0, 0.0)) and not schedule_is_zero((0.0, 1.0))
    # a pair with equal ends is the constant; per-sample t picks per-sample weights
    z, noise, cond, t, c2w = _inputs(teacher)
    a = dsd(teacher, z, cond, t, lam_cfg=(3.0, 3.0), lam_var=(1.0, 1.0), lora_score=lora, camera_c2w=c2w, noise=noise)
    b = dsd(teacher, z, cond, t, lam_cfg=3.0, lam_var=1.0, lora_score=lora, camera_c2w=c2w, noise=noise)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7 * float(b.grad.abs().max()))
    assert DSD_LAM_CFG[0] != DSD_LAM_CFG[1] and DSD_LAM_VAR[0] != DSD_LAM_VAR[1]
    with pytest.raises(ValueError, match="lam_cfg must be"):
        dsd(teacher, z, cond, t, lam_cfg=(1.0, 2.0, 3.0), lam_var=0.0, noise=noise)
    with pytest.raises(ValueError, match="lora_score"):
        dsd(teacher, z, cond, t, lam_var=(0.0, 1.0), noise=noise)
