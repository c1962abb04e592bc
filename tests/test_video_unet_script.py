"""``scripts/train_shapeworld_video_unet.py`` (issue 16's two-stage AnimateDiff route) end to end at a toy size:
the image stage writes a folder, the motion stage inflates it into a ``UNetMotionModel`` that starts as the image
model frame by frame, and the saved folder loads back through the AnimateDiff teacher path as a rectified-flow
pixel-space video teacher that samples clips."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from studio.teachers import load_teacher
from studio.teachers.diffusers_video import AnimateDiffTeacher
from studio.teachers.sampling import flow_euler_sample

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load("train_shapeworld_video_unet")


TOY = ["--res", "16", "--frames", "4", "--width", "16", "--batch", "2", "--steps", "2", "--warmup", "1",
       "--eval-prompts", "1", "--eval-cfg", "2", "--eval-steps", "2", "--prompts", "one"]


def test_inflated_model_starts_as_the_image_model(script):
    torch.manual_seed(0)
    unet2d = script.build_unet2d(16, 16, seed=0).eval()
    motion = script.inflate(unet2d, frames=4, seed=0).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    ctx = torch.randn(2, 5, 64)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        out = motion(x, t, encoder_hidden_states=ctx.repeat_interleave(4, 0), return_dict=False)[0]
        frames = x.permute(0, 2, 1, 3, 4).reshape(8, 3, 16, 16)
        ref = unet2d(frames, t.repeat_interleave(4), encoder_hidden_states=ctx.repeat_interleave(4, 0),
                     return_dict=False)[0].reshape(2, 4, 3, 16, 16).permute(0, 2, 1, 3, 4)
    # zeroed motion-module outputs: the temporal branch adds exactly zero, so only float32 reordering differs
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and the motion modules do act once their outputs are not zero
    for name, mod in motion.named_modules():
        if "motion_modules" in name and name.endswith("proj_out"):
            torch.nn.init.normal_(mod.weight, std=0.1)
    with torch.no_grad():
        out2 = motion(x, t, encoder_hidden_states=ctx.repeat_interleave(4, 0), return_dict=False)[0]
    assert (out2 - ref).abs().max() > 1e-3


def test_two_stages_save_a_loadable_animatediff_teacher(script, tmp_path):
    log = tmp_path / "readouts.jsonl"
    img = tmp_path / "img"
    assert script.main(["--stage", "image", "--out", str(img), "--log", str(log), *TOY]) == 0
    assert json.loads((img / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    mot = tmp_path / "mot"
    assert script.main(["--stage", "motion", "--init-from", str(img), "--out", str(mot), "--log", str(log),
                        "--spatial-lr-scale", "0", *TOY]) == 0
    info = json.loads((mot / "training.json").read_text())
    assert [r["stage"] for r in info["rounds"]] == ["image", "motion"]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["image", "motion"] and "motion_accuracy" in rows[1]["readout"]["2.0"]
    teacher = load_teacher(str(mot))
    assert isinstance(teacher, AnimateDiffTeacher) and teacher.schedule.is_flow
    assert (teacher.num_frames, teacher.native_resolution, teacher.latent_channels) == (4, 16, 3)
    videos = flow_euler_sample(teacher, ["a red ball moving left"], steps=2, guidance_scale=2.0, seed=0)
    assert videos.shape == (1, 4, 3, 16, 16) and torch.isfinite(videos).all()
