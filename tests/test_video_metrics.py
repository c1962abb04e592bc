"""Video metrics on ShapeWorld clips: ground truth scores high, wrong / static / noisy clips score low,
the pixel readers recover the exact trajectories, and CLIP score runs a real (tiny) CLIPModel by path."""
import math

import pytest
import torch

from studio.errors import UserError
from studio.world import clips as V
from studio.world import video_metrics as M


@pytest.fixture(scope="module")
def gt():
    prompts = V.video_prompts()
    return prompts, V.sample_clips(len(prompts), seed=21, prompts=prompts)


def _noise(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_readers_recover_ground_truth():
    prompts = V.video_prompts(full=True)[::2]
    b = V.sample_clips(len(prompts), seed=9, prompts=prompts)
    a = M.analyze_videos(b["video"])
    S = 32
    assert (a["centroid"] - b["centroid"]).abs().max() * S < 0.25          # sub-pixel centroids
    assert (a["camera_x"] - b["camera_x"]).abs().max() * S < 0.3           # camera pan from the background
    assert (a["world_centroid"] - b["world_centroid"]).abs().max() * S < 0.4
    rot = [i for i, p in enumerate(prompts) if "rotating" in p]
    k = torch.tensor([V.ORIENTATION_ORDER[V.parse_video_prompt(prompts[i])[0]] for i in rot], dtype=torch.float32)
    total, _, _ = M._rotation({key: val[rot] for key, val in a.items()}, k)
    truth = b["angle"][rot, -1] - b["angle"][rot, 0]
    assert (total - truth).abs().max() < 0.2 and truth.abs().min() > 1.3   # rotation read from the pixels
    pred = M.classify_videos(b["video"])
    assert pred == [V.parse_video_prompt(p) for p in prompts]


def test_ground_truth_scores_high(gt):
    prompts, b = gt
    v = b["video"]
    assert M.motion_accuracy(v, prompts) >= 0.95
    assert M.text_alignment(v, prompts) >= 0.95
    res = M.evaluate_videos(v, prompts)
    assert set(res) >= {"frame_error", "motion_accuracy", "object_motion_accuracy", "camera_accuracy", "flicker",
                        "text_alignment", "shape_accuracy", "color_accuracy", "motion_class_accuracy",
                        "camera_class_accuracy", "diversity", "domain_quality"}
    assert all(isinstance(x, float) for x in res.values())
    assert 0.8 < res["frame_error_ratio"] < 1.25 and res["memorisation"] == 0.0 and res["still_fraction"] == 0.0
    assert res["flicker"] < 0.01 and res["motion_accuracy"] >= 0.95
    # reference clips are exactly the frame-error references
    ref = V.reference_clips(prompts[5], k=16)
    assert M.frame_error(ref["video"], prompts[5]) == 0.0
    # fresh ground truth < the same clips under shuffled prompts < noise
    fe_gt = res["frame_error"]
    fe_wrong = M.frame_error(v, prompts[7:] + prompts[:7])
    fe_noise = M.frame_error(_noise(v.shape), prompts)
    assert fe_gt < 0.09 and fe_gt < 0.8 * fe_wrong and fe_wrong < fe_noise
    assert M.text_alignment(v, prompts[7:] + prompts[:7]) < 0.2


def test_wrong_static_and_noisy_clips_score_low(gt):
    prompts, b = gt
    v = b["video"]
    left = [i for i, p in enumerate(prompts) if "moving left" in p]
    assert len(left) == 9
    # time reversed "moving left" clips move right (and pan the other way): ~0
    assert M.motion_accuracy(v[left].flip(1), [prompts[i] for i in left]) <= 0.05
    right = [p.replace("moving left", "moving right") for p in (prompts[i] for i in left)]
    assert M.motion_accuracy(v[left], right, components=True)["object_motion_accuracy"] <= 0.05
    # a still clip (first frame repeated) does not move as any prompt says, and does not flicker
    still = v[:, :1].expand_as(v).contiguous()
    assert M.motion_accuracy(still, prompts) <= 0.05
    assert M.flicker(still) == 0.0 and M.evaluate_videos(still, prompts)["still_fraction"] == 1.0
    # the camera matters: a static-camera clip fails a panning prompt
    static = [i for i, p in enumerate(prompts) if "camera" not in p]
    panned = [prompts[i] + ", camera panning left" for i in static]
    parts = M.motion_accuracy(v[static], panned, components=True)
    assert parts["object_motion_accuracy"] >= 0.95 and parts["camera_accuracy"] <= 0.05
    # pure noise
    noise = _noise(v.shape, 1)
    assert M.motion_accuracy(noise, prompts) <= 0.05
    assert M.text_alignment(noise, prompts) <= 0.05
    assert M.flicker(noise) > 0.1


def test_flicker_and_diversity():
    b = V.sample_clips(6, seed=3, prompts="a green cube moving down, camera panning right")
    v = b["video"]
    # per-frame brightness flicker is caught; object and camera motion are not flicker
    gain = 1 + 0.15 * torch.tensor([(-1) ** t for t in range(8)], dtype=torch.float32)
    flick = (v * gain[None, :, None, None, None]).clamp(0, 1)
    assert M.flicker(v) < 0.01 and M.flicker(flick) > 0.05
    # diversity: distinct clips > 0, copies of one clip = 0, no pairs = nan
    d = M.diversity(v, ["a green cube moving down, camera panning right"] * 6)
    assert d > 0.02
    assert M.diversity(v[:1].expand_as(v)) == 0.0
    assert math.isnan(M.diversity(v[:2], ["a green cube moving down", "a red ball moving up"]))
    per = M.frame_error(v, "a green cube moving down, camera panning right", per_clip=True)
    assert per.shape == (6,) and (per >= 0).all()


def test_bad_inputs():
    v = V.sample_clips(2, seed=0)["video"]
    with pytest.raises(UserError):
        M.motion_accuracy(v, ["a red ball moving left"])             # 1 prompt for 2 videos
    with pytest.raises(UserError):
        M.evaluate_videos(v, ["a red ball moving left", "a red dog moving left"])
    with pytest.raises(ValueError):
        M.frame_error(v[:, :, :2], ["a red ball moving left"] * 2)   # not RGB
    with pytest.raises(ValueError):
        M.domain_quality(v[0, 0])


def test_clip_score_tiny_model(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from studio.teachers.offline_tokenizer import make_clip_tokenizer

    words = ["a", *V.COLORS, *V.SHAPES, "moving", "left", "right", "up", "down"]
    tok = make_clip_tokenizer(tmp_path, words)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(tmp_path)

    b = V.sample_clips(3, seed=1)
    imgs = b["video"][:, 0]
    per = M.clip_score(imgs, b["prompts"], str(tmp_path), per_image=True)
    assert per.shape == (3,) and (per >= 0).all() and (per <= 100).all()
    # the score is 100 * max(cos, 0) of the model's own embeddings
    model = CLIPModel.from_pretrained(str(tmp_path)).eval()
    proc = CLIPProcessor.from_pretrained(str(tmp_path))
    with torch.no_grad():
        out = model(**proc(text=b["prompts"], images=list(imgs), return_tensors="pt", padding=True, do_rescale=False))
    ref = 100 * torch.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).clamp_min(0)
    assert torch.allclose(per, ref, atol=1e-4)
    # videos: every frame against its video's text, averaged over frames
    vid = M.clip_score(b["video"][:, :2], b["prompts"], str(tmp_path), per_image=True)
    frames = torch.stack([M.clip_score(b["video"][:, t], b["prompts"], str(tmp_path), per_image=True)
                          for t in range(2)], 1).mean(1)
    assert torch.allclose(vid, frames, atol=1e-4)
    with pytest.raises(UserError):
        M.clip_score(imgs, ["a red ball"], str(tmp_path))
    with pytest.raises(UserError):
        M.clip_score(imgs, b["prompts"], str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def gaming():
    prompts, inputs = M.gaming_inputs(V.video_prompts(cameras=["static"]), per_prompt=2)
    table = {name: M.evaluate_videos(v, prompts) for name, v in inputs.items()}
    print("\n| input | frame_error | ratio | vs floor | memorisation | motion acc. (any object) | flicker | still | "
          "diversity ratio |")
    for name, m in table.items():
        print(f"| {name} | {m['frame_error']:.3f} | {m['frame_error_ratio']:.2f} | {m['frame_error_vs_floor']:.2f} | "
              f"{m['memorisation']:.2f} | {m['motion_accuracy']:.2f} ({m['motion_accuracy_any_object']:.2f}) | "
              f"{m['flicker']:.4f} | {m['still_fraction']:.2f} | {m['diversity_ratio']:.2f} |")
    return table


def test_fresh_world_clips_read_as_the_floor(gaming):
    f = gaming["fresh"]
    assert 0.8 < f["frame_error_ratio"] < 1.2 and f["frame_error_vs_floor"] < 0.2
    assert f["memorisation"] == 0.0 and f["motion_accuracy"] >= 0.95 and f["object_accuracy"] >= 0.95
    assert f["still_fraction"] == 0.0 and f["flicker"] < 0.01 and 0.8 < f["diversity_ratio"] < 1.2


def test_memorised_reference_loses_on_frame_error_vs_floor(gaming):
    m, f = gaming["memorised"], gaming["fresh"]
    assert m["frame_error"] == 0.0                         # the raw number still rewards a copy ...
    assert m["frame_error_vs_floor"] > 0.9 > f["frame_error_vs_floor"] and m["memorisation"] == 1.0   # ... its reading does not


def test_still_clip_loses_on_motion_and_is_not_rewarded_by_flicker(gaming):
    s, f = gaming["still"], gaming["fresh"]
    assert s["motion_accuracy"] <= 0.05 and s["frame_error_vs_floor"] > f["frame_error_vs_floor"] + 0.1
    assert s["frame_error"] > f["frame_error"]             # time-aligned: a frozen trajectory pays
    assert s["flicker"] <= f["flicker"] and s["still_fraction"] == 1.0 and s["motion_energy_ratio"] == 0.0


def test_wrong_shape_right_motion_loses_on_motion_accuracy(gaming):
    w, f = gaming["wrong shape"], gaming["fresh"]
    assert w["motion_accuracy_any_object"] > 0.8           # the ungated score was fooled
    assert w["motion_accuracy"] <= 0.05 and w["object_accuracy"] <= 0.05
    assert w["frame_error"] >= f["frame_error"]            # same specs, another shape: never closer (paired)


def test_blur_loses_on_motion_frame_error_and_diversity(gaming):
    b, f = gaming["blur"], gaming["fresh"]
    assert b["motion_accuracy_any_object"] > 0.3           # the ungated score is fooled (0.71 before the robust mask, 0.44 after)
    assert b["motion_accuracy"] <= 0.05
    assert b["frame_error"] > 2 * f["frame_error"] and b["frame_error_vs_floor"] > 1.0
    assert b["diversity_ratio"] == 0.0
