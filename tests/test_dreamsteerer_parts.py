"""DreamSteerer's foundations (issue 21 parts 2-3): DDS / DDS-S / DDS-SM (studio.distill.dds) and EDSD, the
mode-shift loss and spatial-feature-guided sampling (studio.distill.edsd), against the CPU-testable properties
of spec dreamsteerer.md section 11 (numbers in the test names). Exact claims run in float64 on a tiny
``UNet2DConditionModel``; the real path runs a tiny SD pipeline saved with ``save_pretrained`` and loaded by
path through ``load_teacher``."""
from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import make_tiny_sd

from studio.distill.dds import (
    AdaptersOff,
    CrossAttentionCapture,
    cfg_combine,
    dds,
    dds_step_size,
    ema_mask,
    sample_dds_timesteps,
    subject_mask,
    token_indices,
)
from studio.distill.edsd import (
    SelfAttentionFeatures,
    ddim_step,
    ddim_timesteps,
    edsd,
    edsd_surrogate,
    feature_energy,
    feature_guided_ddim,
    mode_shift_loss,
    source_feature_trajectory,
    steering_loss,
)
from studio.students.lora_score import add_lora_adapter
from studio.teachers.base import ImageTeacher, TextCond
from studio.teachers.registry import load_teacher
from studio.teachers.schedule import NoiseSchedule

L, D, S = 8, 16, 8  # text tokens, embedding width, latent side


def tiny_unet(seed: int = 0, dtype=torch.float64):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=S, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=D, attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True)
    return unet.to(dtype).eval()


class UNetTeacher(ImageTeacher):
    """The teacher protocol around a bare UNet (float64 for exact claims), with peft adapter toggling."""

    def __init__(self, unet, schedule=None, name="tiny"):
        super().__init__()
        self.unet = unet
        self.schedule = schedule or NoiseSchedule.ddpm_scaled_linear()
        self.name = name
        self.freeze()

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        return self.unet(x_t, t, encoder_hidden_states=embeds.to(x_t.dtype), return_dict=False)[0]

    @contextlib.contextmanager
    def lora_disabled(self):
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()


def add_lora(teacher, std=0.0, seed=0, name="personal"):
    """peft LoRA on the teacher's UNet; ``std > 0`` sets A and B to random values (non-zero adapter)."""
    add_lora_adapter(teacher.unet, rank=4, adapter_name=name, seed=seed)
    params = []
    gen = torch.Generator().manual_seed(seed + 100)
    for n, p in teacher.unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            if std:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
            params.append(p)
    return params


def cond(seed, B=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, L, D, generator=g, dtype=dtype)
    neg = torch.randn(1, L, D, generator=torch.Generator().manual_seed(999), dtype=dtype).expand(B, L, D)
    return TextCond(e, neg.clone(), [f"p{seed}"] * B)


def lat(seed, B=1, dtype=torch.float64):
    return torch.randn(B, 4, S, S, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def pre():
    return UNetTeacher(tiny_unet(0))


@pytest.fixture()
def personal():
    """The same architecture with a non-zero LoRA (the personalised model); pretrained = AdaptersOff."""
    t = UNetTeacher(tiny_unet(0))
    params = add_lora(t, std=0.05)
    return t, params


# ---------------------------------------------------------------------------------------------- DDS
@pytest.mark.parametrize("w", [0.0, 1.0, 7.5, 100.0])
def test_01_dds_identity_is_exactly_zero_with_shared_noise_and_t(pre, w):
    z, y = lat(1, 2), cond(3)
    t = torch.tensor([50, 700])
    out = dds(pre, z.clone().requires_grad_(True), z, y, y, t, guidance_scale=w, generator=torch.Generator().manual_seed(123))
    assert torch.equal(out.grad, torch.zeros_like(z))
    # can fail: a different edited latent (or branch-specific noise) gives a non-zero delta
    out2 = dds(pre, z + 0.1, z, y, y, t, guidance_scale=w, noise=out.noise)
    assert out2.grad.abs().max() > 1e-6


def test_02_unconditional_limit_any_prompts(pre):
    z = lat(2)
    t = torch.tensor([400])
    out = dds(pre, z, z, cond(4), cond(5), t, guidance_scale=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.grad, torch.zeros_like(z))
    assert dds(pre, z, z, cond(4), cond(5), t, guidance_scale=1.0, noise=out.noise).grad.abs().max() > 1e-6


def test_03_cfg_one_is_conditional_only(pre):
    z, y, t = lat(3), cond(6), torch.tensor([300])
    u, c = pre.predict_branches(z, t, y)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(u + 1.0 * (c - u), c, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(pre.predict(z, t, y, guidance_scale=1.0), c, rtol=0, atol=1e-12)


def test_04_dds_s_textual_inversion_correction_is_a_no_op(pre):
    """TI leaves the UNet alone and y_src has no new token: a separate 'pretrained' teacher on the same UNet
    gives bit-identical DDS-S and naive DDS."""
    pretrained = UNetTeacher(pre.unet, name="pretrained")
    z0, z, y, ys, t = lat(4), lat(5), cond(7), cond(8), torch.tensor([600])
    naive = dds(pre, z, z0, y, ys, t, generator=torch.Generator().manual_seed(2))
    ddss = dds(pre, z, z0, y, ys, t, source_teacher=pretrained, noise=naive.noise)
    assert torch.equal(naive.grad, ddss.grad)


class GaussTeacher(ImageTeacher):
    """Toy Gaussian world: prompt embedding = data mean mu (data ~ N(mu, s^2 I)); the optimal epsilon is
    ``sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)``. ``drift`` is added to the mean of the class prompt
    ``class_mean`` (the personalised model's source score bias)."""

    def __init__(self, class_mean, drift=None, s=0.5):
        super().__init__()
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.class_mean, self.drift, self.s = class_mean, drift, s

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        mu = embeds.clone()
        if self.drift is not None:
            is_class = (embeds == self.class_mean).flatten(1).all(1)
            mu[is_class] = mu[is_class] + self.drift
        a, sg = self.schedule.alpha(t, x_t), self.schedule.sigma(t, x_t)
        return sg * (x_t - a * mu) / (a ** 2 * self.s ** 2 + sg ** 2)


def test_03b_source_bias_correction_cancels_the_bias_in_a_gaussian_world():
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, S, S)
    mu_cls, mu_concept, mu_null = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    bias = 0.7 * torch.randn(shape, generator=g, dtype=torch.float64)
    pretrained = GaussTeacher(mu_cls)
    personal = GaussTeacher(mu_cls, drift=bias)
    y = TextCond(mu_concept, mu_null, ["a V* cat"])
    ys = TextCond(mu_cls.clone(), mu_null, ["a cat"])
    z_src = torch.randn(shape, generator=g, dtype=torch.float64)
    z = z_src + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    t, w = torch.tensor([500]), 7.5
    naive = dds(personal, z, z_src, y, ys, t, guidance_scale=w, generator=g)
    ddss = dds(personal, z, z_src, y, ys, t, guidance_scale=w, source_teacher=pretrained, noise=naive.noise)
    ideal = dds(pretrained, z, z_src, y, ys, t, guidance_scale=w, noise=naive.noise)  # concept's true score
    torch.testing.assert_close(ddss.grad, ideal.grad, rtol=0, atol=1e-12)  # bias gone
    a, sg = pretrained.schedule.alpha(t, z), pretrained.schedule.sigma(t, z)
    expected_bias = w * sg * a * bias / (a ** 2 * 0.25 + sg ** 2)  # naive - corrected, in closed form
    torch.testing.assert_close(naive.grad - ddss.grad, expected_bias, rtol=1e-10, atol=1e-12)
    assert expected_bias.abs().max() > 1e-3


def test_03c_dds_s_with_lora_uses_the_adapter_free_model(personal):
    teacher, _ = personal
    z0, z, y, ys, t = lat(6), lat(7), cond(9), cond(10), torch.tensor([250])
    ddss = dds(teacher, z, z0, y, ys, t, source_teacher=AdaptersOff(teacher), generator=torch.Generator().manual_seed(3))
    naive = dds(teacher, z, z0, y, ys, t, noise=ddss.noise)
    with torch.no_grad(), teacher.lora_disabled():
        src = teacher.predict(teacher.schedule.add_noise(z0, ddss.noise, t), t, ys, guidance_scale=7.5)
    assert torch.equal(ddss.source_pred, src)
    assert (naive.grad - ddss.grad).abs().max() > 1e-6  # the LoRA's drift on the source prompt
    # the knob: the target branch's unconditional term from the pretrained model changes the target only
    alt = dds(teacher, z, z0, y, ys, t, source_teacher=AdaptersOff(teacher), uncond_model_target="pretrained",
              noise=ddss.noise)
    assert torch.equal(alt.source_pred, ddss.source_pred) and not torch.equal(alt.pred, ddss.pred)


# ------------------------------------------------------------------------------------------ EDSD
def test_05_zero_init_lora_is_a_no_op_and_edsd_gradient_vanishes():
    teacher = UNetTeacher(tiny_unet(0))
    params = add_lora(teacher, std=0.0)  # peft init: B = 0
    z0, y, t = lat(8), cond(11), torch.tensor([500])
    with torch.no_grad():
        x = teacher.schedule.add_noise(z0, lat(9), t)
        on = teacher.predict(x, t, y, guidance_scale=7.5)
        off = AdaptersOff(teacher).predict(x, t, y, guidance_scale=7.5)
    assert torch.equal(on, off)
    out = edsd(teacher, AdaptersOff(teacher), z0, z0, y, y, t, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.pred, out.target)
    out.loss.backward()
    grads = [p.grad for p in params]
    assert all(gr is not None for gr in grads) and all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)
    # can fail: another target prompt gives a non-zero gradient
    for p in params:
        p.grad = None
    edsd(teacher, AdaptersOff(teacher), z0, z0, cond(12), y, t, noise=out.noise).loss.backward()
    assert max(float(p.grad.abs().max()) for p in params) > 0


def test_07_stop_gradients(personal):
    teacher, params = personal
    pretrained = UNetTeacher(tiny_unet(0), name="pretrained")
    for p in pretrained.parameters():  # make the test able to fail: only no_grad keeps them clean
        p.requires_grad_(True)
    z0 = lat(10)
    z = (z0 + 0.1 * lat(11)).requires_grad_(True)
    y, ys, t = cond(13), cond(14), torch.tensor([333])
    out = edsd(teacher, pretrained, z, z0, y, ys, t, generator=torch.Generator().manual_seed(5))
    ms = mode_shift_loss(teacher, lat(12), y, torch.tensor([100]), lat(13))
    steering_loss(out.loss, ms, 1.0).backward()
    assert all(p.grad is None for p in pretrained.parameters())
    assert z.grad is None  # Stage 1: the edited latent gets no gradient
    assert not out.target.requires_grad and not out.direction.requires_grad
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    base = [p for n, p in teacher.unet.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)
    # Stage 2: DDS moves only z, never the LoRA
    for p in params:
        p.grad = None
    z2 = z0.clone().requires_grad_(True)
    dds(teacher, z2, z0, y, ys, t, source_teacher=pretrained, noise=out.noise).loss.backward()
    assert z2.grad is not None and all(p.grad is None for p in params)
    assert all(p.grad is None for p in pretrained.parameters())


def _residual_norm(teacher, src, z, z0, y, ys, t, noise):
    with torch.no_grad():
        o = edsd(teacher, src, z, z0, y, ys, t, noise=noise)
    return float((o.pred - o.target).norm())


def test_08_edsd_sign_and_surrogate_gradient(personal):
    teacher, params = personal
    src = AdaptersOff(teacher)
    z0 = lat(14)
    z, y, ys, t = z0 + 0.05 * lat(15), cond(15), cond(16), torch.tensor([420])
    noise = lat(16)
    # (a) s_J = +1 surrogate gradient == grad of 1/2 mean ||pred - target||^2 (float64 autograd check)
    out = edsd(teacher, src, z, z0, y, ys, t, noise=noise)
    g_sur = torch.autograd.grad(out.loss, params)
    x_t = teacher.schedule.add_noise(z, noise, t)
    pred = teacher.predict(x_t, t, y, guidance_scale=7.5)
    g_ref = torch.autograd.grad(0.5 * ((pred - out.target) ** 2).mean(), params)
    for a, b in zip(g_sur, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    neg = torch.autograd.grad(edsd(teacher, src, z, z0, y, ys, t, noise=noise, jacobian="identity").loss, params)
    for a, b in zip(g_sur, neg):
        torch.testing.assert_close(a, -b, rtol=0, atol=0)
    # (b) one small SGD step: J = -I shrinks the discrepancy, J = +I grows it
    before = _residual_norm(teacher, src, z, z0, y, ys, t, noise)
    theta0 = [p.detach().clone() for p in params]
    results = {}
    for jac in ("minus_identity", "identity"):
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
        g = torch.autograd.grad(edsd(teacher, src, z, z0, y, ys, t, noise=noise, jacobian=jac).loss, params)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.sub_(2.0 * gi)
        results[jac] = _residual_norm(teacher, src, z, z0, y, ys, t, noise)
    assert results["minus_identity"] < before < results["identity"]


def test_08b_jacobian_at_source_evaluates_pred_at_the_source_latent(personal):
    teacher, _ = personal
    src = AdaptersOff(teacher)
    z0, y, ys, t, noise = lat(17), cond(17), cond(18), torch.tensor([600]), lat(18)
    a = edsd(teacher, src, z0 + 1.0, z0, y, ys, t, noise=noise, jacobian_at="source")
    b = edsd(teacher, src, z0, z0, y, ys, t, noise=noise)
    assert torch.equal(a.pred, b.pred)
    eta = 0.05
    c = edsd(teacher, src, z0, z0, y, ys, t, noise=noise, jacobian_at="source", eta=eta)
    torch.testing.assert_close(c.loss, a.loss * eta * teacher.schedule.alpha(t, z0).reshape(()), rtol=1e-12, atol=0)


def test_09_mode_shift_loss_is_the_dreambooth_loss(personal):
    teacher, params = personal
    xg, y, t, noise = lat(19, 2), cond(19, 2), torch.tensor([10, 900]), lat(20, 2)
    loss = mode_shift_loss(teacher, xg, y, t, noise)
    a, s = teacher.schedule.alpha(t, xg), teacher.schedule.sigma(t, xg)
    ref = torch.nn.functional.mse_loss(teacher.unet(a * xg + s * noise, t, encoder_hidden_states=y.embeds).sample, noise)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=0)
    g1 = torch.autograd.grad(loss, params)
    g2 = torch.autograd.grad(ref, params)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u.double(), v, rtol=1e-5, atol=1e-10)
    # lambda_MS = 0: the total gradient is the EDSD gradient
    z0 = lat(21)
    out = edsd(teacher, AdaptersOff(teacher), z0 + 0.1, z0, cond(20), cond(21), torch.tensor([300]), noise=lat(22))
    ge = torch.autograd.grad(out.loss, params, retain_graph=True)
    gt = torch.autograd.grad(steering_loss(out.loss, mode_shift_loss(teacher, xg, y, t, noise), 0.0), params)
    assert all(torch.equal(u, v) for u, v in zip(ge, gt))


# ----------------------------------------------------------------------------------------------- mask
def test_06_mask_limits(personal):
    teacher, _ = personal
    src = AdaptersOff(teacher)
    z0, y, ys, t = lat(23), cond(22), cond(23), torch.tensor([700])
    z = (z0 + 0.2 * lat(24)).requires_grad_(True)
    ref = dds(teacher, z, z0, y, ys, t, source_teacher=src, generator=torch.Generator().manual_seed(6))
    ones = dds(teacher, z, z0, y, ys, t, source_teacher=src, noise=ref.noise, mask=torch.ones(1, 1, S, S))
    assert torch.equal(ones.grad, ref.grad)
    zeros = dds(teacher, z, z0, y, ys, t, source_teacher=src, noise=ref.noise, mask=torch.zeros(1, 1, S, S))
    opt = torch.optim.SGD([z], lr=0.1)
    before = z.detach().clone()
    opt.zero_grad()
    zeros.loss.backward()
    opt.step()
    assert torch.equal(z.detach(), before)
    m = (torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(7)) > 0.5).double()
    masked = dds(teacher, z, z0, y, ys, t, source_teacher=src, noise=ref.noise, mask=m)
    opt.zero_grad()
    masked.loss.backward()
    opt.step()
    step = z.detach() - before
    off = (m == 0).expand_as(step)
    assert torch.equal(step[off], torch.zeros_like(step[off]))
    assert step[~off].abs().max() > 0  # can fail: the mask passes the gradient where it is 1


def test_06b_subject_mask_and_ema():
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 1:3, 1:3] = 1.0
    maps[1] = torch.arange(16.0).reshape(1, 4, 4)
    hard = subject_mask(maps, threshold=0.5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and hard[0].sum() == 4 and hard[1].sum() == 8
    soft = subject_mask(maps, threshold=None)
    assert soft.min() == 0 and soft.max() == 1
    dil = subject_mask(maps[:1], threshold=0.5, dilate=1)
    assert dil.sum() == 16  # the 2x2 square grows by one pixel on each side
    assert torch.equal(subject_mask(torch.ones(1, 1, 3, 3)), torch.ones(1, 1, 3, 3))
    e = ema_mask(None, maps)
    assert torch.equal(e, maps)
    torch.testing.assert_close(ema_mask(e, torch.zeros_like(maps), 0.75), 0.75 * maps)


# -------------------------------------------------------------------- the real path: tiny SD by path
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return load_teacher(str(make_tiny_sd(tmp_path_factory.mktemp("ds") / "sd", sample_size=8)))


def test_11_cross_attention_capture_shapes_and_masked_dds_on_a_real_pipeline(sd):
    y = sd.encode_prompt("a photo of a red cube")
    ys = sd.encode_prompt("a photo of a cube")
    k = token_indices(sd.tokenizer, "a photo of a cube", "cube")
    assert len(k) >= 1
    with pytest.raises(ValueError, match="horse"):
        token_indices(sd.tokenizer, "a photo of a cube", "horse")
    h = sd.unet.config.sample_size
    z0 = torch.randn(2, 4, h, h, generator=torch.Generator().manual_seed(0))
    z = z0 + 0.2 * torch.randn(2, 4, h, h, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 600])
    plain = dds(sd, z, z0, y, ys, t, generator=torch.Generator().manual_seed(2))
    before = dict(sd.unet.attn_processors)
    with CrossAttentionCapture(sd, k) as cap:
        out = dds(sd, z, z0, y, ys, t, noise=plain.noise, source_capture=cap)
        n_attn2 = sum(".attn2." in n and not n.startswith("mid_block") for n in sd.unet.attn_processors)
    assert dict(sd.unet.attn_processors) == before  # processors restored
    assert torch.equal(out.grad, plain.grad)  # capturing does not change the prediction
    assert len(cap.records) == n_attn2  # the source call only (CFG: one batched call)
    for r in cap.records:
        n_heads = r.probs.shape[1]
        assert r.full_shape == (2 * 2 * n_heads, r.probs.shape[2], 77)  # (2B * heads, h_l w_l, 77)
        assert r.probs.shape[0] == 4 and r.probs.shape[3] == len(k)
    assert out.attn_maps.shape == (2, 1, h, h)
    mask = subject_mask(out.attn_maps, threshold=0.4)
    assert mask.shape == (2, 1, h, h) and mask.min() >= 0 and mask.max() <= 1
    # both branches captured on one shared UNet (source: 'cube' in y_src; target: 'red' in y), union mask
    kt = token_indices(sd.tokenizer, "a photo of a red cube", "red")
    with CrossAttentionCapture(sd, k) as cs, CrossAttentionCapture(sd, kt) as ct:
        both = dds(sd, z, z0, y, ys, t, noise=plain.noise, source_capture=cs, target_capture=ct)
    assert dict(sd.unet.attn_processors) == before
    assert len(cs.records) == len(ct.records) == n_attn2
    torch.testing.assert_close(both.attn_maps, out.attn_maps, rtol=0, atol=1e-6)
    assert both.target_attn_maps.shape == (2, 1, h, h) and not torch.allclose(both.target_attn_maps, both.attn_maps)
    union = torch.maximum(subject_mask(both.attn_maps), subject_mask(both.target_attn_maps))
    assert bool((union >= mask).all()) and torch.equal(both.grad, plain.grad)


def test_11b_captured_probabilities_are_softmax_rows(sd):
    y = sd.encode_prompt("a red cube")
    with CrossAttentionCapture(sd, list(range(77)), sides=("down", "mid", "up")) as cap:
        with cap.recording(), torch.no_grad():
            sd.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), y, guidance_scale=1.0)
    assert len(cap.records) == sum(".attn2." in n for n in sd.unet.attn_processors)
    for r in cap.records:
        torch.testing.assert_close(r.probs.sum(-1), torch.ones_like(r.probs.sum(-1)), rtol=0, atol=1e-5)
    maps = cap.maps((8, 8))
    assert maps.shape == (1, 1, 8, 8)


def test_05b_real_pipeline_dds_s_with_zero_lora_equals_pretrained(sd):
    add_lora_adapter(sd.unet, rank=2, adapter_name="steer", seed=0)
    try:
        y, ys = sd.encode_prompt("a red cube"), sd.encode_prompt("a cube")
        z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        a = dds(sd, z0, z0, y, ys, torch.tensor([400]), source_teacher=AdaptersOff(sd),
                generator=torch.Generator().manual_seed(4))
        b = dds(sd, z0, z0, y, ys, torch.tensor([400]), noise=a.noise)
        assert torch.equal(a.grad, b.grad)
    finally:
        sd.unet.delete_adapters("steer")


# ------------------------------------------------------------------------------------ guided sampling
def _plain_ddim(teacher, x, y, ts, w):
    """An independent DDIM loop (x0 form) for the bit-identity checks."""
    sch = teacher.schedule
    for i, tv in enumerate(ts):
        t = torch.full((x.shape[0],), tv)
        with torch.no_grad():
            eps = teacher.predict(x, t, y, guidance_scale=w)
            x0 = (x - sch.sigma(t, x) * eps) / sch.alpha(t, x)
            x = x0 if i + 1 == len(ts) else sch.alpha(torch.full_like(t, ts[i + 1]), x) * x0 + \
                sch.sigma(torch.full_like(t, ts[i + 1]), x) * eps
    return x


def test_10_guided_sampling_limits():
    teacher = UNetTeacher(tiny_unet(1))
    y, ys = cond(30), cond(31)
    ts = ddim_timesteps(teacher.schedule, 4)
    assert ts == [999, 749, 499, 249]
    xT = lat(30)
    plain = _plain_ddim(teacher, xT, y, ts, 3.0)
    assert torch.equal(feature_guided_ddim(teacher, xT, y, ts, guidance_scale=3.0, rho=0.0), plain)
    with SelfAttentionFeatures(teacher, layers=("up_blocks.0",)) as feats:
        assert torch.equal(feature_guided_ddim(teacher, xT, y, ts, guidance_scale=3.0, rho=2.0, tau=0.0,
                                               features=feats, source_features=None), plain)
        # features of the sample's own trajectory: zero energy gradient, so guidance changes nothing
        own, x = [], xT
        for i, tv in enumerate(ts):
            t = torch.full((1,), tv)
            with feats.recording() as f, torch.no_grad():
                teacher.predict(x, t, y, guidance_scale=1.0)
            own.append([v.detach() for v in f])
            with torch.no_grad():
                eps = teacher.predict(x, t, y, guidance_scale=3.0)
            x = ddim_step(teacher.schedule, x, eps, t, torch.full((1,), ts[i + 1]) if i + 1 < len(ts) else None)
        torch.testing.assert_close(x, plain, rtol=0, atol=1e-12)
        guided_own = feature_guided_ddim(teacher, xT, y, ts, guidance_scale=3.0, rho=5.0, tau=1.0, features=feats,
                                         source_features=own)
        torch.testing.assert_close(guided_own, plain, rtol=0, atol=1e-12)
        # can fail: the source image's features pull the sample elsewhere
        src_feats = source_feature_trajectory(teacher, lat(31), ys, ts, feats)
        assert len(src_feats) == len(ts) and all(len(f) == len(own[0]) == 4 for f in src_feats)  # q + k of 2 layers
        guided = feature_guided_ddim(teacher, xT, y, ts, guidance_scale=3.0, rho=5.0, tau=0.5, features=feats,
                                     source_features=src_feats)
        assert (guided - plain).abs().max() > 1e-4
    assert all(not type(p).__name__.startswith("_") for p in teacher.unet.attn_processors.values())


def test_10b_feature_energy_gradient_stops_at_the_source():
    f = torch.randn(2, 5, requires_grad=True)
    s = torch.randn(2, 5, requires_grad=True)
    e = feature_energy([f], [s])
    e.backward()
    assert s.grad is None and torch.allclose(f.grad, 2 * (f - s).detach() / f.numel())


# ------------------------------------------------------------------------------------- misc properties
def test_12_timesteps_and_add_noise_at_zero():
    t = sample_dds_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 50 and int(t.max()) < 949 and int(t.max()) == 948 and int(t.min()) == 50
    sch = NoiseSchedule.ddpm_scaled_linear()
    z = lat(40)
    # the spec's 5-decimal value: half a unit in its last place, plus the float32 rounding of alpha
    torch.testing.assert_close(sch.alpha(torch.tensor([0]))[0].double(), torch.tensor(0.99957, dtype=torch.float64),
                               rtol=0, atol=5e-6 + torch.finfo(torch.float32).eps)
    assert (sch.add_noise(z, lat(41), torch.tensor([0])) - z).abs().max() < 0.2


def test_13_effective_dds_step_is_closed_form():
    H = W = 64
    eta = dds_step_size(H, W)
    assert abs(eta - 0.1 * 2000 / 4096) < 1e-15 and abs(eta - 0.048828125) < 1e-15
    from studio.distill.inject import inject_gradient

    z = torch.randn(1, 4, H, W, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 4, H, W, dtype=torch.float64)
    z0 = z.detach().clone()
    opt = torch.optim.SGD([z], lr=0.1)
    inject_gradient(z, g, scale=2000 / (H * W)).backward()
    opt.step()
    # (z0 + step) - z0 in float64: the rounding of one addition, 4 ulps of |z|
    torch.testing.assert_close(z.detach() - z0, -eta * g, rtol=0,
                               atol=4 * torch.finfo(torch.float64).eps * float(z0.abs().max()))


def _tiny_run(seed):
    """Stage 1 (2 EDSD + mode-shift steps on a fresh LoRA) then Stage 2 (3 DDS-SM steps), seeded."""
    teacher = UNetTeacher(tiny_unet(0))
    params = add_lora(teacher, std=0.0, seed=seed)
    src = AdaptersOff(teacher)
    gen = torch.Generator().manual_seed(seed)
    z0, y, ys, xg = lat(50), cond(50), cond(51), lat(52)
    opt = torch.optim.AdamW(params, lr=1e-3)
    z = z0.clone()
    for _ in range(2):
        t = sample_dds_timesteps(1, generator=gen)
        out = edsd(teacher, src, z, z0, y, ys, t, generator=gen)
        z = z - 0.05 * out.direction
        ms = mode_shift_loss(teacher, xg, y, sample_dds_timesteps(1, 0, 1000, gen),
                             torch.randn(xg.shape, generator=gen, dtype=xg.dtype))
        opt.zero_grad()
        steering_loss(out.loss, ms).backward()
        opt.step()
    z = z0.clone().requires_grad_(True)
    sgd = torch.optim.SGD([z], lr=0.1)
    mask = torch.ones(1, 1, S, S, dtype=torch.float64)
    mask[..., :2] = 0
    for _ in range(3):
        d = dds(teacher, z, z0, y, ys, sample_dds_timesteps(1, generator=gen), source_teacher=src, mask=mask,
                generator=gen)
        sgd.zero_grad()
        d.loss.backward()
        sgd.step()
    return z.detach(), [p.detach().clone() for p in params]


def test_14_determinism_of_a_tiny_stage1_stage2_run():
    a, pa = _tiny_run(0)
    b, pb = _tiny_run(0)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(pa, pb))
    assert not torch.equal(a, lat(50)) and any(float(p.abs().max()) > 0 for p in pa[1::2])  # it did move


def test_15_linearity_in_the_weight(personal):
    teacher, params = personal
    src = AdaptersOff(teacher)
    z0, y, ys, t, noise = lat(60), cond(60), cond(61), torch.tensor([480]), lat(61)
    z = z0 + 0.1 * lat(62)
    d1 = dds(teacher, z, z0, y, ys, t, source_teacher=src, noise=noise)
    d3 = dds(teacher, z, z0, y, ys, t, source_teacher=src, noise=noise, scale=3.0)
    torch.testing.assert_close(d3.grad, 3.0 * d1.grad, rtol=1e-14, atol=0)
    g1 = torch.autograd.grad(edsd(teacher, src, z, z0, y, ys, t, noise=noise).loss, params)
    g3 = torch.autograd.grad(edsd(teacher, src, z, z0, y, ys, t, noise=noise, weight=3.0).loss, params)
    for u, v in zip(g1, g3):
        torch.testing.assert_close(v, 3.0 * u, rtol=1e-12, atol=1e-16)
    # per-sample weights [B]
    wv = torch.tensor([2.0], dtype=torch.float64)
    g2 = torch.autograd.grad(edsd(teacher, src, z, z0, y, ys, t, noise=noise, weight=wv).loss, params)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(v, 2.0 * u, rtol=1e-12, atol=1e-16)


def test_edsd_surrogate_checks_inputs():
    p = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="jacobian"):
        edsd_surrogate(p, p, jacobian="plus")
    with pytest.raises(ValueError, match="shape"):
        edsd_surrogate(p, torch.zeros(1, 4, 2, 3))
    with pytest.raises(ValueError, match="mask"):
        edsd_surrogate(p, p, mask=torch.ones(1, 1, 3, 3))


def test_11c_shapeworld_unet_subject_mask_finds_the_object():
    """The embedded trained teacher: the source branch's cross-attention on the subject noun, thresholded,
    overlaps the ground-truth silhouette of a ShapeWorld render (IoU > 0.8); a constant map (no capture
    signal) would give the all-ones mask, whose IoU is the object's area fraction."""
    from studio.world.references import reference_views

    teacher = load_teacher("shapeworld-unet")
    views = reference_views("red_cube", n_azimuth=2, elevations=(0.0,), size=32)
    img, alpha = views["images"].permute(0, 3, 1, 2), (views["alphas"].permute(0, 3, 1, 2) > 0.5).float()
    x = teacher.encode(img)
    ys = teacher.encode_prompt("a red cube")
    with CrossAttentionCapture(teacher, token_indices(teacher.tokenizer, "a red cube", "cube")) as cap:
        out = dds(teacher, x, x, ys, ys, torch.full((2,), 200), source_capture=cap,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.grad, torch.zeros_like(x))  # property 1 on the real teacher
    mask = subject_mask(out.attn_maps, threshold=0.5)
    iou = (mask * alpha).sum((1, 2, 3)) / (mask + alpha).clamp(max=1).sum((1, 2, 3))
    assert float(alpha.mean()) < 0.6 and bool((iou > 0.8).all()), iou


def test_06c_mask_in_steering_restricts_the_residual(personal):
    """Knob (spec 12.7): the subject mask may also restrict the EDSD residual; M = 1 is no mask, M = 0 no step."""
    teacher, params = personal
    src = AdaptersOff(teacher)
    z0, y, ys, t, noise = lat(70), cond(70), cond(71), torch.tensor([520]), lat(71)
    g = torch.autograd.grad(edsd(teacher, src, z0 + 0.1, z0, y, ys, t, noise=noise).loss, params)
    g1 = torch.autograd.grad(edsd(teacher, src, z0 + 0.1, z0, y, ys, t, noise=noise,
                                  mask=torch.ones(1, 1, S, S, dtype=torch.float64)).loss, params)
    g0 = torch.autograd.grad(edsd(teacher, src, z0 + 0.1, z0, y, ys, t, noise=noise,
                                  mask=torch.zeros(1, 1, S, S, dtype=torch.float64)).loss, params)
    assert all(torch.equal(a, b) for a, b in zip(g, g1))
    assert all(torch.equal(b, torch.zeros_like(b)) for b in g0) and max(float(a.abs().max()) for a in g) > 0


def test_10c_guidance_term_has_rms_rho_sigma():
    from studio.distill.edsd import guided_epsilon

    eps = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    grad = torch.randn(2, 4, 3, 3, dtype=torch.float64) * torch.tensor([0.1, 1e3], dtype=torch.float64).reshape(2, 1, 1, 1)
    sigma = torch.tensor([0.5, 0.9], dtype=torch.float64)
    d = guided_epsilon(eps, grad, sigma, rho=2.0) - eps
    rms = d.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, 2.0 * sigma, rtol=1e-6, atol=0)
    assert (d * grad).sum() > 0  # along +grad E: the DDIM step then moves x_{t-1} down the energy
    assert torch.equal(guided_epsilon(eps, grad, sigma, rho=0.0), eps)
