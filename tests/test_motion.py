"""MCM's motion representations (studio.distill.motion): spec 2.3, properties 3 and 4 of spec 2.8."""
import math

import pytest
import torch
from test_video_samplers import GaussVideoTeacher, eps_teacher

from studio.distill.consistency import consistency_distance, latent_consistency_loss
from studio.distill.motion import (
    EMATarget,
    LearnedMotionHead,
    freq_high,
    freq_low,
    gaussian_lowpass_3d,
    make_motion,
    motion_norm_ratio,
    temporal_diff,
)
from studio.errors import UserError


def _clips(seed=0, shape=(2, 4, 6, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------------- property 3: zero-init head
@pytest.mark.parametrize("variant", ["learn", "hlearn"])
def test_property3_zero_init_head_is_identity_so_learn_loss_equals_raw_loss(variant):
    teacher = eps_teacher(res=8, frames=4)
    student = GaussVideoTeacher(teacher.schedule, res=8, frames=4, gain=0.9)
    student.gain.requires_grad_(True)
    cond = teacher.encode_prompt(["a", "b"])
    x0 = torch.randn(2, 3, 4, 8, 8)
    phi, phi_t, _ = make_motion(variant, channels=3)
    y = torch.randn(2, 3, 4, 8, 8)
    assert torch.equal(phi(y), y) and torch.equal(phi_t(y), y)
    l_raw, _ = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(1))
    l_learn, _ = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(1),
                                            motion=(phi, phi_t))
    assert torch.equal(l_learn, l_raw)
    # gradients flow into the student and into the head (its zero-initialised last layer), not the target
    l_learn.backward()
    assert student.gain.grad is not None and float(student.gain.grad.abs()) > 0
    last = phi.h[-1]
    assert last.weight.grad is not None and float(last.weight.grad.abs().sum()) > 0
    assert list(phi_t.parameters()) == []


def test_learned_head_layout_and_ema_target():
    head = LearnedMotionHead(4, "learn")
    convs = [m for m in head.h if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 4, 1, 1), (4, 64, 1, 1)]
    assert isinstance(head.h[0], torch.nn.SiLU) and isinstance(head.h[2], torch.nn.GroupNorm)
    assert head.h[2].num_groups == 32
    h5 = LearnedMotionHead(4, "hlearn")
    convs5 = [m for m in h5.h if isinstance(m, torch.nn.Conv2d)]
    assert len(convs5) == 5 and all(c.kernel_size == (3, 3) for c in convs5)
    # per-frame: frames do not mix
    phi, phi_t, update = make_motion("learn", 4, ema_decay=0.95)
    with torch.no_grad():
        phi.h[-1].weight.normal_()
    z = torch.randn(1, 4, 3, 5, 5)
    z2 = z.clone()
    z2[:, :, 2] += 1
    out, out2 = phi(z), phi(z2)
    assert torch.equal(out[:, :, :2], out2[:, :, :2]) and not torch.equal(out[:, :, 2], out2[:, :, 2])
    # the target lags: still the identity until updated, then moves 5 % of the way
    assert torch.equal(phi_t(z), z)
    w_live = phi.h[-1].weight.detach().clone()
    update()
    shadow = dict(zip(phi_t.ema.names, phi_t.ema.shadow))
    torch.testing.assert_close(shadow["h.4.weight"], 0.05 * w_live)
    with torch.no_grad():
        ref = torch.func.functional_call(phi, shadow, (z,))
    torch.testing.assert_close(phi_t(z), ref)
    assert not torch.allclose(phi_t(z), z) and not torch.allclose(phi_t(z), phi(z))
    assert isinstance(phi_t, EMATarget) and phi_t.ema.num_updates == 1
    phi_t.double()  # .to() moves the shadow weights
    assert phi_t.ema.shadow[0].dtype == torch.float64
    assert motion_norm_ratio(make_motion("learn", 4).phi, z) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- property 4: diff invariance
def test_property4_diff_ignores_frame_constant_offsets_raw_does_not():
    y, yt = _clips(1)
    A = torch.randn(2, 4, 1, 8, 8).expand(2, 4, 6, 8, 8)  # the same for every frame
    diff = make_motion("diff")
    base = consistency_distance(y, yt, motion=(diff.phi, diff.phi_target))
    shifted = consistency_distance(y + A, yt + 2 * A, motion=(diff.phi, diff.phi_target))
    torch.testing.assert_close(shifted, base, atol=1e-6, rtol=1e-5)
    raw = make_motion("raw")
    assert abs(float(consistency_distance(y + A, yt + 2 * A, motion=raw)) -
               float(consistency_distance(y, yt, motion=raw))) > 1e-2
    assert temporal_diff(y).shape == (2, 4, 5, 8, 8)
    torch.testing.assert_close(temporal_diff(y)[:, :, 2], y[:, :, 3] - y[:, :, 2])
    with pytest.raises(UserError):
        temporal_diff(y[:, :, :1])


# ----------------------------------------------------------------------------------- frequency filters
def test_frequency_filters_are_freeinit_gaussians():
    H = gaussian_lowpass_3d(6, 8, 8, d_s=0.25, d_t=0.25)
    assert H.shape == (6, 8, 8) and float(H[0, 0, 0]) == 1.0  # DC passes
    assert float(H[3, 0, 0]) == pytest.approx(math.exp(-8), rel=1e-5)  # temporal Nyquist: (2f)^2 = 1
    assert float(H[0, 4, 4]) == pytest.approx(math.exp(-16), rel=1e-5)
    assert float(gaussian_lowpass_3d(6, 8, 8, d_s=0.25, d_t=0.5)[3, 0, 0]) == pytest.approx(math.exp(-2), rel=1e-5)
    y, _ = _clips(2)
    torch.testing.assert_close(freq_low(y) + freq_high(y), y)
    const = torch.full((1, 4, 6, 8, 8), 0.7)
    torch.testing.assert_close(freq_low(const), const)
    assert float(freq_high(const).abs().max()) < 1e-6
    # a pure temporal-Nyquist flicker is attenuated by exactly H
    f = torch.arange(6.0)
    flicker = torch.cos(math.pi * f).reshape(1, 1, 6, 1, 1).expand(1, 4, 6, 8, 8)
    torch.testing.assert_close(freq_low(flicker), math.exp(-8) * flicker, atol=1e-6, rtol=1e-4)
    m = make_motion("freql")
    torch.testing.assert_close(m.phi(y), freq_low(y))
    assert make_motion("freq_high").phi(y).dtype == y.dtype
    with pytest.raises(UserError):
        make_motion("lcor")
