"""Issue 16 part 4: MCM's discriminator captions real and fake frames alike; the LoRA covers MCM's target roles
(attention, feed-forward, convolutions, time embedding) on the tiny Wan / UNet3D / UNetMotion teachers loaded
by path; the motion head's collapse monitor is logged every step."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from methods.mcm import MCMConfig, MCMStage, image_caption
from studio.runs.video_distill import VideoData, resolve_prompts
from studio.students.video_lora import VideoLoRAStudent, video_lora_targets
from studio.teachers.registry import load_video_teacher

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from tiny_video_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan", pixel=True)


def _stage(path, **kw):
    teacher = load_video_teacher(str(path))
    student = VideoLoRAStudent(teacher, rank=2, seed=0)
    data = VideoData("shapeworld", teacher, resolve_prompts("static"), seed=0)
    return MCMStage(MCMConfig(teacher=str(path), batch_size=2, seed=1, **kw), teacher, student, data), data


def test_quality_mode_captions_real_and_fake_frames_alike(tiny_wan):
    stage, data = _stage(tiny_wan, real_images="hq")
    _, prompts, video = data.batch(0, 2, with_video=True)
    assert any("moving" in p or "rotating" in p or "bouncing" in p or "speeding" in p for p in prompts)
    fake = stage.fake_captions(list(prompts))
    assert fake == [image_caption(p) for p in prompts] and all(c.count(" ") == 2 for c in fake)   # "a red ball"
    k = stage.cfg.frames_per_clip
    images, real = stage.real_frames(0, video, list(prompts), k * len(prompts))
    assert images.shape[0] == k * len(prompts)
    assert real == [c for c in fake for _ in range(k)]        # the same captions, frame for frame
    # so a caption-only discriminator sees identical text conditions on both sides
    fake_text = stage.teacher.encode_prompt([c for c in fake for _ in range(k)]).embeds
    real_text = stage.teacher.encode_prompt(real).embeds
    torch.testing.assert_close(fake_text, real_text)
    # distillation-only mode: real frames are the clips' own, captioned with the clip's prompt, as the fakes
    stage_v, _ = _stage(tiny_wan, real_images="video")
    assert stage_v.fake_captions(list(prompts)) == list(prompts)
    assert stage_v.real_frames(0, video, list(prompts), k * 2)[1] == [p for p in prompts for _ in range(k)]
    assert image_caption("a photo of a cat") == "a photo of a cat"


def test_collapse_monitor_is_logged_each_step(tiny_wan):
    stage, _ = _stage(tiny_wan, mix_p=0.0)
    out = stage.train_step(0, 0.0)
    assert {"motion_norm_ratio", "motion_std_ratio"} <= set(out.logs)
    # zero-initialised head: phi is the identity at step 0, both ratios are 1
    assert out.logs["motion_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert out.logs["motion_std_ratio"] == pytest.approx(1.0, abs=1e-5)
    # a collapsed head (h(z) = c - z: phi forgets its input) reads 0 on the spread
    head = stage.motion.phi
    y = torch.randn(3, *stage.teacher.latent_shape())
    last = [m for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert last
    orig = head.forward
    head.forward = lambda z: torch.full_like(z, 0.3)
    try:
        mon = stage.collapse_monitor(y)
    finally:
        head.forward = orig
    assert mon["motion_std_ratio"] == 0.0 and mon["motion_norm_ratio"] > 0


ROLES = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feed-forward": ("ff.net.0.proj", "ff.net.2", "ffn.net.0.proj", "ffn.net.2"),
    "time embedding": ("time_emb_proj", "time_embedder.linear_1", "time_embedder.linear_2", "time_proj"),
    "convolution": ("conv1", "conv2", "patch_embedding", "downsamplers.0.conv", "upsamplers.0.conv"),
}


def _roles(names):
    return {role: sorted({k for n in names for k in keys if n == k or n.endswith("." + k)})
            for role, keys in ROLES.items()}


@pytest.mark.parametrize("kind", ["wan", "modelscope", "animatediff"])
def test_lora_covers_mcm_roles_on_every_teacher_class(kind, tmp_path):
    import tiny_video_models as T

    make = {"wan": lambda p: T.make_tiny_wan(p, pixel=True), "modelscope": T.make_tiny_modelscope,
            "animatediff": T.make_tiny_animatediff}[kind]
    teacher = load_video_teacher(str(make(tmp_path / kind)))
    denoiser = teacher.denoiser
    student = VideoLoRAStudent(teacher, rank=2, seed=0)
    roles = _roles(student.target_names)
    assert all(roles[r] for r in ROLES), (type(denoiser).__name__, roles)
    assert student.target_names and set(video_lora_targets(denoiser)) >= set(roles["attention"])
    if kind == "wan":   # before: only attention and proj_out (33 modules on the shipped teacher)
        assert {"ffn.net.0.proj", "ffn.net.2", "patch_embedding", "time_proj"} <= {
            k for v in roles.values() for k in v}
    if kind == "modelscope":   # MCM excludes ModelScope's temporal Conv3D stacks
        assert not any("temp" in n and "conv" in n for n in student.target_names)
    # the student runs, starts as the teacher, and every adapted role trains
    torch.manual_seed(0)
    x = torch.randn(1, *teacher.latent_shape())
    cond = teacher.encode_prompt(["a red ball moving left"])
    t = torch.tensor([500])
    with torch.no_grad():
        base = teacher.predict(x, t, cond)
        torch.testing.assert_close(student.predict(x, t, cond), base)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = student.predict(x, t, cond).square().mean()
    loss.backward()
    graded = {n for n, p in student.named_trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for role, keys in _roles(student.target_names).items():
        assert any(any(("." + k + ".") in ("." + n) for k in keys) for n in graded), role
    merged = student.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged.predict(x, t, cond), student.predict(x, t, cond), rtol=1e-4, atol=1e-4)
