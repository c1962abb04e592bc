"""``scripts/train_shapeworld_video_teacher.py`` end to end at a toy size: it trains, writes a folder that the
user-facing loader reads back as a Wan teacher (tubelet patches, x-prediction recorded and honoured), continues
from a saved folder, and its gap-to-exact read-out is well formed."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from studio.teachers import load_teacher
from studio.teachers.sampling import flow_euler_sample

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shapeworld_video_teacher.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_shapeworld_video_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOY = ["--steps", "2", "--batch", "2", "--dim", "64", "--layers", "1", "--warmup", "1", "--save-every", "0",
       "--no-eval", "--prompts", "default"]


def test_tubelet_x_prediction_model_round_trips(script, tmp_path):
    out = tmp_path / "model"
    assert script.main(["--out", str(out), "--patch", "8", "4", "4", "--prediction", "sample", *TOY]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_studio"]["prediction_type"] == "sample" and index["vae"] == [None, None]
    info = json.loads((out / "training.json").read_text())
    assert info["rounds"][-1]["args"]["prediction"] == "sample" and len(info["rounds"]) == 1
    teacher = load_teacher(str(out))
    assert teacher.schedule.is_flow and teacher.schedule.prediction_type == "sample"
    assert teacher.patch_size == (8, 4, 4) and teacher.latent_shape() == (3, 8, 32, 32)
    videos = flow_euler_sample(teacher, ["a red ball moving left"], steps=2, guidance_scale=2.0, seed=0)
    assert videos.shape == (1, 8, 3, 32, 32) and torch.isfinite(videos).all()
    # a second round continues from the folder and keeps the first round's record
    out2 = tmp_path / "model2"
    assert script.main(["--out", str(out2), "--init-from", str(out), "--prediction", "sample", "--data", "refs",
                        "--fg-weight", "3", "--refs-per-prompt", "1", *TOY]) == 0
    assert len(json.loads((out2 / "training.json").read_text())["rounds"]) == 2
    assert load_teacher(str(out2)).patch_size == (8, 4, 4)


def test_gap_to_exact_read_out(script):
    rows = script.gap_to_exact(load_teacher("shapeworld-video-wan"), sigmas=(0.5,), batch=2)
    row = rows["0.5"]
    assert set(row) == {"model", "exact", "gap"}
    assert row["exact"] < 1e-3  # at s = 0.5 the exact posterior sits on one reference clip
    assert row["gap"] > 0 and row["model"] > 0 and all(v == v for v in row.values())
