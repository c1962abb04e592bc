"""ShapeWorld video: prompts, exact ground truth of the rendered clips, determinism, speed and the
low- / high-quality domains."""
import math
import time

import pytest
import torch

from studio.errors import UserError
from studio.world import clips as V
from studio.world.video_metrics import domain_quality


def _mask_centroid(mask):
    S = mask.shape[-1]
    c = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    m = mask.sum((-2, -1))
    return torch.stack([(mask * c).sum((-2, -1)) / m, (mask * c[:, None]).sum((-2, -1)) / m], -1)


@pytest.fixture(scope="module")
def full_batch():
    prompts = V.video_prompts(full=True)
    return prompts, V.sample_clips(len(prompts), seed=11, prompts=prompts)


# ----------------------------------------------------------------------------------------------- prompts

def test_prompt_sets_and_round_trip():
    default, full = V.video_prompts(), V.video_prompts(full=True)
    assert len(default) == 63 and len(set(default)) == 63
    assert len(full) == len(V.SHAPES) * len(V.COLORS) * len(V.MOTIONS) * len(V.CAMERAS) == 252
    assert set(default) <= set(full)
    static = V.video_prompts(cameras=["static"])
    assert len(static) == 21 and all("camera" not in p for p in static)
    assert len(V.video_prompts(full=True, cameras="static")) == 84
    words = [V.parse_video_prompt(p) for p in default]
    # the balanced set covers every shape in every colour, every (shape, motion, camera) once
    assert {(w[0], w[1]) for w in words} == {(s, c) for s in V.SHAPES for c in V.COLORS}
    assert len({(w[0], w[2], w[3]) for w in words}) == 63
    for p in full:
        w = V.parse_video_prompt(p)
        assert V.video_prompt(*w) == p
    assert V.parse_video_prompt("a red ball moving left") == ("ball", "red", "moving left", "static")
    assert V.parse_video_prompt("a green triangle rotating, camera panning right") == (
        "triangle", "green", "rotating", "panning right")
    # tolerant forms and synonyms map to the canonical words
    assert V.parse_video_prompt("  A Blue SQUARE spinning with the camera panning left. ") == (
        "cube", "blue", "rotating", "panning left")
    assert V.parse_video_prompt("yellow disc accelerating, static camera") == ("ball", "yellow", "speeding up", "static")
    assert V.video_prompts(shapes=["cube"], motions=["bouncing"], full=True) == [
        V.video_prompt("cube", c, "bouncing", cam) for cam in V.CAMERAS for c in V.COLORS]


@pytest.mark.parametrize("bad, word", [("a purple ball moving left", "purple"), ("a red dog moving left", "dog"),
                                        ("a red ball dancing", "dancing"), ("a red ball", "motion"), ("", "")])
def test_bad_prompts_raise_user_error_listing_words(bad, word):
    with pytest.raises(UserError) as e:
        V.parse_video_prompt(bad)
    msg = str(e.value)
    assert word in msg and "moving left" in msg and "triangle" in msg and "yellow" in msg
    with pytest.raises(UserError):
        V.sample_clips(2, prompts=bad)
    with pytest.raises(UserError):
        V.video_prompts(motions=["dancing"])


# ---------------------------------------------------------------------------------------- ground truth

def test_render_ground_truth(full_batch):
    prompts, b = full_batch
    n, Fr, S = len(prompts), 8, 32
    assert b["video"].shape == (n, Fr, 3, S, S) and b["mask"].shape == (n, Fr, S, S)
    assert b["depth"].shape == (n, Fr, S, S) and b["centroid"].shape == (n, Fr, 2) and b["angle"].shape == (n, Fr)
    assert b["prompts"] == prompts
    v = b["video"]
    assert v.min() >= 0 and v.max() <= 1
    # centroid = centroid of the coverage mask (antialiasing keeps it within a tenth of a pixel)
    assert (_mask_centroid(b["mask"]) - b["centroid"]).abs().max() * S < 0.1
    # objects stay in frame: the border pixels are background and the object's area never changes
    m = b["mask"]
    assert max(float(m[..., 0, :].max()), float(m[..., -1, :].max()), float(m[..., :, 0].max()),
               float(m[..., :, -1].max())) == 0.0
    area = m.sum((-2, -1))
    r = torch.tensor([s.radius for s in b["specs"]]) * S
    assert torch.allclose(area, (math.pi * r**2)[:, None].expand_as(area), rtol=0.06)  # antialiasing: ~1-4 %
    # exact two-layer depth: the object where the pixel centre is inside (coverage > 1/2)
    assert torch.equal(b["depth"] == V.OBJECT_DEPTH, m > 0.5)
    assert set(b["depth"].unique().tolist()) == {V.OBJECT_DEPTH, V.BACKGROUND_DEPTH}
    # background is achromatic; object pixels carry their colour
    for i in range(0, n, 17):
        col = torch.tensor(V.COLORS[b["specs"][i].color])
        inside = m[i] == 1
        px = v[i].permute(0, 2, 3, 1)[inside]
        exact = ((px - col).abs().amax(-1) < 1e-5).float().mean()
        assert exact > (0.3 if b["specs"][i].shape == "ball" else 0.999)  # the ball's stripe is darker
        bg = v[i].permute(0, 2, 3, 1)[m[i] == 0]
        assert (bg.amax(-1) - bg.amin(-1)).max() < 1e-6


@pytest.mark.parametrize("motion", V.MOTIONS)
def test_motions_move_as_stated(full_batch, motion):
    prompts, b = full_batch
    for i, p in enumerate(prompts):
        _, _, m, cam = V.parse_video_prompt(p)
        if m != motion:
            continue
        world, screen, camx = b["world_centroid"][i], b["centroid"][i], b["camera_x"][i]
        # the camera is accounted for: world x = screen x + camera offset, and the camera pans as stated
        assert torch.allclose(world[:, 0], screen[:, 0] + camx, atol=1e-6)
        assert torch.allclose(world[:, 1], screen[:, 1])
        dcam = camx[1:] - camx[:-1]
        assert {"static": (dcam == 0).all(), "panning left": (dcam < 0).all(),
                "panning right": (dcam > 0).all()}[cam]
        dx, dy = world[1:, 0] - world[:-1, 0], world[1:, 1] - world[:-1, 1]
        ang = b["angle"][i]
        if motion == "moving left":
            assert (dx < 0).all() and (dy == 0).all() and world[0, 0] - world[-1, 0] >= 0.19
        elif motion == "moving right":
            assert (dx > 0).all() and (dy == 0).all() and torch.allclose(dx, dx.mean().expand_as(dx), atol=1e-5)
        elif motion == "moving up":  # y is down
            assert (dy < 0).all() and (dx == 0).all() and world[0, 1] - world[-1, 1] >= 0.19
        elif motion == "moving down":
            assert (dy > 0).all() and (dx == 0).all()
        elif motion == "speeding up":
            assert (dx > 0).all() and (dx[1:] > dx[:-1]).all() and (dy == 0).all()
        elif motion == "bouncing":
            assert (dx == 0).all() and (dy > 0).any() and (dy < 0).any()
            assert world[:, 1].max() - world[:, 1].min() >= 0.1
        elif motion == "rotating":
            assert (world - world[0]).abs().max() < 1e-6
            spin = ang[1:] - ang[:-1]
            # float32 angles (a few roundings each) and their differences: 8 ulps of the largest angle
            same = 8 * torch.finfo(torch.float32).eps * float(ang.abs().max())
            assert torch.allclose(spin, spin[0].expand_as(spin), rtol=0, atol=same) and 0.19 < spin[0].abs() < 0.39
        if motion != "rotating":
            assert (ang == ang[0]).all()
        # the pixels agree with the ground truth trajectory
        assert (_mask_centroid(b["mask"][i]) - screen).abs().max() < 0.1 / 32


def test_camera_pan_moves_the_background():
    spec = V.sample_clip_specs("a red cube rotating, camera panning right", 1, seed=3)[0]
    clip = V.render_clip(spec, num_frames=8, size=32)
    assert isinstance(clip, V.Clip) and clip.prompt == "a red cube rotating, camera panning right"
    still = V.render_clip(V.ClipSpec(**{**spec.to_dict(), "camera": "static", "camera_travel": 0.0}))
    far = (clip.mask == 0).all(0) & (still.mask == 0).all(0)       # background in every frame of both
    assert far.sum() > 200
    # a static camera: background pixels never change; a panning one: the texture slides by camera_x
    assert (still.video[1:] - still.video[:-1]).abs()[:, :, far].max() == 0
    assert (clip.video[1:] - clip.video[:-1]).abs()[:, :, far].max() > 0.01
    lum = V.background(clip.camera_x[None], torch.tensor([spec.bg_phase], dtype=torch.float64), 32)[0, :, 0]
    assert torch.allclose(clip.video[:, 0][:, far], lum[:, None, :].expand(-1, 32, -1)[:, far], atol=1e-6)
    assert clip.camera_x[-1] == pytest.approx(spec.camera_travel, abs=1e-6)
    # the object's screen motion includes the camera's: rotating in place drifts left on screen
    assert clip.centroid[-1, 0] - clip.centroid[0, 0] == pytest.approx(-spec.camera_travel, abs=1e-5)


def test_other_lengths_and_sizes_stay_in_frame():
    b = V.sample_clips(60, seed=2, num_frames=16, size=48)
    m = b["mask"]
    assert b["video"].shape == (60, 16, 3, 48, 48)
    assert float(torch.cat([m[..., 0, :], m[..., -1, :], m[..., :, 0], m[..., :, -1]], -1).max()) == 0.0
    one = V.sample_clips(3, seed=2, num_frames=1, size=16)
    assert one["video"].shape == (3, 1, 3, 16, 16)
    with pytest.raises(UserError):
        V.sample_clips(2, num_frames=0)


def test_determinism_and_references():
    a, b = V.sample_clips(16, seed=5), V.sample_clips(16, seed=5)
    assert torch.equal(a["video"], b["video"]) and a["prompts"] == b["prompts"] and a["specs"] == b["specs"]
    c = V.sample_clips(16, seed=6)
    assert not torch.equal(a["video"], c["video"])
    r1 = V.reference_clips("a blue cube bouncing", k=5)
    r1["video"].zero_()  # callers own their tensors: nothing cached is mutated
    r2 = V.reference_clips("A blue square bouncing.", k=5)  # synonyms: same canonical prompt, same set
    r3 = V.render_clips(V.sample_clip_specs("a blue cube bouncing", 5, V._prompt_seed("a blue cube bouncing", 0)))
    assert torch.equal(r2["video"], r3["video"]) and r2["video"].abs().sum() > 0
    assert set(r2["prompts"]) == {"a blue cube bouncing"}
    assert not torch.equal(r2["video"], V.reference_clips("a blue cube bouncing", k=5, seed=1)["video"])
    # the first k references are shared by larger sets and by other clip lengths (same specs)
    longer = V.reference_clips("a blue cube bouncing", k=8, num_frames=12)
    assert longer["specs"][:5] == r2["specs"] and torch.equal(longer["video"][:5, 0], r2["video"][:, 0])
    other = V.reference_clips("a blue cube moving up", k=5)
    assert not torch.equal(other["video"], r2["video"])


def test_sampling_speed():
    V.sample_clips(8, seed=0)  # warm-up
    t0 = time.perf_counter()
    b = V.sample_clips(256, seed=1)
    dt = time.perf_counter() - t0
    assert b["video"].shape[0] == 256
    assert dt < 5.0, f"sample_clips(256) took {dt:.2f} s"


# ----------------------------------------------------------------------------------------------- domains

def test_degrade_and_hq_domains():
    clean = V.sample_clips(24, seed=4)["video"]
    lq = V.degrade(clean, seed=1)
    assert lq.shape == clean.shape and lq.min() >= 0 and lq.max() <= 1
    assert torch.equal(lq, V.degrade(clean, seed=1)) and not torch.equal(lq, V.degrade(clean, seed=2))
    assert torch.equal(V.degrade(clean, seed=1, strength=0), clean)
    with pytest.raises(UserError):
        V.degrade(clean, strength=-1)
    images, captions = V.hq_images(24, seed=4)
    assert images.shape == (24, 3, 32, 32) and len(captions) == 24
    assert all(V.parse_video_prompt(c + " moving left") for c in captions)
    assert torch.equal(images, V.hq_images(24, seed=4)[0])
    # the watermark sits in the bottom-right corner and darkens it
    wm = V.watermark_pattern(32)
    assert wm[24:, 18:].sum() > 0.9 * wm.sum() and (lq.mean(2)[..., wm > 0.5].mean()
                                                    < clean.mean(2)[..., wm > 0.5].mean() - 0.05)
    # domain quality: HQ images > clean clip frames > more and more degraded frames
    q = [domain_quality(images), domain_quality(clean)] + [domain_quality(V.degrade(clean, 0, s))
                                                         for s in (0.25, 0.5, 1.0)]
    assert all(q[i] > q[i + 1] for i in range(len(q) - 1)), q
    assert q[0] > 0.9 and q[-1] < 0.35
    parts = domain_quality(V.degrade(images, 0), components=True)
    hq_parts = domain_quality(images, components=True)
    for name in ("sharpness", "clean", "no_watermark", "no_blocks"):
        assert parts[name] < hq_parts[name] - 0.3, name
