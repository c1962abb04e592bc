"""Stream-R1's foundations (issue 18 parts 1, 3, 4): DMD, reward weighting and rewards, against the
CPU-testable properties of spec ``video_methods.md`` 3.6. Tiny tensors, float64 where a claim is exact."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from studio.distill.dmd import (
    dmd_critic_loss,
    dmd_generator_loss,
    dmd_gradient,
    dmd_timesteps,
    normalized_dmd_gradient,
    shift_timesteps,
)
from studio.distill.reward_weighting import (
    BalanceTracker,
    balance_penalty,
    fuse_saliency,
    fusion_weights,
    intra_perplexity_weights,
    preset,
    reward_weighted_dmd_loss,
    spatial_factor,
    temporal_factor,
)
from studio.teachers.schedule import NoiseSchedule

D = torch.float64


class TinyScore(torch.nn.Module):
    """A score with the teacher protocol's ``predict``: x0 = conv(x_t) (+ a conditional offset), CFG in
    the x0 parameterisation, converted by the schedule."""

    def __init__(self, channels: int = 2, seed: int = 0, offset: float = 0.3, shift: float = 5.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv3d(channels, channels, 1).to(D)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=D) * 0.5)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g, dtype=D) * 0.1)
        self.offset = offset
        self.schedule = NoiseSchedule.flow(shift=shift)

    def predict(self, x_t, t, cond, guidance_scale=1.0, output="epsilon"):
        u = self.conv(x_t)
        c = u + self.offset * cond
        pred = c if guidance_scale == 1.0 else u + guidance_scale * (c - u)
        return self.schedule.convert(pred, x_t, t, "sample", output)


def _latents(B=2, C=2, Fr=3, h=4, w=5, seed=0):
    return torch.randn(B, C, Fr, h, w, generator=torch.Generator().manual_seed(seed), dtype=D)


# ------------------------------------------------------------------------------------- DMD (3.6 #8, #9)

def test_timesteps_in_range_and_shift_pushes_to_high_noise():
    g = torch.Generator().manual_seed(0)
    ts = dmd_timesteps(4000, shift=5.0, generator=g)
    assert ts.dmd_t.min() >= 20 and ts.dmd_t.max() <= 980
    assert (ts.dmd_t == 20).any() and (ts.dmd_t == 980).any()          # the clamp is active at both ends
    flat = dmd_timesteps(4000, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert ts.dmd_t.median() > flat.dmd_t.median() + 250
    # u > 1/6 maps above 500 with shift 5: about 83 % of the mass
    assert abs(float((ts.dmd_t > 500).double().mean()) - 5 / 6) < 0.03
    assert torch.allclose(shift_timesteps(torch.tensor([0.0, 500.0, 1000.0]), 5.0),
                          torch.tensor([0.0, 5000 / 6, 1000.0], dtype=D))


def test_timesteps_on_a_flow_schedule_keep_the_noise_level():
    sched = NoiseSchedule.flow(shift=3.0)
    ts = dmd_timesteps(64, sched, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sched.sigma(ts.t).to(D), ts.dmd_t / 1000, atol=1e-9)
    vp = NoiseSchedule.ddpm_scaled_linear()
    tv = dmd_timesteps(64, vp, generator=torch.Generator().manual_seed(1))
    assert tv.t.min() >= 0.02 * 1000 - 1e-9 and tv.t.max() <= 0.98 * 1000 + 1e-9


def test_normalisation_is_per_sample_and_scale_free():
    x = _latents()
    r = x + torch.randn_like(x) * 0.3
    f = x + torch.randn_like(x) * 0.3
    g = normalized_dmd_gradient(x, r, f)
    c = torch.tensor([7.0, 0.01], dtype=D).reshape(-1, 1, 1, 1, 1)   # a different scale per sample
    g2 = normalized_dmd_gradient(x, x - c * (x - r), x - c * (x - f))
    assert torch.allclose(g, g2, rtol=1e-12, atol=1e-12)
    # per sample: each sample's mean |x - f_real| divides only its own gradient
    for b in range(2):
        n = (x[b] - r[b]).abs().mean()
        assert torch.allclose(g[b], (f[b] - r[b]) / n)
    # a batch-wide normaliser would not give this: changing sample 1 leaves sample 0 alone
    r3 = r.clone()
    r3[1] = x[1] + 100 * (r[1] - x[1])
    assert torch.equal(normalized_dmd_gradient(x, r3, f)[0], g[0])
    # x == f_real exactly: 0 / 0 -> 0, never NaN
    z = normalized_dmd_gradient(x, x, f)
    assert torch.isfinite(z).all() and (z == 0).all()


def test_dmd_gradient_uses_cfg_real_and_conditional_fake():
    real, fake = TinyScore(seed=0, offset=0.3), TinyScore(seed=1, offset=0.5)
    x = _latents()
    cond = 1.0
    out = dmd_gradient(real, fake, x, cond, guidance_scale=4.0, generator=torch.Generator().manual_seed(3))
    assert out.dmd_t.min() >= 20 and out.dmd_t.max() <= 980
    x_t = real.schedule.add_noise(x, out.noise, out.t)
    sig = real.schedule.sigma(out.t, x)
    assert torch.allclose(x_t, (1 - sig) * x + sig * out.noise)
    with torch.no_grad():
        u = real.conv(x_t)
        xr = u + 4.0 * 0.3 * cond                       # house CFG w = 4 (Stream-R1's guidance 3)
        xf = fake.conv(x_t) + 0.5 * cond                # conditional only
    assert torch.allclose(out.x0_real, xr, atol=1e-10) and torch.allclose(out.x0_fake, xf, atol=1e-10)
    n = (x - xr).abs().mean((1, 2, 3, 4), keepdim=True)
    assert torch.allclose(out.grad, (xf - xr) / n, atol=1e-10)
    # f_fake = f_real -> g = 0
    same = dmd_gradient(real, real, x, cond, guidance_scale=1.0, fake_guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(3))
    assert same.grad.abs().max() == 0


def test_surrogate_gradient_identity_float64():
    x = _latents().requires_grad_(True)
    g = torch.randn_like(x)
    w = torch.tensor([0.3, 2.5], dtype=D)
    W = torch.rand(2, 1, 3, 4, 5, dtype=D) + 0.1
    loss = dmd_generator_loss(x, g, sample_weight=w, element_weight=W)
    (gx,) = torch.autograd.grad(loss, x)
    N = x.numel()
    # (z - sg(z - G) rounds at |z| * 2^-53, so the identity holds to ~1e-13 relative in float64, not bitwise)
    assert torch.allclose(gx, w.reshape(-1, 1, 1, 1, 1) * W * g / N, rtol=1e-10, atol=0)
    assert torch.allclose(loss, 0.5 * (w.reshape(-1, 1, 1, 1, 1) * W * g * g).mean(), rtol=1e-13)
    # the gradient mask: only masked-in elements, N = their count
    mask = torch.zeros(1, 1, 3, 1, 1, dtype=torch.bool)
    mask[:, :, 1:] = True
    (gm,) = torch.autograd.grad(dmd_generator_loss(x, g, mask=mask), x)
    assert (gm[:, :, 0] == 0).all()
    assert torch.allclose(gm[:, :, 1:], g[:, :, 1:] / (x.numel() * 2 / 3), rtol=1e-10)


def test_plain_dmd_surrogate_matches_self_forcing_reference():
    x = _latents().requires_grad_(True)
    g = torch.randn_like(x)
    loss = dmd_generator_loss(x, g)
    ref = 0.5 * F.mse_loss(x, (x - g).detach(), reduction="mean")          # Self-Forcing's surrogate
    assert torch.allclose(loss, ref, rtol=1e-13)
    (a,) = torch.autograd.grad(loss, x)
    (b,) = torch.autograd.grad(ref, x)
    assert torch.allclose(a, b, rtol=1e-10, atol=0)


def test_critic_flow_loss_and_its_gradient_path():
    fake = TinyScore(seed=2)
    x = _latents().requires_grad_(True)
    out = dmd_critic_loss(fake, x, 1.0, generator=torch.Generator().manual_seed(5))
    assert out.dmd_t.min() >= 20 and out.dmd_t.max() <= 980
    sched = fake.schedule
    with torch.no_grad():
        x_t = sched.add_noise(x, out.noise, out.t)
        sig = sched.sigma(out.t, x)
        x0 = fake.conv(x_t) + 0.3
        ref = (((x_t - x0) / sig - (out.noise - x)) ** 2).mean()
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    out.loss.backward()
    assert x.grad is None                                   # generator samples are detached
    assert fake.conv.weight.grad is not None and fake.conv.weight.grad.abs().sum() > 0
    # a perfect denoiser of the noised sample has zero loss (x0 target form)
    class Oracle(torch.nn.Module):
        schedule = sched

        def predict(self, x_t, t, cond, guidance_scale=1.0, output="epsilon"):
            return sched.convert(x.detach(), x_t, t, "sample", output)
    o = dmd_critic_loss(Oracle(), x, None, generator=torch.Generator().manual_seed(5))
    assert o.loss < 1e-18


# ------------------------------------------------------------------------------------- weighting (#1-#7)

class TinyGenerator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 3, padding=1).to(D)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(4), std=0.3)

    def forward(self, z):
        return self.conv(z)


def _param_grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def test_beta_zero_and_unit_weights_equal_plain_dmd_exactly():
    G = TinyGenerator()
    z = _latents(seed=1)
    g = torch.randn(2, 2, 3, 4, 5, dtype=D, generator=torch.Generator().manual_seed(9))
    rewards = torch.tensor([[1.5, -0.7, 0.2], [-2.0, 0.3, 0.9]], dtype=D)
    flat = torch.full((2, 3, 3, 4, 5), 0.7, dtype=D)                       # constant saliency -> W = 1
    plain = dmd_generator_loss(G(z), g)
    gp = _param_grads(G, plain)
    for cfg, sal in ((preset("dmd"), None), (preset("stream-r1", beta=0.0, balance=False), flat)):
        out = reward_weighted_dmd_loss(G(z), g, cfg, rewards=rewards, saliency=sal)
        assert torch.equal(out.loss.detach(), plain.detach())
        for a, b in zip(_param_grads(G, out.loss), gp):
            assert torch.equal(a, b)
    # and beta != 0 does change it (the check above can fail)
    out = reward_weighted_dmd_loss(G(z), g, preset("reward-forcing"), rewards=rewards)
    assert not torch.allclose(out.loss, plain)


def test_stream_r1_gradient_identity_with_reward_and_W():
    x = _latents().requires_grad_(True)
    g = torch.randn_like(x)
    rewards = torch.tensor([[0.4, -0.8, 0.1], [1.0, 0.2, -0.3]], dtype=D)
    sal = torch.rand(2, 3, 3, 4, 5, dtype=D, generator=torch.Generator().manual_seed(2))
    cfg = preset("stream-r1", balance=False)
    out = reward_weighted_dmd_loss(x, g, cfg, rewards=rewards, saliency=sal)
    (gx,) = torch.autograd.grad(out.loss, x)
    r = rewards.mean(1)
    W = intra_perplexity_weights(fuse_saliency(sal, rewards))[:, None]
    expect = torch.exp(2.0 * r).reshape(-1, 1, 1, 1, 1) * W * g / x.numel()
    assert torch.allclose(gx, expect, rtol=1e-10, atol=0)
    assert torch.allclose(out.sample_weight, torch.exp(2.0 * r))            # per sample, not sample 0's
    # f_fake = f_real -> g = 0 -> no generator gradient whatever the reward
    (g0,) = torch.autograd.grad(reward_weighted_dmd_loss(x, torch.zeros_like(x), cfg, rewards=rewards * 50,
                                                         saliency=sal).loss, x)
    assert g0.abs().max() == 0


def test_no_reward_gradient_leaks_into_the_generator():
    G = TinyGenerator()
    z = _latents(B=1, seed=3)
    g = torch.randn(1, 2, 3, 4, 5, dtype=D, generator=torch.Generator().manual_seed(8))
    x = G(z)

    def reward(v):  # a differentiable "reward model" of the pixels -- fed the *non-detached* rollout on purpose
        return torch.stack([v.mean(), (v ** 2).mean(), v.tanh().mean()])[None]

    r = reward(x)
    assert r.requires_grad
    cfg = preset("stream-r1", balance=False)
    sal = torch.rand(1, 3, 3, 4, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    out = reward_weighted_dmd_loss(x, g, cfg, rewards=r, saliency=sal)
    got = _param_grads(G, out.loss)
    W = intra_perplexity_weights(fuse_saliency(sal, r.detach()))[:, None]
    base = _param_grads(G, dmd_generator_loss(G(z), g, element_weight=W))
    scale = math.exp(2.0 * float(r.detach().mean()))
    for a, b in zip(got, base):
        assert torch.allclose(a, scale * b, rtol=1e-9, atol=1e-15)


def test_W_properties():
    gen = torch.Generator().manual_seed(0)
    S = torch.rand(2, 4, 6, 5, dtype=D, generator=gen)
    W = intra_perplexity_weights(S)
    assert torch.allclose(W.mean((1, 2, 3)), torch.ones(2, dtype=D), atol=1e-14)
    assert (W > 0).all()
    # positive affine invariance (min-max removes scale and shift)
    assert torch.allclose(intra_perplexity_weights(3.7 * S + 11.0), W, atol=1e-12)
    # constant saliency, or k_s = k_t = 0 -> W = 1
    assert torch.equal(intra_perplexity_weights(torch.full_like(S, 0.4)), torch.ones_like(S))
    assert torch.allclose(intra_perplexity_weights(S, k_s=0.0, k_t=0.0), torch.ones_like(S), atol=1e-15)
    assert not torch.allclose(W, torch.ones_like(W))
    # temporal factor is monotone in the frame's mean saliency; mean 1; floored at tau_min
    wt = temporal_factor(S)
    means = S.mean((-2, -1))
    for b in range(2):
        order = means[b].argsort()
        assert (wt[b, order].diff() > 0).all()
    assert torch.allclose(wt.mean(1), torch.ones(2, dtype=D))
    assert torch.allclose(wt.min(1).values / wt.max(1).values, torch.full((2,), 0.2, dtype=D))
    # spatial factor: mean 1 per frame, floored at sigma_min relative to its peak
    ws = spatial_factor(S)
    assert torch.allclose(ws.mean((-2, -1)), torch.ones(2, 4, dtype=D))
    ratio = ws.amin((-2, -1)) / ws.amax((-2, -1))
    assert torch.allclose(ratio, torch.full_like(ratio, 0.15))
    # weaker floors reach lower
    assert (spatial_factor(S, sigma_min=0.0).amin((-2, -1)) == 0).all()
    # saliency concentrated on a blob gets the mass
    blob = torch.zeros(1, 4, 6, 5, dtype=D)
    blob[:, :, 2:4, 1:3] = 1.0
    Wb = intra_perplexity_weights(blob)
    assert Wb[:, :, 2:4, 1:3].mean() > 3 * Wb[:, :, :2].mean()
    # the ablation (one global min-max) keeps mean 1 and positivity
    Wa = intra_perplexity_weights(S, temporal=False)
    assert torch.allclose(Wa.mean((1, 2, 3)), torch.ones(2, dtype=D)) and (Wa > 0).all()


def test_adaptive_fusion():
    r = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=D)
    w = fusion_weights(r)
    assert torch.allclose(w.sum(-1), torch.ones(2, dtype=D))
    assert w[0, 1] > w[0, 0] > w[0, 2]                         # the weaker axis weighs more
    assert torch.allclose(w[1], torch.full((3,), 1 / 3, dtype=D))
    assert torch.allclose(fusion_weights(r, temperature=1e9), fusion_weights(r, "mean"), atol=1e-8)
    assert fusion_weights(r, temperature=0.1)[0, 1] > w[0, 1]  # colder -> sharper
    S = torch.rand(2, 3, 2, 3, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    fused = fuse_saliency(S, r)
    assert torch.allclose(fused, (w[:, :, None, None, None] * S).sum(1))
    assert torch.allclose(fuse_saliency(S, r, temperature=1e9), fuse_saliency(S, mode="mean"), atol=1e-8)
    assert torch.equal(fuse_saliency(S, mode="max"), S.amax(1))


def test_balance_penalty():
    lam = 0.5
    # fewer than 4 points -> 0
    assert balance_penalty(torch.randn(3, 3), lam) == 0
    # equal Delta on every axis -> 0
    base = torch.randn(10, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    trend = torch.linspace(0, 1, 10, dtype=D)[:, None]
    equal = base.mean(1, keepdim=True) + trend.expand(10, 3)
    assert abs(float(balance_penalty(equal, lam))) < 1e-14
    # exactly lam * std(Delta), early/recent halves
    h = torch.randn(9, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    delta = h[4:].mean(0) - h[:4].mean(0)
    assert torch.allclose(balance_penalty(h, lam), lam * delta.std(unbiased=True), rtol=1e-14)
    # grows with the spread of the Deltas
    spread = [float(balance_penalty(torch.cat([torch.zeros(5, 3, dtype=D),
                                               torch.tensor([[0.0, s, 2 * s]], dtype=D).expand(5, 3)]), lam))
              for s in (0.1, 0.5, 1.0)]
    assert spread[0] < spread[1] < spread[2]
    # the tracker: 0 before warmup, then the penalty of its window, subtracted from r_bar
    tr = BalanceTracker(window=6, warmup=5, lam=lam)
    rows = torch.randn(8, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    pens = torch.cat([tr.update(rows[i:i + 1]) for i in range(8)])
    assert (pens[:4] == 0).all()
    for i in range(4, 8):
        window = rows[max(0, i - 5): i + 1]
        assert torch.allclose(pens[i], balance_penalty(window, lam))
    assert len(tr.history) == 6 and tr.calls == 8
    tr2 = BalanceTracker(window=6, warmup=5, lam=lam)
    tr2.load_state_dict(tr.state_dict())
    assert torch.allclose(tr2.update(rows[:1]), tr.update(rows[:1]))
    # in the loss: r_final = mean(r) - penalty once warm
    cfg = preset("stream-r1", spatial=False, balance_window=6, balance_warmup=1)
    trk = cfg.tracker()
    for i in range(5):
        trk.update(rows[i:i + 1])
    x = _latents(B=1)
    out = reward_weighted_dmd_loss(x, torch.zeros_like(x), cfg, rewards=rows[5:6], tracker=trk)
    expect = rows[5].mean() - balance_penalty(rows[:6], lam)
    assert torch.allclose(out.r_final, expect[None]) and out.penalty[0] > 0


def test_reward_forcing_preset_uses_motion_quality_only():
    x = _latents().requires_grad_(True)
    g = torch.randn_like(x)
    rewards = torch.tensor([[3.0, -0.5, 3.0], [-3.0, 0.25, -3.0]], dtype=D)
    out = reward_weighted_dmd_loss(x, g, preset("reward-forcing"), rewards=rewards)
    assert out.element_weight is None
    assert torch.allclose(out.sample_weight, torch.exp(2.0 * rewards[:, 1]))
    (gx,) = torch.autograd.grad(out.loss, x)
    assert torch.allclose(gx, torch.exp(2.0 * rewards[:, 1]).reshape(-1, 1, 1, 1, 1) * g / x.numel(), rtol=1e-10)
    with pytest.raises(ValueError, match="preset"):
        preset("nope")


# ------------------------------------------------------------------------------------- rewards (part 3b)

@pytest.fixture(scope="module")
def sw_clips():
    from studio.world.clips import sample_clips, video_prompts

    prompts = [p for p in video_prompts(cameras=["static"])
               if any(m in p for m in ("moving left", "moving right", "moving up", "moving down"))]
    return prompts, sample_clips(len(prompts), seed=3, prompts=prompts)["video"]


def test_shapeworld_reward_prefers_the_right_clip(sw_clips):
    from studio.teachers.rewards import ShapeWorldReward
    from studio.world.clips import COLORS, gaussian_blur, parse_video_prompt, video_prompt

    prompts, v = sw_clips
    R = ShapeWorldReward()
    right = R.scores(v, prompts)
    opposite = {"moving left": "moving right", "moving right": "moving left", "moving up": "moving down",
                "moving down": "moving up"}
    cols = list(COLORS)
    wrong_color, wrong_dir = [], []
    for p in prompts:
        s, c, m, cam = parse_video_prompt(p)
        wrong_color.append(video_prompt(s, cols[(cols.index(c) + 1) % 4], m, cam))
        wrong_dir.append(video_prompt(s, c, opposite[m], cam))
    still = v[:, :1].expand_as(v)
    blurred = gaussian_blur(v.reshape(-1, *v.shape[-2:]), 1.0).reshape(v.shape)
    vq, mq, ta = 0, 1, 2
    assert (right[:, ta] > R.scores(v, wrong_color)[:, ta] + 0.5).all()
    assert (right[:, mq] > R.scores(v, wrong_dir)[:, mq] + 0.5).all()
    assert (right[:, mq] > R.scores(still, prompts)[:, mq] + 0.5).all()
    assert (right[:, vq] > R.scores(blurred, prompts)[:, vq] + 0.5).all()
    # the wrong-direction clip keeps its visual quality and text alignment (axes are separate)
    assert torch.allclose(R.scores(v, wrong_dir)[:, [vq, ta]], right[:, [vq, ta]])


def test_reward_z_normalisation_comes_from_the_config(sw_clips):
    from studio.teachers.rewards import SHAPEWORLD_REWARD_CONFIG, ShapeWorldReward, norm_stats

    prompts, v = sw_clips
    raw = ShapeWorldReward(config={"use_norm": False}).scores(v[:3], prompts[:3])
    R = ShapeWorldReward()
    mean, std = norm_stats(SHAPEWORLD_REWARD_CONFIG)
    assert torch.allclose(R.scores(v[:3], prompts[:3]).double(), (raw.double() - mean) / std, atol=1e-5)
    nested = {"inference_config": {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": 0.0, "MQ_std": 1.0,
                                   "TA_mean": -1.0, "TA_std": 0.5}}
    z = ShapeWorldReward(config=nested).scores(v[:3], prompts[:3]).double()
    assert torch.allclose(z, (raw.double() - torch.tensor([1.0, 0.0, -1.0], dtype=D)) / torch.tensor([2.0, 1.0, 0.5], dtype=D),
                          atol=1e-5)


def test_reward_saliency_is_a_pixel_gradient_on_the_object(sw_clips):
    from studio.teachers.rewards import ShapeWorldReward
    from studio.world.clips import sample_clips

    prompts, v = sw_clips
    R = ShapeWorldReward()
    scores, sal = R.saliency(v[:2], prompts[:2])
    assert sal.shape == (2, 3, *v.shape[1:2], *v.shape[-2:]) and (sal >= 0).all() and not sal.requires_grad
    assert torch.allclose(scores, R.scores(v[:2], prompts[:2]))
    # it is |d logit / d pixel| over RGB: check one pixel by a finite difference
    x = v[:1].double()
    _, s1 = R.saliency(x, prompts[:1])
    b, f, i, j = 0, 2, *torch.nonzero(s1[0, 1, 2] == s1[0, 1, 2].max())[0].tolist()
    h = 1e-6
    num = []
    for ch in range(3):
        xp, xm = x.clone(), x.clone()
        xp[b, f, ch, i, j] += h
        xm[b, f, ch, i, j] -= h
        num.append((R.logits(xp, prompts[:1])[0, 1] - R.logits(xm, prompts[:1])[0, 1]) / (2 * h))
    assert abs(float(torch.stack(num).norm()) - float(s1[0, 1, 2, i, j])) < 1e-4 * float(s1[0, 1, 2, i, j]) + 1e-8
    # the saliency lies on and around the object, so Stream-R1's W puts its mass there
    mask = sample_clips(len(prompts), seed=3, prompts=prompts)["mask"][:2]
    near = F.max_pool2d(mask.flatten(0, 1)[:, None], 5, 1, 2)[:, 0].reshape(mask.shape) > 0.05
    for a in range(3):
        inside = (sal[:, a] * near).sum() / sal[:, a].sum()
        assert inside > 0.9, (a, inside)
    from studio.distill.reward_weighting import fuse_saliency, intra_perplexity_weights
    W = intra_perplexity_weights(fuse_saliency(sal, scores))
    assert W[near].mean() > 1.5 * W[~near].mean()


def test_videoalign_reward_loads_a_tiny_qwen2vl_by_path(tmp_path):
    import json

    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from studio.teachers.rewards import VideoAlignReward

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    save_file({"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, str(tmp_path / "reward_head.safetensors"))
    stats = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 1.0, "TA_mean": 0.0, "TA_std": 4.0}
    (tmp_path / "model_config.json").write_text(json.dumps({"inference_config": stats, "use_norm": True,
                                                            "reward_token_ids": [294, 295, 296]}))
    R = VideoAlignReward(tmp_path)
    assert not any(p.requires_grad for p in R.parameters())
    v = torch.rand(2, 5, 3, 30, 34, generator=torch.Generator().manual_seed(0))
    raw = R.logits(v, ["a red ball moving left", "a blue cube bouncing"])
    assert raw.shape == (2, 3) and torch.isfinite(raw).all()
    z = R.scores(v, ["a red ball moving left", "a blue cube bouncing"])
    assert torch.allclose(z, (raw - torch.tensor([0.5, -0.5, 0.0])) / torch.tensor([2.0, 1.0, 4.0]), atol=1e-5)
    scores, sal = R.saliency(v, ["a red ball moving left", "a blue cube bouncing"])
    assert sal.shape == (2, 3, 5, 30, 34) and (sal >= 0).all() and sal.sum() > 0
    assert (sal.flatten(3).sum(-1) > 0).all()                      # every axis sees every frame (padding included)
