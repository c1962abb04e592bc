import itertools

import pytest
import torch

from studio.teachers.schedule import PREDICTION_TYPES, NoiseSchedule, canonical_prediction_type


def _schedules():
    return {
        "sd_eps": NoiseSchedule.ddpm_scaled_linear(),
        "sd_v": NoiseSchedule.ddpm_scaled_linear(prediction_type="v_prediction"),
        "cosine": NoiseSchedule.cosine(),
        "linear_zsnr": NoiseSchedule.ddpm_linear(zero_terminal_snr=True, prediction_type="v_prediction"),
        "flow3": NoiseSchedule.flow(shift=3.0),
    }


@pytest.mark.parametrize("name", list(_schedules()))
def test_conversion_round_trips_every_pair(name):
    s = _schedules()[name]
    g = torch.Generator().manual_seed(1)
    B = 6
    x_t = torch.randn(B, 4, 5, 5, generator=g, dtype=torch.float64)
    pred = torch.randn(B, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 900, 998])
    for src, dst in itertools.permutations(PREDICTION_TYPES, 2):
        there = s.convert(pred, x_t, t, src, dst)
        back = s.convert(there, x_t, t, dst, src)
        assert torch.isfinite(there).all()
        torch.testing.assert_close(back, pred, rtol=1e-6, atol=1e-6, msg=f"{src}->{dst}->{src}")
    # identity and aliases
    assert s.convert(pred, x_t, t, "eps", "epsilon") is pred
    torch.testing.assert_close(s.convert(pred, x_t, t, "x0", "v"), s.convert(pred, x_t, t, "sample", "v_prediction"))


@pytest.mark.parametrize("name", list(_schedules()))
def test_add_noise_consistent_with_convert(name):
    s = _schedules()[name]
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 400, 700, 990])
    x_t = s.add_noise(x0, eps, t)
    for kind in PREDICTION_TYPES:
        tgt = s.target(x0, eps, t, kind)
        torch.testing.assert_close(s.convert(tgt, x_t, t, kind, "epsilon"), eps, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.convert(tgt, x_t, t, kind, "sample"), x0, rtol=1e-6, atol=1e-5)
    # flow velocity is eps - x0; x_t is a straight line in s for the flow schedule
    torch.testing.assert_close(s.target(x0, eps, t, "flow"), eps - x0)


def test_matches_diffusers_ddpm_add_noise_and_velocity():
    from diffusers import DDPMScheduler

    for kw in (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
               dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2")):
        sched = DDPMScheduler(num_train_timesteps=1000, **kw)
        s = NoiseSchedule.from_diffusers(sched)
        torch.testing.assert_close(s.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-6)
        g = torch.Generator().manual_seed(3)
        x0 = torch.randn(4, 4, 8, 8, generator=g)
        eps = torch.randn(4, 4, 8, 8, generator=g)
        t = torch.tensor([0, 10, 500, 999])
        # diffusers works in float32 from a float32 cumprod of up to 1000 factors (its rounding grows like
        # sqrt(1000) ~ 32 ulps), ours in float64: 64 ulps of the terms' magnitude
        tol = dict(rtol=0, atol=64 * torch.finfo(torch.float32).eps * float(x0.abs().max() + eps.abs().max()))
        torch.testing.assert_close(s.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), **tol)
        torch.testing.assert_close(s.velocity(x0, eps, t), sched.get_velocity(x0, eps, t), **tol)
        torch.testing.assert_close(s.target(x0, eps, t, "v_prediction"), sched.get_velocity(x0, eps, t), **tol)
    # the named constructors agree with the configs they stand for
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(NoiseSchedule.ddpm_scaled_linear().alphas_cumprod.float(), sd.alphas_cumprod)
    torch.testing.assert_close(NoiseSchedule.cosine().alphas_cumprod.float(),
                               DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod)


def test_from_diffusers_reads_prediction_type_and_config_dicts():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    s = NoiseSchedule.from_diffusers(DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear"))
    assert s.prediction_type == "v_prediction"
    s = NoiseSchedule.from_diffusers(dict(PNDMScheduler(beta_schedule="scaled_linear").config))
    assert s.prediction_type == "epsilon" and s.num_train_timesteps == 1000
    e = EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="sample")
    s = NoiseSchedule.from_diffusers(e)
    assert s.prediction_type == "sample"
    torch.testing.assert_close(s.alphas_cumprod.float(), e.alphas_cumprod)


def test_zero_terminal_snr_is_finite():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
               prediction_type="v_prediction")
    ddim = DDIMScheduler(**cfg)
    euler = EulerDiscreteScheduler(**cfg)
    s = NoiseSchedule.from_diffusers(ddim)
    assert s.zero_terminal_snr and s.prediction_type == "v_prediction"
    torch.testing.assert_close(s.alphas_cumprod[:-1].float(), ddim.alphas_cumprod[:-1], rtol=1e-4, atol=1e-7)
    # the last step is floored like diffusers' Euler scheduler does
    assert s.alphas_cumprod[-1].item() == pytest.approx(euler.alphas_cumprod[-1].item())
    assert s.alphas_cumprod[0].item() == pytest.approx(ddim.alphas_cumprod[0].item(), rel=1e-6)
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 4, 4, 4, generator=g)
    pred = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([999, 999])
    assert torch.isfinite(s.snr(t)).all() and (s.snr(t) < 1e-6).all()
    assert torch.isfinite(s.log_snr(t)).all()
    for src, dst in itertools.permutations(PREDICTION_TYPES, 2):
        assert torch.isfinite(s.convert(pred, x_t, t, src, dst)).all(), (src, dst)
    # at SNR ~ 0, v-prediction gives x0 ~ -v and eps ~ x_t: x0 = a x_t - sg v, eps = sg x_t + a v differ from -v
    # and x_t by up to (a + 1 - sg) m, m = max(|x_t|, |v|) (reached where |x_t| is largest); "~" allows twice that
    # (the float32 rounding, a few ulps of m, is ~1000x smaller)
    a, sg = float(s.alpha(t).max()), float(s.sigma(t).min())
    near = 2 * (a + 1 - sg) * float(torch.maximum(x_t.abs().max(), pred.abs().max()))
    torch.testing.assert_close(s.convert(pred, x_t, t, "v_prediction", "sample"), -pred, rtol=0, atol=near)
    torch.testing.assert_close(s.convert(pred, x_t, t, "v_prediction", "epsilon"), x_t, rtol=0, atol=near)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_matches_flow_match_euler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s = NoiseSchedule.from_diffusers(sched)
    assert s.prediction_type == "flow" and s.is_flow and s.shift == shift
    t = torch.arange(1000)
    torch.testing.assert_close(s.sigma(t).float(), sched.sigmas.flip(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.alpha(t) + s.sigma(t), torch.ones(1000, dtype=torch.float32))
    torch.testing.assert_close(s.model_timestep(t), sched.timesteps.flip(0), rtol=1e-5, atol=1e-3)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    eps = torch.randn(3, 4, 4, 4, generator=g)
    ti = torch.tensor([0, 400, 999])
    ref = sched.scale_noise(x0, sched.timesteps.flip(0)[ti], eps)
    torch.testing.assert_close(s.add_noise(x0, eps, ti), ref, rtol=1e-5, atol=1e-5)
    # float timesteps evaluate the shifted path analytically
    assert s.sigma(torch.tensor([499.0])).item() == pytest.approx(s.sigma(torch.tensor([499])).item(), rel=1e-6)


def test_shapes_broadcasting_and_dtypes():
    s = NoiseSchedule.ddpm_scaled_linear()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 2, 3])
    assert s.alpha(t).shape == (3,)
    assert s.alpha(t, x).shape == (3, 1, 1, 1) and s.alpha(t, x).dtype == torch.float32
    video = torch.randn(3, 4, 5, 8, 8, dtype=torch.float64)
    assert s.sigma(t, video).shape == (3, 1, 1, 1, 1) and s.sigma(t, video).dtype == torch.float64
    assert s.add_noise(x, x, 7).shape == x.shape  # a scalar timestep broadcasts
    half = x.half()
    assert s.convert(half, half, t, "epsilon", "sample").dtype == torch.float16
    a2 = s.alpha(t) ** 2 + s.sigma(t) ** 2
    torch.testing.assert_close(a2, torch.ones(3))
    torch.testing.assert_close(s.snr(t), s.alpha(t) ** 2 / s.sigma(t) ** 2)
    torch.testing.assert_close(s.weight(t, "sds"), 1 - s.alpha_cumprod(t))
    torch.testing.assert_close(s.weight(t, "uniform"), torch.ones(3))
    # float timesteps interpolate the table
    assert s.alpha(torch.tensor([10.0])).item() == pytest.approx(s.alpha(torch.tensor([10])).item())
    mid = s.alpha(torch.tensor([10.5])).item()
    assert s.alpha(11).item() < mid < s.alpha(10).item()
    with pytest.raises(ValueError):
        s.alpha(torch.tensor([1000]))
    with pytest.raises(ValueError):
        s.add_noise(x, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        canonical_prediction_type("bogus")


def test_timestep_sampling_and_continuous_mapping():
    s = NoiseSchedule.ddpm_scaled_linear()
    t = s.sample_timesteps(4000, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min().item() == 20 and t.max().item() == 980
    assert s.timestep_range(0.02, 0.98) == (20, 980)
    t1 = s.sample_timesteps(8, 0.2, 0.5, generator=torch.Generator().manual_seed(7))
    t2 = s.sample_timesteps(8, 0.2, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t1, t2) and ((t1 >= 200) & (t1 <= 500)).all()
    assert s.sample_timesteps(3, 1.0, 1.0).tolist() == [999, 999, 999]
    with pytest.raises(ValueError):
        s.sample_timesteps(2, 0.6, 0.5)
    ints = torch.arange(1000)
    u = s.to_continuous(ints)
    assert u.min().item() == 0.0 and u.max().item() < 1.0
    assert torch.equal(s.from_continuous(u), ints)
    assert s.from_continuous(torch.tensor([0.02, 0.98, 1.0])).tolist() == [20, 980, 999]
