"""Few-step samplers for video teachers (studio.teachers.sampling) on an exact Gaussian-data teacher.

The teacher denoises data ``x0 ~ N(mu_p, s_p^2 I)`` per prompt exactly (posterior mean
``mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu)``), so samplers have known targets; parity with diffusers'
schedulers is checked step by step on the same model outputs and noise.
"""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

from studio.errors import UserError
from studio.teachers.sampling import (
    causal_block_rollout,
    consistency_scalings,
    consistency_solver_timesteps,
    ddim_sample,
    flow_euler_sample,
    flow_euler_timesteps,
    lcm_sample,
    lcm_timesteps,
    noise_generator,
    rollout_timesteps,
)
from studio.teachers.schedule import NoiseSchedule
from studio.teachers.video_base import PixelVideoMixin, VideoTeacher

MOMENTS = {"": (0.0, 1.0), "a": (0.6, 0.3), "b": (-0.4, 0.5)}


def _coef64(schedule, t):
    t = torch.as_tensor(t).reshape(-1)
    dummy = torch.empty(t.numel(), dtype=torch.float64)
    return schedule.alpha(t, dummy), schedule.sigma(t, dummy)


class GaussVideoTeacher(PixelVideoMixin, VideoTeacher):
    """Exact denoiser of per-prompt Gaussian clips. ``lam`` adds a causal dependence of frame ``f``'s ``x0`` on
    input frame ``f - 1``; ``frame_timesteps`` accepts one timestep per frame; ``gain`` scales ``x0``."""

    name = "gauss"
    is_latent = True  # model-space Gaussian data: no [-1, 1] clipping of x0 in ddim_sample

    def __init__(self, schedule, *, res=8, frames=4, lam=0.0, frame_timesteps=False, gain=None):
        super().__init__()
        self.schedule = schedule
        self.native_resolution = res
        self.num_frames = frames
        self.lam = lam
        self.frame_timesteps = frame_timesteps
        self.gain = torch.nn.Parameter(torch.tensor(1.0 if gain is None else gain))
        self.freeze()
        self.log = []

    def _embed_texts(self, texts):
        return torch.tensor([MOMENTS[t] for t in texts], dtype=torch.float32)

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        B, _, F = x_t.shape[:3]
        t = torch.as_tensor(t)
        self.log.append((tuple(t.shape), torch.is_grad_enabled()))
        a, s = _coef64(self.schedule, t)
        shape = (B, 1, F, 1, 1) if t.dim() == 2 else (B, 1, 1, 1, 1)
        a, s = a.reshape(shape), s.reshape(shape)
        mu = embeds[:, 0].double().reshape(B, 1, 1, 1, 1)
        sd = embeds[:, 1].double().reshape(B, 1, 1, 1, 1)
        x = x_t.double()
        x0 = mu + a * sd ** 2 / (a ** 2 * sd ** 2 + s ** 2) * (x - a * mu)
        if self.lam:
            x0 = torch.cat([x0[:, :, :1], x0[:, :, 1:] + self.lam * x[:, :, :-1]], dim=2)
        x0 = self.gain.double() * x0
        eps = (x - a * x0) / s
        out = eps if self.schedule.prediction_type == "epsilon" else eps - x0
        return out.to(x_t.dtype)


def eps_teacher(**kw):
    return GaussVideoTeacher(NoiseSchedule.ddpm_scaled_linear(), **kw)


def flow_teacher(shift=3.0, **kw):
    return GaussVideoTeacher(NoiseSchedule.flow(shift=shift), **kw)


def _moments_ok(x, tol_mean=0.03, tol_std=0.06):
    for i, p in enumerate(["a", "b"]):
        mu, s = MOMENTS[p]
        assert abs(x[i].mean().item() - mu) < tol_mean, (p, x[i].mean().item(), mu)
        assert abs(x[i].std().item() / s - 1) < tol_std, (p, x[i].std().item(), s)


# ------------------------------------------------------------------------------------------- schedule helper
def test_timestep_from_sigma_inverts_sigma():
    for sched in (NoiseSchedule.ddpm_scaled_linear(), NoiseSchedule.flow(shift=5.0), NoiseSchedule.cosine()):
        t = torch.tensor([0.0, 0.5, 3.25, 250.0, 640.7, 998.0, 999.0], dtype=torch.float64)
        _, s = _coef64(sched, t)
        back = sched.timestep_from_sigma(s)
        torch.testing.assert_close(back, t, atol=1e-6, rtol=0)
        with pytest.raises(ValueError):
            sched.timestep_from_sigma(float(s[0]) / 2)


# ------------------------------------------------------------------------------------------- DDIM
def test_ddim_video_latents_reach_data_moments_and_decode():
    teacher = eps_teacher(res=16)
    x = ddim_sample(teacher, ["a", "b"], steps=150, guidance_scale=1.0, seed=0, output="latents")
    assert x.shape == (2, 3, 4, 16, 16)
    _moments_ok(x)
    vid = ddim_sample(teacher, ["a"], steps=3, guidance_scale=2.0, seed=0, num_frames=2)
    assert vid.shape == (1, 2, 3, 16, 16) and vid.dtype == torch.float32
    assert 0.0 <= vid.min() and vid.max() <= 1.0


def test_ddim_on_flow_schedule_equals_flow_euler_on_same_timesteps():
    teacher = flow_teacher(res=8)
    a = ddim_sample(teacher, ["a", "b"], steps=9, guidance_scale=1.0, seed=2, output="latents")
    ts = torch.linspace(999, 0, 9).round().tolist()
    b = flow_euler_sample(teacher, ["a", "b"], guidance_scale=1.0, seed=2, timesteps=ts, output="latents")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------- flow Euler
def test_flow_euler_many_steps_reaches_data_moments():
    teacher = flow_teacher(res=16)
    x = flow_euler_sample(teacher, ["a", "b"], steps=100, guidance_scale=1.0, seed=1, output="latents")
    _moments_ok(x)


def test_flow_sde_keeps_the_marginals():
    teacher = flow_teacher(res=16)
    x = flow_euler_sample(teacher, ["a", "b"], steps=150, guidance_scale=1.0, seed=1, sde_noise_level=0.7,
                          output="latents")
    _moments_ok(x, 0.04, 0.06)
    ode = flow_euler_sample(teacher, ["a", "b"], steps=150, guidance_scale=1.0, seed=1, output="latents")
    assert (x - ode).abs().mean() > 0.05  # the SDE really injected noise


@pytest.mark.parametrize("steps,shift", [(7, 3.0), (20, 3.0), (5, 1.0)])
def test_flow_euler_matches_diffusers_step_by_step(steps, shift):
    teacher = flow_teacher(shift=shift)
    cond = teacher.encode_prompt(["a", "b"])
    ours = flow_euler_sample(teacher, cond, steps=steps, guidance_scale=3.0, seed=5, output="latents")
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    ts, sig = flow_euler_timesteps(teacher.schedule, steps)
    torch.testing.assert_close(sig.float(), sch.sigmas, atol=2e-6, rtol=0)
    torch.testing.assert_close(teacher.schedule.model_timestep(ts), sch.timesteps, atol=2e-3, rtol=0)
    x = teacher.noise(2, seed=5)
    for i, t in enumerate(sch.timesteps):
        v = teacher.predict(x, ts[i].repeat(2), cond, guidance_scale=3.0, output="flow")
        x = sch.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


def test_flow_shift_override_uses_that_shifts_sigmas():
    sched = NoiseSchedule.flow(shift=3.0)
    ts, sig = flow_euler_timesteps(sched, 6, shift=5.0)
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(6)
    torch.testing.assert_close(sig.float(), ref.sigmas, atol=2e-6, rtol=0)
    torch.testing.assert_close(_coef64(sched, ts)[1], sig[:-1], atol=1e-9, rtol=0)  # on the model's own axis
    with pytest.raises(UserError):
        flow_euler_sample(eps_teacher(), "a", steps=2)


# ------------------------------------------------------------------------------------------- LCM
def test_consistency_scalings_boundary_and_diffusers():
    c_skip, c_out = consistency_scalings(torch.tensor([0, 19, 999]), timestep_scaling=4.0)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert abs(c_skip[1].item() - 0.25 / (76 ** 2 + 0.25)) < 1e-12  # spec 2.8.1
    assert c_skip[2] < c_skip[1] < c_skip[0]
    sch = LCMScheduler(timestep_scaling=4.0)
    for t in (0, 19, 259, 999):
        a, b = sch.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        s, o = consistency_scalings(t, timestep_scaling=4.0)
        assert abs(float(a) - float(s)) < 1e-7 and abs(float(b) - float(o)) < 1e-7
    grid = consistency_solver_timesteps()
    assert grid[:2] == [19, 39] and grid[-1] == 999 and len(grid) == 50


@pytest.mark.parametrize("steps,scaling", [(1, 10.0), (2, 10.0), (4, 4.0), (8, 10.0), (3, 10.0), (6, 4.0)])
def test_lcm_matches_diffusers_step_by_step(steps, scaling):
    teacher = eps_teacher()
    cond = teacher.encode_prompt(["a", "b"])
    ours = lcm_sample(teacher, cond, steps, seed=3, guidance_scale=2.0, timestep_scaling=scaling, output="latents")
    sch = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       timestep_scaling=scaling, original_inference_steps=50)
    sch.set_timesteps(steps)
    assert sch.timesteps.tolist() == lcm_timesteps(steps)
    x, gen, den = teacher.noise(2, seed=3), noise_generator(3, 1), None
    for t in sch.timesteps:
        eps = teacher.predict(x, int(t), cond, guidance_scale=2.0, output="epsilon")
        x, den = sch.step(eps, t, x, generator=gen, return_dict=False)
    # diffusers steps in float32 from float32 schedule tables, ours in float64: per step, rounding of ~16 ulps
    # of |x|, amplified by 1 / alpha (up to ~15 at t = 999) in x0 = (x - sigma eps) / alpha: 256 ulps per step
    torch.testing.assert_close(ours, den, rtol=0,
                               atol=256 * steps * torch.finfo(torch.float32).eps * float(den.abs().max()))


def test_lcm_timesteps_and_errors():
    assert lcm_timesteps(1) == [999] and lcm_timesteps(2) == [999, 499] and lcm_timesteps(4) == [999, 759, 499, 259]
    with pytest.raises(UserError):
        lcm_timesteps(51)
    with pytest.raises(UserError):
        lcm_sample(eps_teacher(), "a", timesteps=[499, 999])
    with pytest.raises(UserError):
        lcm_sample(eps_teacher(), "a", 2, output="pixels")


def test_samplers_deterministic_per_seed():
    ft, et = flow_teacher(), eps_teacher()
    runs = {
        "flow": lambda s: flow_euler_sample(ft, ["a", "b"], 4, 2.0, s, sde_noise_level=0.5, output="latents"),
        "lcm": lambda s: lcm_sample(et, ["a", "b"], 4, s, output="latents"),
        "ddim": lambda s: ddim_sample(et, ["a", "b"], 4, 2.0, s, output="latents"),
        "rollout": lambda s: causal_block_rollout(ft, ["a", "b"], 4, 2, seed=s),
    }
    for name, run in runs.items():
        a, b, c = run(7), run(7), run(8)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name


# ------------------------------------------------------------------------------------------- causal rollout
STEPS = [999, 749, 499, 249]


def _plain_few_step(teacher, cond, x, ts, seed):
    """Bidirectional few-step sampling: predict x0, re-noise to the next level with fresh noise."""
    gen = noise_generator(seed, 1)
    for k, t in enumerate(ts):
        x0 = teacher.predict(x, t, cond, output="sample")
        if k + 1 < len(ts):
            x = teacher.schedule.add_noise(x0, torch.randn(x.shape, generator=gen), ts[k + 1])
    return x0


def test_rollout_timesteps_warp_through_the_shift():
    sched = NoiseSchedule.flow(shift=5.0)
    ts = rollout_timesteps(sched, [1000, 750, 500, 250])
    assert ts == STEPS
    torch.testing.assert_close(_coef64(sched, torch.tensor(ts))[1],
                               torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625], dtype=torch.float64))
    raw = rollout_timesteps(sched, [1000, 750, 500, 250], warp_denoising_step=False)
    torch.testing.assert_close(_coef64(sched, torch.tensor(raw))[1],
                               torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    assert rollout_timesteps(NoiseSchedule.ddpm_scaled_linear(), [1000, 500]) == [999, 499]
    with pytest.raises(UserError):
        rollout_timesteps(sched, [1000, 0])


@pytest.mark.parametrize("frame_timesteps", [False, True])
def test_rollout_with_one_block_is_plain_few_step_sampling(frame_timesteps):
    teacher = flow_teacher(shift=5.0, lam=0.4, frame_timesteps=frame_timesteps)
    cond = teacher.encode_prompt(["a", "b"])
    out = causal_block_rollout(teacher, cond, num_frames=4, block_size=4, seed=3)
    ref = _plain_few_step(teacher, cond, teacher.noise(2, seed=3), STEPS, 3)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    vid = causal_block_rollout(teacher, cond, num_frames=4, block_size=4, seed=3, output="decoded")
    assert vid.shape == (2, 4, 3, 8, 8)


def _reference_frame_timestep_rollout(teacher, cond, x_all, bs, ts, seed):
    """Obviously-correct twin of the per-frame-timestep fallback with context_noise = 0."""
    sched, gen, outs = teacher.schedule, noise_generator(seed, 1), []
    B = x_all.shape[0]
    for f0 in range(0, x_all.shape[2], bs):
        xb = x_all[:, :, f0:f0 + bs]
        ctx = torch.cat(outs, dim=2) if outs else None
        for k, t in enumerate(ts):
            if ctx is None:
                x0 = teacher.predict(xb, t, cond, output="sample")
            else:
                tf = torch.tensor([[0] * ctx.shape[2] + [t] * xb.shape[2]] * B)
                raw = teacher._forward(torch.cat([ctx, xb], dim=2), tf, cond.embeds)[:, :, -xb.shape[2]:]
                x0 = sched.convert(raw, xb, torch.full((B,), t), sched.prediction_type, "sample")
            if k + 1 < len(ts):
                xb = sched.add_noise(x0, torch.randn(xb.shape, generator=gen), ts[k + 1])
        outs.append(x0)
    return torch.cat(outs, dim=2)


def test_rollout_fallback_conditions_on_context():
    teacher = flow_teacher(shift=5.0, lam=0.5, frame_timesteps=True, frames=6)
    cond = teacher.encode_prompt(["a", "b"])
    out = causal_block_rollout(teacher, cond, block_size=2, seed=4)
    ref = _reference_frame_timestep_rollout(teacher, cond, teacher.noise(2, seed=4), 2, STEPS, 4)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    teacher.log.clear()
    blind = causal_block_rollout(teacher, cond, block_size=2, seed=4, context_window=0)
    assert all(shape == (2,) for shape, _ in teacher.log)  # no context frames were fed
    torch.testing.assert_close(blind[:, :, :2], out[:, :, :2], atol=0, rtol=0)
    assert (blind[:, :, 2:] - out[:, :, 2:]).abs().max() > 1e-2  # later blocks see the context
    for ft in (True, False):  # a context-blind teacher gives the same clip either way
        plain = flow_teacher(shift=5.0, frame_timesteps=ft, frames=6)
        a = causal_block_rollout(plain, cond, block_size=2, seed=4)
        b = causal_block_rollout(plain, cond, block_size=2, seed=4, context_window=0)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    shared = flow_teacher(shift=5.0, lam=0.5, frames=6)  # replacement method: context re-noised to t
    c = causal_block_rollout(shared, cond, block_size=2, seed=4)
    d = causal_block_rollout(shared, cond, block_size=2, seed=4, context_window=0)
    assert (c[:, :, 2:] - d[:, :, 2:]).abs().max() > 1e-2


class BlockTeacher(GaussVideoTeacher):
    """A causal teacher with ``forward_block``: the per-frame fallback's math plus a recorded "KV cache"."""

    def init_block_cache(self, batch, num_latent_frames, cond):
        return {"calls": [], "frames": num_latent_frames}

    def forward_block(self, x_block, t, cond, context_frames, cache):
        cache["calls"].append((x_block.detach().clone(), t.clone(), None if context_frames is None
                               else context_frames.shape[2], torch.is_grad_enabled()))
        if context_frames is None:
            return self.predict(x_block, t, cond, output="sample")
        B, f, Fc = x_block.shape[0], x_block.shape[2], context_frames.shape[2]
        tf = torch.cat([torch.zeros(B, Fc, dtype=t.dtype), t[:, None].expand(B, f)], dim=1)
        raw = self._forward(torch.cat([context_frames, x_block], dim=2), tf, cond.embeds)[:, :, -f:]
        return self.schedule.convert(raw, x_block, t, self.schedule.prediction_type, "sample")


def test_rollout_forward_block_protocol_and_cache_writes():
    teacher = BlockTeacher(NoiseSchedule.flow(shift=5.0), lam=0.5, frame_timesteps=True, frames=6)
    cond = teacher.encode_prompt(["a", "b"])
    cache = {"calls": []}
    out = causal_block_rollout(teacher, cond, block_size=2, seed=4, kv_cache=cache)
    fallback = causal_block_rollout(flow_teacher(shift=5.0, lam=0.5, frame_timesteps=True, frames=6), cond,
                                    block_size=2, seed=4)
    torch.testing.assert_close(out, fallback, atol=1e-6, rtol=0)
    calls = cache["calls"]
    assert len(calls) == 3 * (len(STEPS) + 1)
    for b in range(3):
        block = calls[b * 5:(b + 1) * 5]
        assert [int(c[1][0]) for c in block] == STEPS + [0]  # 4 denoising steps, then the cache write at t_ctx
        assert all(c[2] == (None if b == 0 else 2 * b) for c in block)
        assert not any(c[3] for c in block)
        torch.testing.assert_close(block[-1][0], out[:, :, 2 * b:2 * b + 2], atol=0, rtol=0)
    auto = causal_block_rollout(teacher, cond, block_size=2, seed=4)  # init_block_cache builds one
    torch.testing.assert_close(auto, out, atol=0, rtol=0)


def test_rollout_grad_exit_step_keeps_only_the_exit_graph():
    teacher = flow_teacher(shift=5.0, lam=0.5, frame_timesteps=True, frames=6, gain=0.9)
    teacher.gain.requires_grad_(True)
    cond = teacher.encode_prompt(["a", "b"])
    with torch.no_grad():
        assert not causal_block_rollout(teacher, cond, block_size=2, seed=1).requires_grad
    assert not causal_block_rollout(teacher, cond, block_size=2, seed=1).requires_grad  # inference: no graph
    for exit_step in (2, [0, 3, 1]):
        teacher.log.clear()
        teacher.gain.grad = None
        out, traj = causal_block_rollout(teacher, cond, block_size=2, seed=1, grad_exit_step=exit_step,
                                         return_trajectory=True)
        exits = [exit_step] * 3 if isinstance(exit_step, int) else exit_step
        assert [sum(1 for r in traj if r["block"] == b) for b in range(3)] == [e + 1 for e in exits]
        grads = [g for _, g in teacher.log]
        assert sum(grads) == 3  # one graph-keeping call per block ...
        ends = list(torch.tensor([e + 1 for e in exits]).cumsum(0) - 1)
        assert [i for i, g in enumerate(grads) if g] == [int(i) for i in ends]  # ... its exit step
        assert out.requires_grad
        out.sum().backward()
        # x0 = gain * h(inputs): with detached inputs and context, d sum(out) / d gain = sum(out) / gain
        torch.testing.assert_close(teacher.gain.grad, (out.sum() / teacher.gain).detach(), rtol=1e-5, atol=1e-6)
    r1 = causal_block_rollout(teacher, cond, block_size=2, seed=1, grad_exit_step="random")
    r2 = causal_block_rollout(teacher, cond, block_size=2, seed=1, grad_exit_step="random")
    torch.testing.assert_close(r1, r2, atol=0, rtol=0)
    with pytest.raises(UserError):
        causal_block_rollout(teacher, cond, block_size=2, grad_exit_step=4)


def test_rollout_context_noise_renoises_the_context_once_per_block():
    teacher = BlockTeacher(NoiseSchedule.flow(shift=5.0), frame_timesteps=True, frames=4)
    cond = teacher.encode_prompt(["a"])
    cache = {"calls": []}
    out = causal_block_rollout(teacher, cond, block_size=2, seed=2, kv_cache=cache, context_noise=100)
    write = cache["calls"][4]
    assert int(write[1][0]) == 99 and not torch.equal(write[0], out[:, :, :2])
    gen = noise_generator(2, 2)
    expect = teacher.schedule.add_noise(out[:, :, :2], torch.randn(out[:, :, :2].shape, generator=gen), 99)
    torch.testing.assert_close(write[0], expect, atol=0, rtol=0)
