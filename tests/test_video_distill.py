"""`studio video distill`: the shared video-distillation run (data, LoRA student, loop, student folder, eval)
with the video LCM method, on a tiny Wan of the real classes loaded by path."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from methods import run

from studio.errors import UserError
from studio.teachers.registry import load_video_teacher
from studio.runs.video_generate import load_video_model
from studio.runs.video_distill import VideoData, resolve_prompts

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from tiny_video_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan", pixel=True)


def test_video_data_shapeworld_and_lq(tiny_wan):
    teacher = load_video_teacher(str(tiny_wan))
    prompts = resolve_prompts("static")
    assert len(prompts) == 21
    d = VideoData("shapeworld", teacher, prompts, seed=0)
    x0, caps = d.batch(3, 2)
    assert x0.shape == (2,) + teacher.latent_shape() and len(caps) == 2 and all(c in prompts for c in caps)
    again, _ = d.batch(3, 2)
    torch.testing.assert_close(x0, again)  # deterministic per step
    lq = VideoData("shapeworld-lq", teacher, prompts, seed=0).batch(3, 2)[0]
    assert (lq - x0).abs().mean() > 0.01  # degraded clips differ from the clean ones
    with pytest.raises(UserError, match="colour"):
        VideoData("shapeworld", teacher, ["a purple elephant"])
    with pytest.raises(UserError, match="--data"):
        VideoData("/no/such/folder", teacher, prompts)


def test_video_data_folder_of_videos(tiny_wan, tmp_path):
    from studio.io import write_mp4

    teacher = load_video_teacher(str(tiny_wan))
    for i in range(2):
        write_mp4(tmp_path / f"clip{i}.mp4", torch.rand(6, 24, 24, 3), fps=8)
        (tmp_path / f"clip{i}.txt").write_text(f"caption {i}")
    x0, caps = VideoData(str(tmp_path), teacher, []).batch(0, 3)
    assert x0.shape == (3,) + teacher.latent_shape() and set(caps) <= {"caption 0", "caption 1"}
    (tmp_path / "clip2.mp4").write_bytes((tmp_path / "clip0.mp4").read_bytes())
    with pytest.raises(UserError, match="caption"):
        VideoData(str(tmp_path), teacher, [])


def test_studio_video_distill_lcm_end_to_end(tiny_wan, tmp_path):
    from studio.cli import main

    out = tmp_path / "run"
    args = ["video", "distill", "--method", "lcm", "--teacher", str(tiny_wan), "--steps", "4", "--batch-size", "2",
            "--eval-prompts", "2", "--eval-steps", "1", "2", "--checkpoint-every", "2", "--out", str(out)]
    main(args)
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "lcm" and m["steps"] == 4 and set(m["eval"]["rows"]) == {"1", "2"}
    assert 0 <= m["headline"]["student_2_motion_accuracy"] <= 1
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 4 and all(h["loss"] == h["loss"] for h in hist)
    # the student folder is a model for `studio video generate`, with the LCM defaults
    model, defaults = load_video_model(out / "student")
    assert defaults["sampler"] == "lcm" and defaults["timestep_scaling"] == 4.0
    main(["video", "generate", "a red ball moving left", "--model", str(out / "student"), "--out", str(tmp_path / "g")])
    g = json.loads((tmp_path / "g" / "a-red-ball-moving-left" / "metrics.json").read_text())
    assert g["sampler"] == "lcm" and g["steps"] == 4
    # the LoRA was trained: the merged student differs from the teacher
    teacher = load_video_teacher(str(tiny_wan))
    x = teacher.noise(1, seed=0)
    c = teacher.encode_prompt(["a red ball moving left"])
    assert (model.predict(x, 500, c) - teacher.predict(x, 500, c)).abs().max() > 0


def test_video_distill_resume_continues(tiny_wan, tmp_path):
    from methods.video_lcm import VideoLCMConfig, VideoLCMMethod

    cfg = VideoLCMConfig(teacher=str(tiny_wan), steps=4, batch_size=1, eval_prompts=0, checkpoint_every=2)
    full = run(cfg, VideoLCMMethod(), tmp_path / "a", progress=False)
    # a run cancelled after 2 steps (checkpoint saved), then resumed, ends with the same student
    from studio.train.loop import TrainingCancelled

    with pytest.raises(TrainingCancelled):
        run(cfg, VideoLCMMethod(), tmp_path / "b", progress=False, callbacks=[lambda rec: rec["step"] < 2])
    assert not (tmp_path / "b" / "student").exists()
    resumed = run(cfg, VideoLCMMethod(), tmp_path / "b", resume=True, progress=False)
    a = load_video_model(tmp_path / "a" / "student")[0]
    b = load_video_model(tmp_path / "b" / "student")[0]
    x = a.noise(1, seed=1)
    c = a.encode_prompt(["a blue cube moving up"])
    torch.testing.assert_close(a.predict(x, 300, c), b.predict(x, 300, c))
    assert full["final_loss"] == pytest.approx(resumed["final_loss"], rel=1e-5)
