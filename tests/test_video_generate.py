"""ShapeWorld exact video teacher, `studio video generate` and distilled-student folders."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from studio.errors import UserError
from studio.teachers.registry import load_teacher, load_video_teacher
from studio.teachers.sampling import flow_euler_sample
from studio.teachers.shapeworld_video import ShapeWorldVideoExactTeacher
from studio.runs.video_generate import VideoGenerateConfig, load_video_model, write_student
from methods import run
from studio.world.clips import reference_clips
from studio.world.video_metrics import evaluate_videos

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def exact():
    return load_video_teacher("shapeworld-video-exact")


def test_exact_teacher_is_a_flow_video_teacher(exact):
    assert exact.schedule.is_flow and exact.latent_shape() == (3, 8, 32, 32)
    assert getattr(load_teacher, "__call__", None)
    with pytest.raises(UserError, match="colour"):
        exact.encode_prompt(["a purple elephant"])


def test_exact_teacher_denoises_to_its_own_references(exact):
    """At low noise the x0 prediction of a reference clip is (nearly) that clip; the prompt selects the set."""
    refs = exact.references("a red ball moving left")  # [K,3,F,H,W] float64
    x0 = refs[:2].float()
    t = torch.tensor([100, 100])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = exact.schedule.add_noise(x0, eps, t)
    cond = exact.encode_prompt(["a red ball moving left"] * 2)
    pred = exact.predict(x_t, t, cond, output="sample")
    assert (pred - x0).abs().mean() < 0.05
    # under another prompt the same x_t is pulled to that prompt's clips instead
    other = exact.predict(x_t, t, exact.encode_prompt(["a blue cube moving up"] * 2), output="sample")
    assert (other - x0).abs().mean() > 0.1


def test_exact_teacher_cfg_equals_manual_velocity_combination(exact):
    x = exact.noise(2, seed=1)
    cond = exact.encode_prompt(["a green triangle rotating", "a yellow ball bouncing"])
    t = torch.tensor([999, 500])
    v_u, v_c = exact.predict_branches(x, t, cond, output="flow")
    v = exact.predict(x, t, cond, guidance_scale=3.0, output="flow")
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    assert torch.isfinite(v).all()  # sigma = 1 at t = T-1: guiding the native velocity stays finite


def test_exact_teacher_samples_move_as_prompted(exact):
    prompts = ["a red ball moving left", "a blue cube moving up", "a green triangle moving right"]
    videos = flow_euler_sample(exact, prompts, steps=8, guidance_scale=1.0, seed=0)
    m = evaluate_videos(videos, prompts)
    assert m["motion_accuracy"] >= 0.95 and m["color_accuracy"] == 1.0 and m["text_alignment"] == 1.0
    # not a copy of one reference: the sample is close to, but not exactly, the nearest reference clip
    refs = reference_clips(prompts[0])["video"]
    d = (refs - videos[0]).abs().flatten(1).mean(1).min()
    assert 0 < float(d) < 0.1


def test_studio_video_generate_cli(tmp_path, capsys):
    from studio.cli import main

    main(["video", "generate", "a red ball moving left", "--steps", "4", "--out", str(tmp_path)])
    run = tmp_path / "a-red-ball-moving-left"
    m = json.loads((run / "metrics.json").read_text())
    assert m["sampler"] == "flow" and m["steps"] == 4 and m["frames"] == 8
    assert (run / "video.mp4").stat().st_size > 0 and len(list((run / "frames").glob("*.png"))) == 8
    assert 0 <= m["ground_truth"]["motion_accuracy"] <= 1
    from studio.io import read_video

    assert read_video(run / "video.mp4").shape[0] == 8
    with pytest.raises(SystemExit) as e:
        main(["video", "generate", "a purple elephant", "--out", str(tmp_path)])
    assert e.value.code == 2 and "colour" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["video", "distill", "--method", "sds"])
    assert e.value.code == 2


def test_student_folder_round_trip_tiny_wan(tmp_path):
    """Tier 1: a LoRA student on a tiny Wan (real classes) written as a student folder, loaded back by path,
    merged, and sampled with its own (LCM) defaults through methods.run."""
    from tiny_video_models import make_tiny_wan

    from studio.students.video_lora import VideoLoRAStudent

    path = make_tiny_wan(tmp_path / "wan", pixel=True)
    teacher = load_video_teacher(str(path))
    student = VideoLoRAStudent(teacher, rank=4)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = write_student(tmp_path / "student", student, teacher=str(path),
                           sampler={"sampler": "lcm", "steps": 2, "guidance_scale": 1.0, "timestep_scaling": 4.0})
    x = teacher.noise(1, seed=3)
    cond = teacher.encode_prompt(["a red ball"])
    want = student.predict(x, 500, cond, output="sample")
    model, defaults = load_video_model(folder)
    assert defaults["sampler"] == "lcm" and defaults["steps"] == 2
    torch.testing.assert_close(model.predict(x, 500, model.encode_prompt(["a red ball"]), output="sample"), want,
                               atol=1e-4, rtol=1e-4)
    m = run(VideoGenerateConfig("a red ball", model=str(folder)), out=tmp_path / "out")
    assert m["sampler"] == "lcm" and m["steps"] == 2 and m["guidance_scale"] == 1.0
    assert (tmp_path / "out" / "a-red-ball" / "video.mp4").exists()


def test_exact_teacher_rejects_wrong_clip_shape():
    t = ShapeWorldVideoExactTeacher()
    with pytest.raises(UserError, match="num_frames"):
        t.predict(torch.zeros(1, 3, 4, 32, 32), 10, t.encode_prompt(["a red ball moving left"]))


def test_shipped_shapeworld_video_wan_has_learned_colours():
    """The tiny trained Wan-class teacher (assets/) loads through the Wan path and its samples have the prompt's
    colour (its object shapes and motion are weak: see README / benchmarks/video_teachers.py)."""
    from studio.world.clips import video_prompts

    teacher = load_video_teacher("shapeworld-video-wan")
    assert teacher.schedule.is_flow and teacher.latent_shape() == (3, 8, 32, 32) and not teacher.is_latent
    prompts = video_prompts()[::9][:6]
    videos = flow_euler_sample(teacher, prompts, steps=8, guidance_scale=4.0, seed=0)
    m = evaluate_videos(videos, prompts)
    assert m["color_accuracy"] >= 0.8
