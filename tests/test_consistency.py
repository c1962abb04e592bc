"""Latent consistency distillation (studio.distill.consistency), spec 1.1 / 2.4, properties of spec 2.8.

Teachers: the exact Gaussian-data video teacher of ``test_video_samplers`` (analytic posterior mean, epsilon or
flow parameterisation), an oracle teacher that returns the very noise used for noising, and a tiny diffusers
``UNet3DConditionModel`` teacher with a :class:`VideoLoRAStudent` for the stop-gradient checks.
"""
import pytest
import torch
from test_video_lora import UNet3DTeacher, tiny_unet
from test_video_samplers import GaussVideoTeacher, eps_teacher, flow_teacher

from studio.distill.consistency import (
    alphas_cumprod_prev,
    consistency_distance,
    consistency_output,
    ddim_solver_step,
    latent_consistency_loss,
    lcm_guided_prediction,
    mixed_trajectory_x0,
    pseudo_huber,
    solver_indices,
)
from studio.errors import UserError
from studio.students.video_lora import VideoLoRAStudent
from studio.teachers.sampling import consistency_scalings
from studio.teachers.schedule import NoiseSchedule
from studio.students.ema import EMA


def _gauss_pair(schedule=None, gain=0.9):
    teacher = eps_teacher(res=8, frames=4) if schedule is None else GaussVideoTeacher(schedule, res=8, frames=4)
    student = GaussVideoTeacher(teacher.schedule, res=8, frames=4, gain=gain)
    student.gain.requires_grad_(True)
    return teacher, student


class OracleTeacher(GaussVideoTeacher):
    """Returns (for both CFG branches) the exact noise ``self.eps`` that was used to noise ``x_start``."""

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        return self.eps.repeat(x_t.shape[0] // self.eps.shape[0], 1, 1, 1, 1).to(x_t.dtype)


# ----------------------------------------------------------------------------------- property 1: boundary
def test_property1_boundary_condition_and_scalings():
    x = torch.randn(3, 4, 2, 4, 4)
    x0_hat = torch.randn_like(x) * 5
    out = consistency_output(x0_hat, x, torch.zeros(3, dtype=torch.long), timestep_scaling=4)
    assert torch.equal(out, x)  # f(x, 0) = x exactly
    c_skip, c_out = consistency_scalings(torch.arange(1000), 4.0, 0.5)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert bool((c_skip[1:] < c_skip[:-1]).all())  # strictly decreasing in t
    assert bool((c_out[1:] > c_out[:-1]).all())
    assert float(c_skip[19]) == pytest.approx(0.25 / (76 ** 2 + 0.25), rel=1e-12)
    assert float(c_skip[19]) == pytest.approx(4.3e-5, rel=0.01)
    # per-sample t broadcasts: sample i uses its own scalings
    t = torch.tensor([0, 19, 999])
    out = consistency_output(x0_hat, x, t, timestep_scaling=4)
    cs, co = consistency_scalings(t, 4.0, 0.5)
    for i in range(3):
        torch.testing.assert_close(out[i], float(cs[i]) * x[i] + float(co[i]) * x0_hat[i])


# ----------------------------------------------------------------------------------- property 2: oracle solver
def test_property2_oracle_solver_is_exact():
    sched = NoiseSchedule.ddpm_scaled_linear()
    teacher = OracleTeacher(sched, res=8, frames=4)
    _, student = _gauss_pair()
    cond = teacher.encode_prompt(["a", "b", "a", "b"])
    x0 = torch.randn(4, 3, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    teacher.eps = eps
    n = torch.tensor([0, 1, 25, 49])
    _, info = latent_consistency_loss(student.double(), teacher, x0, cond, index=n, noise=eps,
                                      zero_terminal_snr_swap=False, generator=torch.Generator().manual_seed(0))
    t_end = info["t_end"]
    torch.testing.assert_close(info["x0_teacher"], x0, atol=1e-9, rtol=0)  # x0_hat = x0 with the oracle eps
    expected = sched.add_noise(x0, eps, t_end)
    torch.testing.assert_close(info["x_end"], expected, atol=1e-9, rtol=0)
    # the same with diffusers' shifted alpha_prev table, written out by hand
    ap = alphas_cumprod_prev(sched, 50)[n].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(info["x_end"], ap.sqrt() * x0 + (1 - ap).sqrt() * eps, atol=1e-9, rtol=0)
    # a direct call of the solver step does the same on any (x0_hat, eps_hat)
    torch.testing.assert_close(ddim_solver_step(sched, x0, eps, t_end), expected)


# ----------------------------------------------------------------------------------- property 5: Huber
def test_property5_pseudo_huber_limits():
    c = 1e-3
    a = torch.randn(1000, dtype=torch.float64)
    b = torch.randn(1000, dtype=torch.float64)
    assert float(pseudo_huber(a, b, c)) > 0
    assert float(pseudo_huber(a, a, c)) == 0.0
    for d in (1e-9, 1e-7, 0.5, -3.0):  # elementwise >= 0 and zero only at d = 0
        v = pseudo_huber(torch.tensor([d], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), c)
        assert float(v) > 0
    big = torch.tensor([10.0, -7.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(big, torch.zeros(3, dtype=torch.float64), c),
                               (big.abs() - c).mean(), rtol=1e-6, atol=0)
    small = torch.tensor([1e-5, -2e-5, 3e-6], dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(small, torch.zeros(3, dtype=torch.float64), c),
                               (small ** 2 / (2 * c)).mean(), rtol=1e-3, atol=0)
    # the L2 option is the mean squared error
    y, yt = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    torch.testing.assert_close(consistency_distance(y, yt, loss="l2"), ((y - yt) ** 2).mean())
    torch.testing.assert_close(consistency_distance(y, yt, loss="huber", huber_c=c), pseudo_huber(y, yt, c))
    with pytest.raises(UserError):
        consistency_distance(y, yt, loss="l1")


# ----------------------------------------------------------------------------------- property 6: reductions
@pytest.mark.parametrize("make", [eps_teacher, flow_teacher])
def test_property6_w_zero_is_the_conditional_prediction_and_w_is_cfg_scale_w_plus_1(make):
    teacher = make(res=8, frames=4)
    cond = teacher.encode_prompt(["a", "b", "a"])
    x = torch.randn(3, 3, 4, 8, 8)
    t = torch.tensor([100, 500, 900])
    x0, eps = lcm_guided_prediction(teacher, x, t, cond, 0.0)
    torch.testing.assert_close(x0, teacher.predict(x, t, cond, 1.0, output="sample"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps, teacher.predict(x, t, cond, 1.0, output="epsilon"), atol=1e-5, rtol=1e-5)
    w = torch.tensor([0.0, 3.0, 7.5])
    x0, eps = lcm_guided_prediction(teacher, x, t, cond, w)
    for i in range(3):  # per-sample w, each = standard CFG with scale w + 1
        ref = teacher.predict(x[i:i + 1], t[i:i + 1], cond[i], float(w[i]) + 1, output="sample")
        torch.testing.assert_close(x0[i:i + 1], ref, atol=1e-5, rtol=1e-5)
    # x0 and eps are consistent with x_t
    a, s = teacher.schedule.alpha(t, x), teacher.schedule.sigma(t, x)
    torch.testing.assert_close(a * x0 + s * eps, x, atol=1e-5, rtol=1e-5)


def _reference_video_lcm(student, teacher, x0, cond, n, w, eps, lam=4.0, c=1e-3):
    """Plain video LCM written out as diffusers' train_lcm_distill script does, with its own table arithmetic."""
    abar = teacher.schedule.alphas_cumprod.to(torch.float64)
    tau = torch.arange(1, 51) * 20 - 1
    abar_prev = torch.cat([abar[:1], abar[tau[:-1]]])
    t_s = tau[n]
    t_e = (t_s - 20).clamp_min(0)

    def col(v):
        return v.reshape(-1, 1, 1, 1, 1).to(x0.dtype)

    def scal(t):
        lt = t.double() * lam
        return col(0.25 / (lt ** 2 + 0.25)), col(lt / (lt ** 2 + 0.25).sqrt())

    a_s, s_s = col(abar[t_s].sqrt()), col((1 - abar[t_s]).sqrt())
    x_s = a_s * x0 + s_s * eps
    x_s = torch.where(col(n == 49) > 0, eps, x_s)
    cs, co = scal(t_s)
    y = cs * x_s + co * student.predict(x_s, t_s, cond, output="sample")
    with torch.no_grad():
        eps_t = torch.stack([teacher.predict(x_s[i:i + 1], t_s[i:i + 1], cond[i], float(w[i]) + 1)[0]
                             for i in range(len(n))])
        x0_t = (x_s - s_s * eps_t) / a_s
        ap = col(abar_prev[n])
        x_e = ap.sqrt() * x0_t + (1 - ap).sqrt() * eps_t
        ce, coe = scal(t_e)
        y_t = ce * x_e + coe * student.predict(x_e, t_e, cond, output="sample")
    return (torch.sqrt((y - y_t) ** 2 + c * c) - c).mean(), y, y_t


def test_property6_p_mix_zero_and_no_disc_is_plain_video_lcm():
    teacher, student = _gauss_pair()
    cond = teacher.encode_prompt(["a", "b", "a"])
    x0_real = torch.randn(3, 3, 4, 8, 8)
    calls = []
    orig = student.predict
    student.predict = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    x0, used = mixed_trajectory_x0(student, cond, x0_real, p=0.0, generator=torch.Generator().manual_seed(1))
    assert not used and torch.equal(x0, x0_real) and not calls  # p = 0 never calls the student
    del student.predict
    n = torch.tensor([0, 30, 49])
    w = torch.tensor([5.0, 9.5, 15.0])
    eps = torch.randn_like(x0)
    loss, info = latent_consistency_loss(student, teacher, x0, cond, index=n, w=w, noise=eps, motion=None)
    ref, y, y_t = _reference_video_lcm(student, teacher, x0, cond, n, w, eps)
    # the reference is the same float32 math in another order: 64 ulps of the magnitude, times |w| + |1 - w|
    # for the target, whose CFG (w up to 15) combines two teacher branches
    f32u = 64 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(info["y"], y, rtol=0, atol=f32u * float(y.detach().abs().max()))
    torch.testing.assert_close(info["y_target"], y_t, rtol=0,
                               atol=f32u * float(2 * w.max() - 1) * float(y_t.detach().abs().max()))
    torch.testing.assert_close(loss, ref, atol=1e-7, rtol=1e-4)
    g1 = torch.autograd.grad(loss, student.gain)[0]
    g2 = torch.autograd.grad(ref, student.gain)[0]
    torch.testing.assert_close(g1, g2, atol=1e-7, rtol=1e-4)


# ----------------------------------------------------------------------------------- property 7: stop-grads
@pytest.fixture(scope="module")
def lora():
    teacher = UNet3DTeacher(tiny_unet(3))
    student = VideoLoRAStudent(teacher, rank=2, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the LoRA off zero so that the student differs from the teacher
        for p in student.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    cond = teacher.encode_prompt(["a red ball", "a blue cube"])
    return teacher, student, cond


def test_property7_stop_grads_lora_target_and_teacher_branches(lora):
    teacher, student, cond = lora
    x0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    params = student.trainable_parameters()
    loss, info = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(3),
                                         index=[10, 49])
    assert info["y"].requires_grad
    for k in ("y_target", "x_end", "x_start", "x0_teacher", "eps_teacher", "x0"):
        assert not info[k].requires_grad, k
    assert torch.equal(info["x_start"][1], info["noise"][1])  # n = N-1: the zero-terminal-SNR hard swap
    assert not torch.equal(info["x_start"][0], info["noise"][0])
    grads = torch.autograd.grad(loss, params)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in teacher.denoiser.parameters() if not p.requires_grad)
    # the gradient comes only through y: recompute y alone with y_target as a constant -> same gradient
    y = consistency_output(student.predict(info["x_start"], info["t_start"], cond, output="sample"),
                           info["x_start"], info["t_start"], 4.0)
    grads_y = torch.autograd.grad(pseudo_huber(y, info["y_target"], 1e-3), params)
    for g, gy in zip(grads, grads_y):
        torch.testing.assert_close(g, gy, atol=1e-7, rtol=1e-5)
    # the teacher branches ran with the adapter off, the target with it on
    with torch.no_grad():
        x0_t, _ = lcm_guided_prediction(teacher, info["x_start"], info["t_start"], cond, info["w"])
        with student.adapter_enabled(True):
            x0_s, _ = lcm_guided_prediction(teacher, info["x_start"], info["t_start"], cond, info["w"])
        x0_tgt = student.predict(info["x_end"], info["t_end"], cond, output="sample")
    torch.testing.assert_close(info["x0_teacher"], x0_t, atol=1e-5, rtol=1e-5)
    assert (x0_s - x0_t).abs().max() > 1e-3  # the check above can tell the two apart
    torch.testing.assert_close(info["y_target"], consistency_output(x0_tgt, info["x_end"], info["t_end"], 4.0),
                               atol=1e-5, rtol=1e-5)
    # the mixed-trajectory x0 is a no-grad student sample from pure noise at tau_{N-1} = 999
    g = torch.Generator().manual_seed(9)
    x0_mix, used = mixed_trajectory_x0(student, cond, x0, p=1.0, generator=g)
    assert used and not x0_mix.requires_grad
    g = torch.Generator().manual_seed(9)
    torch.rand((), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        ref = student.predict(eps, torch.tensor([999, 999]), cond, output="sample")
    torch.testing.assert_close(x0_mix, ref)


def test_property7_ema_target_for_full_fine_tuning():
    teacher, student = _gauss_pair(gain=0.8)
    ema = EMA(student, 0.95, warmup=False, trainable_only=True)
    with torch.no_grad():
        student.gain.fill_(1.1)  # live weights moved on; the EMA shadow still holds 0.8
    cond = teacher.encode_prompt(["a", "b"])
    x0 = torch.randn(2, 3, 4, 8, 8)
    loss, info = latent_consistency_loss(student, teacher, x0, cond, target=ema,
                                         generator=torch.Generator().manual_seed(0))
    assert float(student.gain.detach()) == pytest.approx(1.1)  # swapped back after the target call
    assert not info["y_target"].requires_grad and info["y"].requires_grad
    shadow = GaussVideoTeacher(teacher.schedule, res=8, frames=4, gain=0.8)
    with torch.no_grad():
        x0_tgt = shadow.predict(info["x_end"], info["t_end"], cond, output="sample")
    torch.testing.assert_close(info["y_target"], consistency_output(x0_tgt, info["x_end"], info["t_end"], 4.0))
    # a model with predict() works as the target too, and "stopgrad" differs from the EMA target here
    loss2, _ = latent_consistency_loss(student, teacher, x0, cond, target=shadow,
                                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss2, loss)
    loss3, _ = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(0))
    assert abs(float(loss3.detach()) - float(loss.detach())) > 1e-6
    with pytest.raises(UserError):
        latent_consistency_loss(student, teacher, x0, cond, target="ema")


# ----------------------------------------------------------------------------------- property 10: schedule
def test_property10_solver_schedule_and_shifted_alpha_prev_table():
    n = torch.arange(50)
    t_start, t_end = solver_indices(n)
    assert t_start.tolist() == [20 * (i + 1) - 1 for i in range(50)]
    assert t_start[0] == 19 and t_end[0] == 0 and t_start[-1] == 999
    assert torch.equal(t_end[1:], t_start[1:] - 20)
    for sched in (NoiseSchedule.ddpm_scaled_linear(), NoiseSchedule.ddpm_scaled_linear(zero_terminal_snr=True)):
        table = alphas_cumprod_prev(sched, 50)
        abar = sched.alphas_cumprod
        assert table.shape == (50,) and table[0] == abar[0]
        assert torch.equal(table[1:], abar[t_start[:-1]])  # shifted by one solver index
        torch.testing.assert_close(table, sched.alpha_cumprod(t_end, torch.empty(50, dtype=torch.float64)))
    # another grid (T = 1000, N = 4: k = 250)
    ts, te = solver_indices(torch.arange(4), 1000, 4)
    assert ts.tolist() == [249, 499, 749, 999] and te.tolist() == [0, 249, 499, 749]
    with pytest.raises(UserError):
        solver_indices(torch.tensor([50]))


# ----------------------------------------------------------------------------------- determinism and draws
def test_draws_are_seeded_and_in_range():
    teacher, student = _gauss_pair()
    cond = teacher.encode_prompt(["a", "b"] * 4)
    x0 = torch.randn(8, 3, 4, 8, 8)
    l1, i1 = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(4))
    l2, i2 = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(l1, l2) and torch.equal(i1["index"], i2["index"]) and torch.equal(i1["noise"], i2["noise"])
    assert bool(((i1["w"] >= 5) & (i1["w"] <= 15)).all()) and i1["w"].unique().numel() == 8  # one w per sample
    assert bool(((i1["index"] >= 0) & (i1["index"] < 50)).all())
    with pytest.raises(UserError):
        latent_consistency_loss(student, teacher, x0, cond, w_range=(15, 5))
    with pytest.raises(UserError):
        mixed_trajectory_x0(student, cond, x0, p=1.5)
