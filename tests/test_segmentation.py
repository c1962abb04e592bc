"""Mask sources (issue 20 part 2): files, ground truth and a tiny random transformers SamModel loaded by path."""
from __future__ import annotations

import pytest
import torch

from studio.errors import UserError
from studio.teachers.segmentation import (FileMasks, GroundTruthMasks, MaskSource, SamTrackerMasks, mask_source,
                                          masks_to_boxes)
from studio.world import scenes4d as S


@pytest.fixture(scope="module")
def scene():
    return S.make_scene("two_cross", size=32, frames=4)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=8, mlp_dim=64, window_size=4, global_attn_indexes=[1],
                                      num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                                 iou_head_hidden_dim=32))
    path = tmp_path_factory.mktemp("sam") / "tiny-sam"
    SamModel(cfg).eval().save_pretrained(str(path))
    return path


def test_ground_truth_and_file_sources(scene, tmp_path):
    gt = mask_source("gt", scene=scene)
    assert isinstance(gt, MaskSource) and gt.object_names == ["penguin", "house"]
    assert torch.equal(gt.tracks(scene.frames), scene.masks)
    assert torch.equal(mask_source("gt-amodal", scene=scene).tracks(scene.frames), scene.amodal_masks)
    out = S.save_scene(scene, tmp_path / "s")
    files = mask_source(out / "masks")
    assert isinstance(files, FileMasks)
    assert torch.equal(files.tracks(scene.frames), scene.masks) and files.object_names == ["001", "002"]
    one = mask_source([out / "masks" / "002"])
    assert torch.equal(one.tracks(scene.frames), scene.masks[1:])
    with pytest.raises(UserError, match="pass scene="):
        mask_source("gt")
    with pytest.raises(UserError, match="not 'gt'"):
        mask_source("nothing here")
    with pytest.raises(UserError, match="use the scene's own frames"):
        GroundTruthMasks(scene).tracks(scene.frames[:2])


def test_masks_to_boxes():
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    b = masks_to_boxes(m)
    assert b[0].tolist() == [3.0, 2.0, 9.0, 5.0] and b[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_sam_tracker_by_path(tiny_sam, scene):
    src = mask_source(str(tiny_sam), first_masks=scene.masks[:, 0])
    assert isinstance(src, SamTrackerMasks) and src.size == 64
    a = src.tracks(scene.frames)
    assert a.shape == scene.masks.shape and a.dtype == torch.bool
    assert torch.equal(a, src.tracks(scene.frames))  # deterministic
    # the prompt matters: another box gives another first-frame mask (random weights, but a real forward)
    other = SamTrackerMasks(tiny_sam, boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [20.0, 20.0, 32.0, 32.0]]))
    b = other.tracks(scene.frames)
    assert b.shape == a.shape and not torch.equal(a[:, 0], b[:, 0])
    with pytest.raises(UserError, match="exactly one of boxes"):
        SamTrackerMasks(tiny_sam)
    with pytest.raises(UserError, match="could not load segmentation model"):
        SamTrackerMasks(tiny_sam.parent, boxes=torch.zeros(1, 4))
    with pytest.raises(UserError, match="frame size"):
        SamTrackerMasks(tiny_sam, first_masks=torch.zeros(1, 8, 8, dtype=torch.bool)).tracks(scene.frames)


def test_sam_tracker_follows_a_perfect_segmenter(monkeypatch, tiny_sam):
    """The box propagation itself: with a segmenter that returns the true mask inside the prompted box, the
    tracker recovers every frame's mask from the first one (objects move < margin per frame)."""
    scene = S.make_scene("two_cross", size=32, frames=12)
    src = SamTrackerMasks(tiny_sam, first_masks=scene.masks[:, 0], margin=1.0)
    calls = []

    def oracle(frame, boxes):
        t = next(i for i in range(scene.num_frames) if torch.equal(scene.frames[i], frame))
        calls.append(boxes.clone())
        H, W = frame.shape[:2]
        yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        inside = ((xx >= boxes[:, 0, None, None]) & (xx <= boxes[:, 2, None, None]) &
                  (yy >= boxes[:, 1, None, None]) & (yy <= boxes[:, 3, None, None]))
        return inside & scene.masks[:, t]

    monkeypatch.setattr(src, "segment", oracle)
    out = src.tracks(scene.frames)
    assert torch.equal(out, scene.masks)
    assert len(calls) == scene.num_frames
