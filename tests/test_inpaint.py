"""Amodal completion (issue 20 part 3): inpainting teachers behind the teacher protocol, video adaptation."""
from __future__ import annotations

import pytest
import torch

from studio.errors import UserError
from studio.teachers.inpaint import (CrossFrameAttnProcessor, DiffusersInpaintTeacher, ShapeWorldInpaintTeacher,
                                     amodal_mask_from_completion, complete_object, complete_objects, inpaint_video, load_inpaint_teacher,
                                     occlusion_hole)
from studio.world import scenes4d as S


@pytest.fixture(scope="module")
def scene():
    return S.make_scene("two_cross", size=48, frames=8)


def _object_input(scene, k):
    m = scene.masks[k].float()[:, None]
    img = scene.frames.permute(0, 3, 1, 2) * m + (1 - m)  # the object's visible pixels over white
    hole = S.occlusion_region(scene, k).float()[:, None]
    return img, hole


def test_exact_teacher_fills_occlusion_towards_amodal_truth(scene):
    k = 1  # the house, hidden behind the penguin mid-clip
    img, hole = _object_input(scene, k)
    target = scene.object_rgb[k].permute(0, 3, 1, 2)
    region = hole.bool().expand_as(img) & scene.amodal_masks[k][:, None].expand_as(img)
    assert int(region.sum()) > 300
    teacher = ShapeWorldInpaintTeacher.for_scene_object(scene, k)
    out = inpaint_video(teacher, img, hole, steps=10, seed=0)
    err = (out - target)[region].abs().mean()
    base = (img - target)[region].abs().mean()  # leaving the hole white
    assert float(err) < 0.03 and float(base) > 0.3
    # known pixels are kept exactly
    keep = ~hole.bool().expand_as(img)
    assert torch.equal(out[keep], img[keep])
    amodal = amodal_mask_from_completion(out, scene.masks[k], hole)
    gt = scene.amodal_masks[k]
    iou = (amodal & gt).sum() / (amodal | gt).sum()
    iou_visible = (scene.masks[k] & gt).sum() / gt.sum()
    assert float(iou) > 0.95 and float(iou) > float(iou_visible) + 0.05
    # the consistency guidance is explicit: switching it on changes the sample (here it blurs the motion)
    smooth = inpaint_video(teacher, img, hole, steps=10, seed=0, consistency=0.5)
    assert float((smooth - target)[region].abs().mean()) > float(err)


def test_exact_teacher_protocol(scene):
    teacher = ShapeWorldInpaintTeacher.for_scene_object(scene, 0)
    ref = scene.object_rgb[0, 2].permute(2, 0, 1)[None]
    hole = torch.zeros(1, 1, 48, 48)
    hole[..., 10:30, 10:30] = 1
    cond = teacher.condition(teacher.encode_prompt(""), ref, hole)
    x0 = teacher.encode(ref)
    t = torch.tensor([500])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = teacher.schedule.add_noise(x0, eps, t)
    pred = teacher.predict(x_t, t, cond, output="sample")
    # the posterior picks the right frame: the prediction is near the reference (the smoothing shrinks a bit)
    assert float((pred - x0).abs().mean()) < 0.05
    with pytest.raises(UserError, match="condition"):
        teacher.predict(x_t, t, teacher.encode_prompt(""))
    with pytest.raises(UserError, match="hole must be"):
        teacher.condition(teacher.encode_prompt(""), ref, torch.zeros(2, 1, 48, 48))


def _tiny_inpaint(path):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from tests.tiny_models import tiny_sd_components

    comps = tiny_sd_components(sample_size=8, seed=0, tokenizer_dir=path.parent / ".tok")
    torch.manual_seed(5)
    comps["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(4, 8), norm_num_groups=32, use_linear_projection=True).eval()
    pipe = StableDiffusionInpaintPipeline(**comps, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    return _tiny_inpaint(tmp_path_factory.mktemp("inp") / "sd-inpaint")


def test_diffusers_inpaint_teacher_by_path(tiny_inpaint, scene):
    teacher = load_inpaint_teacher(str(tiny_inpaint), device="cpu")
    assert isinstance(teacher, DiffusersInpaintTeacher) and teacher.unet.config.in_channels == 9
    assert not any(p.requires_grad for p in teacher.parameters())
    frames = scene.frames[:3, 8:24, 8:24].permute(0, 3, 1, 2).contiguous()
    hole = torch.zeros(3, 1, 16, 16)
    hole[..., 4:12, 4:12] = 1
    a = inpaint_video(teacher, frames, hole, "a red cube", steps=3, guidance_scale=2.0, seed=1)
    b = inpaint_video(teacher, frames, hole, "a red cube", steps=3, guidance_scale=2.0, seed=1)
    assert a.shape == frames.shape and torch.equal(a, b) and bool(torch.isfinite(a).all())
    keep = ~hole.bool().expand_as(frames)
    assert torch.equal(a[keep], frames[keep])
    # STSA is active inside the sampler (different result) and the image attention is restored afterwards
    c = inpaint_video(teacher, frames, hole, "a red cube", steps=3, guidance_scale=2.0, seed=1, cross_frame=False)
    masks = torch.zeros(2, 3, 16, 16, dtype=torch.bool)
    masks[0, :, 2:10, 2:10] = True
    masks[1, :, 6:14, 6:14] = True
    rgbs, ams = complete_objects(frames.permute(0, 2, 3, 1), masks, str(tiny_inpaint), prompts=["a cube", "a ball"],
                                 device="cpu", steps=2)
    assert rgbs.shape == (2, 3, 16, 16, 3) and bool((ams >= masks).all())
    assert not torch.equal(a, c)
    assert not any(isinstance(p, CrossFrameAttnProcessor) for p in teacher.unet.attn_processors.values())
    # the 9-channel input: UNet sees latents, the max-pooled mask and the masked-image latents
    cond = teacher.condition(teacher.encode_prompt("a red cube"), frames, hole)
    assert cond.extra["inpaint_mask"].shape == (3, 1, 8, 8) and cond.extra["masked_image"].shape == (3, 4, 8, 8)
    assert torch.equal(cond.extra["inpaint_mask"], cond.negative_extra["inpaint_mask"])


def test_cross_frame_attention_reduces_to_image_attention(tiny_inpaint):
    """With one frame per clip STSA is exactly the image model's self-attention; with identical frames too."""
    teacher = load_inpaint_teacher(str(tiny_inpaint), device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, 8, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([300, 300])
    ref = teacher.unet(x, t, encoder_hidden_states=emb).sample
    teacher.set_cross_frame_attention(1)
    assert torch.allclose(teacher.unet(x, t, encoder_hidden_states=emb).sample, ref, atol=1e-5)
    # two identical frames: attending over both frames' identical keys gives the same output
    same = torch.cat([x[:1], x[:1]])
    e1 = torch.cat([emb[:1], emb[:1]])
    one = teacher.unet(same[:1], t[:1], encoder_hidden_states=e1[:1]).sample
    teacher.set_cross_frame_attention(2)
    two = teacher.unet(same, t, encoder_hidden_states=e1).sample
    assert torch.allclose(two[0], one[0], atol=1e-4) and torch.allclose(two[1], one[0], atol=1e-4)
    # different frames now interact
    mixed = teacher.unet(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(mixed, ref, atol=1e-4)
    teacher.set_cross_frame_attention(None)


def test_bad_inpaint_teacher_inputs(tmp_path):
    from tests.tiny_models import make_tiny_sd

    plain = make_tiny_sd(tmp_path / "sd", sample_size=8)
    with pytest.raises(UserError, match="9"):
        load_inpaint_teacher(str(plain), device="cpu")
    with pytest.raises(UserError, match="could not load inpainting teacher"):
        load_inpaint_teacher(str(tmp_path), device="cpu")
    with pytest.raises(UserError, match="not a folder or a Hugging Face id"):
        load_inpaint_teacher("no such thing", device="cpu")


def test_complete_object_from_masks_only(scene):
    k = 1
    hole = occlusion_hole(scene.masks, k)
    # the hole touches the object: it equals the scene's occlusion region in frames where the two objects meet
    meet = (torch.nn.functional.max_pool2d(scene.masks[k].float()[:, None], 3, 1, 1)[:, 0].bool()
            & scene.masks[0]).flatten(1).any(1)
    ref = S.occlusion_region(scene, k)
    assert torch.equal(hole[meet], ref[meet]) and not bool(hole[~meet].any())
    teacher = ShapeWorldInpaintTeacher.for_scene_object(scene, k)
    rgb, amodal = complete_object(teacher, scene.frames, scene.masks, k, steps=8)
    assert rgb.shape == scene.frames.shape and amodal.shape == scene.masks[k].shape
    gt = scene.amodal_masks[k]
    iou = (amodal & gt).sum() / (amodal | gt).sum()
    assert float(iou) > 0.95
    with pytest.raises(UserError, match="must agree"):
        complete_object(teacher, scene.frames[:2], scene.masks, k)
    rgbs, ams = complete_objects(scene.frames, scene.masks, "shapeworld-exact", scene=scene, steps=8)
    assert rgbs.shape == (2, *scene.frames.shape) and torch.equal(ams[1], amodal) and torch.equal(rgbs[1], rgb)
    with pytest.raises(UserError, match="pass scene="):
        complete_objects(scene.frames, scene.masks)
    with pytest.raises(UserError, match="one per object"):
        complete_objects(scene.frames, scene.masks, scene=scene, prompts=["a"])
