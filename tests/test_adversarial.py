"""MCM's adversarial parts (studio.distill.adversarial): properties 7 (D/G stop-gradients), 8 and 9 of spec 2.8,
the DINOv2 backbone (a tiny random ``Dinov2Model`` saved to a temp folder and loaded by path), the projected
discriminator, DiffAugment, the gradient penalty and its adaptive weight, frame sampling and decoding."""
import copy
import itertools
import math

import pytest
import torch
from test_video_samplers import GaussVideoTeacher, eps_teacher

from studio.distill.adversarial import (
    AdaptiveGPWeight,
    Dinov2Backbone,
    FeatureBackbone,
    ProjectedDiscriminator,
    ShapeWorldFeatureBackbone,
    d_loss,
    decode_random_frames,
    diff_augment,
    g_loss,
    gradient_penalty,
    tsn_frame_indices,
    video_frames,
)
from studio.distill.consistency import latent_consistency_loss
from studio.errors import UserError
from studio.world.clips import degrade, hq_images, sample_clips


def _disc(text_dim=6, seed=0):
    return ProjectedDiscriminator(ShapeWorldFeatureBackbone((8, 16), seed=1), text_dim, cmap_dim=64, seed=seed)


# ----------------------------------------------------------------------------------- property 8: floored WGAN
def test_property8_floored_wgan_bounds_and_dead_gradients():
    real = torch.tensor([-3.0, -0.5, 0.2, 0.99, 1.5, 7.0], requires_grad=True)
    fake = torch.tensor([-9.0, -1.5, -0.3, 0.4, 2.0, 5.0], requires_grad=True)
    loss = d_loss(real, fake, "wgan")
    expected = torch.clamp(-real, min=-1).mean() + torch.clamp(fake, min=-1).mean()
    torch.testing.assert_close(loss, expected)
    gr, gf = torch.autograd.grad(loss, [real, fake])
    assert torch.equal(gr[real > 1], torch.zeros(2)) and bool((gr[real < 1] == -1 / 6).all())
    assert torch.equal(gf[fake < -1], torch.zeros(2)) and bool((gf[fake > -1] == 1 / 6).all())
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r, f = torch.randn(50, generator=g) * 10, torch.randn(50, generator=g) * 10
        assert float(d_loss(r, f, "wgan")) >= -2
    assert float(d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0), "wgan")) == -2.0
    # the other kinds and the generator losses
    r, f = torch.randn(10, generator=g), torch.randn(10, generator=g)
    torch.testing.assert_close(d_loss(r, f, "hinge"), torch.relu(1 - r).mean() + torch.relu(1 + f).mean())
    torch.testing.assert_close(d_loss(r, f, "bce"),
                               -torch.log(torch.sigmoid(r)).mean() - torch.log(1 - torch.sigmoid(f)).mean())
    torch.testing.assert_close(g_loss(f, "wgan"), -f.mean())
    torch.testing.assert_close(g_loss(f, "hinge"), -f.mean())
    torch.testing.assert_close(g_loss(f, "bce"), -torch.log(torch.sigmoid(f)).mean())
    with pytest.raises(UserError):
        d_loss(r, f, "lsgan")


# ----------------------------------------------------------------------------------- property 9: TSN
def test_property9_tsn_one_index_per_contiguous_segment_increasing():
    g = torch.Generator().manual_seed(0)
    for F, n in itertools.product([2, 5, 8, 16, 17], [1, 2, 3, 5]):
        if n > F:
            with pytest.raises(UserError):
                tsn_frame_indices(F, n, g)
            continue
        seen = set()
        for _ in range(60):
            idx = tsn_frame_indices(F, n, g)
            assert idx.dtype == torch.long and idx.shape == (n,)
            assert bool((idx[1:] > idx[:-1]).all())
            for i, v in enumerate(idx.tolist()):
                assert (i * F) // n <= v < ((i + 1) * F) // n  # inside segment i
            seen.update(idx.tolist())
        assert seen == set(range(F)) or F > 8  # small clips: every frame is reachable
    a = tsn_frame_indices(16, 2, torch.Generator().manual_seed(3))
    b = tsn_frame_indices(16, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a[0] < 8 <= a[1]  # MCM: one per half of the clip
    clips = torch.rand(3, 6, 3, 4, 4)
    imgs = video_frames(clips, torch.tensor([1, 4]))
    assert imgs.shape == (6, 3, 4, 4) and torch.equal(imgs[0], clips[0, 1]) and torch.equal(imgs[3], clips[1, 4])


# ----------------------------------------------------------------------------------- DINOv2 backbone by path
def test_dinov2_backbone_tiny_model_loaded_by_path(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       patch_size=7, image_size=28)
    model = Dinov2Model(cfg).eval()
    model.save_pretrained(str(tmp_path / "dino"))
    bb = Dinov2Backbone(tmp_path / "dino", blocks=[1, 2], resolution=28)
    assert isinstance(bb, FeatureBackbone) and bb.channels == (32, 32)
    assert len(bb.model.encoder.layer) == 3  # the unused last block was dropped
    assert all(not p.requires_grad for p in bb.parameters())
    img = torch.rand(2, 3, 20, 20, requires_grad=True)
    feats = bb(img)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 17), (2, 32, 17)]  # CLS + 4x4 patches
    x = torch.nn.functional.interpolate(img.detach(), size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[0], hs[2].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[1], hs[3].transpose(1, 2), atol=1e-5, rtol=1e-5)
    feats[1].sum().backward()
    assert img.grad is not None and float(img.grad.abs().sum()) > 0
    bb.train()
    assert not bb.training
    disc = ProjectedDiscriminator(bb, text_dim=5, seed=0)
    assert disc(torch.rand(3, 3, 28, 28), torch.randn(3, 5)).shape == (3, 34)
    with pytest.raises(UserError):
        Dinov2Backbone(tmp_path / "dino", blocks=[4])
    with pytest.raises(UserError):
        Dinov2Backbone(tmp_path / "dino", resolution=30)
    with pytest.raises(UserError):
        Dinov2Backbone(tmp_path / "missing")


# ----------------------------------------------------------------------------------- discriminator
def test_projected_discriminator_shapes_conditioning_and_state():
    disc = _disc()
    imgs, text = torch.rand(4, 3, 16, 16), torch.randn(4, 6)
    disc.eval()
    logits = disc(imgs, text)
    assert logits.shape == (4, 16 * 16 + 8 * 8)
    torch.testing.assert_close(disc(imgs, text), logits)  # eval: no augmentation, deterministic
    # logit = <feat, cmap> / sqrt(cmap_dim): linear in the text projection
    with torch.no_grad():
        for h in disc.heads:
            h.cmapper.weight.mul_(2)
            h.cmapper.bias.mul_(2)
    torch.testing.assert_close(disc(imgs, text), 2 * logits, atol=1e-5, rtol=1e-5)
    # each head uses spectral-norm 1D convs, a k=9 residual block, and a 64-d projection
    h = disc.heads[0]
    assert h.res.conv.kernel_size == (9,) and h.cls.out_channels == 64
    assert hasattr(h.res.conv, "parametrizations")
    # training: DiffAugment, seeded
    disc.train()
    assert not disc.backbone.training
    twin, twin2 = copy.deepcopy(disc), copy.deepcopy(disc)  # (spectral norm's power iteration runs per call)
    a = disc(imgs, text, generator=torch.Generator().manual_seed(1))
    b = twin(imgs, text, generator=torch.Generator().manual_seed(1))
    c = twin2(imgs, text, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # trainable state = heads only
    sd = disc.state_dict()
    assert sd and all(k.startswith("heads.") for k in sd)
    backbone_ids = {id(p) for p in disc.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in disc.trainable_parameters())
    other = _disc(seed=7)
    other.load_state_dict(sd)
    other.eval()
    disc.eval()
    torch.testing.assert_close(other(imgs, text), disc(imgs, text))
    unc = ProjectedDiscriminator(ShapeWorldFeatureBackbone((8,)), None)
    assert unc(imgs).shape == (4, 256)


def test_diff_augment_translation_cutout_color():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(4)
    y = diff_augment(x, "translation", g)
    g = torch.Generator().manual_seed(4)
    dy = torch.randint(-1, 2, (3,), generator=g)
    dx = torch.randint(-1, 2, (3,), generator=g)
    for b in range(3):
        for i, j in itertools.product(range(8), range(8)):
            si, sj = i - int(dy[b]), j - int(dx[b])
            want = x[b, :, si, sj] if 0 <= si < 8 and 0 <= sj < 8 else torch.zeros(3)
            assert torch.equal(y[b, :, i, j], want)
    y = diff_augment(x, "cutout", torch.Generator().manual_seed(5))
    zero = (y == 0).all(dim=1).float().mean(dim=(1, 2))
    assert bool((zero > 0).all()) and bool((zero <= 0.25 + 1e-6).all())
    xg = x.clone().requires_grad_(True)
    out = diff_augment(xg, "color,translation,cutout", torch.Generator().manual_seed(6))
    out.sum().backward()
    assert out.shape == x.shape and float(xg.grad.abs().sum()) > 0
    with pytest.raises(UserError):
        diff_augment(x, "rotate")


# ----------------------------------------------------------------------------------- gradient penalty
def test_gradient_penalty_matches_its_definition_and_trains_the_heads():
    disc = _disc()
    disc.train()
    real, fake, text = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16), torch.randn(4, 6)
    twin = copy.deepcopy(disc)
    gp = gradient_penalty(disc, real, fake, text, generator=torch.Generator().manual_seed(0))
    a = torch.rand(4, generator=torch.Generator().manual_seed(0)).reshape(4, 1, 1, 1)
    x = a * real + (1 - a) * fake
    feats = [f.detach().requires_grad_(True) for f in twin.backbone(x)]
    grads = torch.autograd.grad(twin.head_logits(feats, text).sum(), feats)
    norm = torch.cat([g.reshape(4, -1) for g in grads], dim=1).norm(dim=1)
    torch.testing.assert_close(gp, ((norm - 1) ** 2).mean(), atol=1e-5, rtol=1e-4)
    heads = disc.trainable_parameters()
    gh = torch.autograd.grad(gp, heads, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in gh)
    with pytest.raises(UserError):
        gradient_penalty(disc, real, fake[:2], text)


def test_adaptive_gp_weight_rule():
    w = AdaptiveGPWeight()
    assert w.weight == 1e-5
    assert w.update(499, 150.0) == 1e-5  # not yet 500 steps
    assert w.update(500, 99.0) == 1e-5   # penalty below 100
    assert w.update(500, torch.tensor(100.0)) == pytest.approx(5e-5)
    assert w.update(900, 1e4) == pytest.approx(5e-5)  # only 400 steps since the change
    assert w.update(1000, 1e4) == pytest.approx(2.5e-4)
    w2 = AdaptiveGPWeight()
    w2.load_state_dict(w.state_dict())
    assert w2.weight == w.weight and w2.last_change == 1000


# ----------------------------------------------------------------------------------- frame decoding
class CausalPixelTeacher(GaussVideoTeacher):
    """A fake causal-VAE teacher: latent frame 0 -> 1 pixel frame, every later one -> 4 (repeats)."""

    temporal_compression = 4

    def decode(self, latents):
        first = latents[:, :, :1]
        rest = latents[:, :, 1:].repeat_interleave(4, dim=2)
        return ((torch.cat([first, rest], dim=2) + 1) / 2).permute(0, 2, 1, 3, 4)


def test_decode_random_frames_framewise_and_causal():
    teacher = eps_teacher(res=8, frames=4)
    lat = (torch.rand(2, 3, 5, 8, 8) * 1.6 - 0.8).requires_grad_(True)
    imgs, idx = decode_random_frames(teacher, lat, 2, torch.Generator().manual_seed(0))
    assert imgs.shape == (4, 3, 8, 8) and idx.shape == (2,) and idx[0] < idx[1]
    full = teacher.decode(lat)
    torch.testing.assert_close(imgs, video_frames(full, idx))
    assert imgs.requires_grad
    imgs.sum().backward()
    assert float(lat.grad.abs().sum()) > 0
    imgs2, _ = decode_random_frames(teacher, lat, 2, torch.Generator().manual_seed(0), grad=False)
    assert not imgs2.requires_grad and torch.equal(imgs2, imgs.detach())
    with pytest.raises(UserError):
        decode_random_frames(teacher, lat, 6)
    causal = CausalPixelTeacher(teacher.schedule, res=8, frames=4)
    imgs, idx = decode_random_frames(causal, lat.detach(), 2, torch.Generator().manual_seed(1))
    assert imgs.shape == (4, 3, 8, 8) and bool((idx < 17).all())  # pixel frames of the decoded 17-frame clip
    torch.testing.assert_close(imgs, video_frames(causal.decode(lat.detach()), idx))
    imgs, idx = decode_random_frames(causal, lat.detach(), 2, torch.Generator().manual_seed(1), causal="independent")
    assert bool((idx < 5).all())
    want = ((lat.detach()[:, :, idx] + 1) / 2).permute(0, 2, 1, 3, 4).reshape(4, 3, 8, 8)  # each as a first frame
    torch.testing.assert_close(imgs, want)


# ----------------------------------------------------------------------------------- property 7: D / G stop-grads
def test_property7_no_gradient_between_generator_and_discriminator_steps():
    teacher = eps_teacher(res=16, frames=4)
    student = GaussVideoTeacher(teacher.schedule, res=16, frames=4, gain=0.9)
    student.gain.requires_grad_(True)
    cond = teacher.encode_prompt(["a", "b"])
    text = torch.randn(2, 6)
    disc = _disc()
    disc.train()
    clips = sample_clips(2, seed=0, num_frames=4, size=16)["video"]
    x0 = teacher.encode(degrade(clips, seed=0)).detach()
    l_cd, info = latent_consistency_loss(student, teacher, x0, cond, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    fake, _ = decode_random_frames(teacher, info["y"], 2, g)
    l_adv = g_loss(disc(fake, text.repeat_interleave(2, 0), generator=g), "wgan")
    # G step: backward into the generator's parameters only (the Trainer's rule) leaves D without gradient
    (l_cd + 1.0 * l_adv).backward(inputs=[student.gain], retain_graph=True)
    assert float(student.gain.grad.abs()) > 0
    assert all(p.grad is None for p in disc.parameters())
    # lambda_adv = 0: the generator gradient is the consistency gradient alone
    g_cd = torch.autograd.grad(l_cd, student.gain, retain_graph=True)[0]
    g_zero = torch.autograd.grad(l_cd + 0.0 * l_adv, student.gain, retain_graph=True)[0]
    assert torch.equal(g_cd, g_zero)
    g_adv = torch.autograd.grad(l_adv, student.gain, retain_graph=True)[0]
    assert float(g_adv.abs()) > 0  # (so lambda_adv really matters when it is not 0)
    # D step on sg(y): no path back to the generator
    fake_d, _ = decode_random_frames(teacher, info["y"].detach(), 2, g, grad=False)
    real, captions = hq_images(4, seed=0, size=16)
    l_d = d_loss(disc(real, text.repeat_interleave(2, 0), generator=g),
                 disc(fake_d, text.repeat_interleave(2, 0), generator=g), "wgan")
    l_d = l_d + 1e-5 * gradient_penalty(disc, real, fake_d, text.repeat_interleave(2, 0), generator=g)
    assert torch.autograd.grad(l_d, [student.gain], allow_unused=True)[0] is None
    gd = torch.autograd.grad(l_d, disc.trainable_parameters(), allow_unused=True)
    assert any(x is not None and float(x.abs().sum()) > 0 for x in gd)
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert len(captions) == 4 and math.isfinite(float(l_d.detach()))
