"""End to end: exact teacher, `studio generate` and `studio batch` on the embedded default, and the
real-model path with a tiny Stable Diffusion pipeline loaded by path."""
import math
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methods.sds import SDSConfig
from studio.cameras import orbit_cameras
from studio.errors import UserError
from studio.teachers.registry import load_teacher
from methods import run
from studio.train.gaussian_stage import GaussianStageConfig
from studio.world.objects import get_object
from studio.world.references import render_gaussian_views

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exact():
    return load_teacher("shapeworld-exact")


def test_exact_teacher_recovers_noise_at_the_true_camera(exact):
    cams = orbit_cameras(10.0, [0.0, 180.0], 3.2, 40.0, 64, 64)
    gt = render_gaussian_views(exact.gaussians[exact.objects.index(get_object("red_cube"))], cams)["images"]
    x0 = exact.encode(gt.permute(0, 3, 1, 2))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    cond = exact.encode_prompt(["a red cube"])
    for t in (100, 500, 900):
        tt = torch.full((2,), t)
        x_t = exact.schedule.add_noise(x0, eps, tt)
        with_cam = exact.predict(x_t, tt, cond, camera=cams.to_vector())
        no_cam = exact.predict(x_t, tt, cond)
        assert (with_cam - eps).pow(2).mean() < 1e-2
        assert (with_cam - eps).pow(2).mean() < (no_cam - eps).pow(2).mean()
    # x0 prediction is (close to) the true render; a different prompt predicts a different image
    tt = torch.full((2,), 300)
    x_t = exact.schedule.add_noise(x0, eps, tt)
    x0_red = exact.predict(x_t, tt, cond, output="sample", camera=cams.to_vector())
    x0_blue = exact.predict(x_t, tt, exact.encode_prompt(["a blue ball"]), output="sample", camera=cams.to_vector())
    assert (x0_red - x0).abs().mean() < 0.05 < (x0_blue - x0).abs().mean()


def test_exact_teacher_conditioning_and_errors(exact):
    emb = exact.encode_prompt(["a red cube, back view"], negative="").embeds
    n = len(exact.objects)
    assert emb[0, :n].sum() == 1 and emb[0, n + 2] == 1  # one object, "back view"
    assert exact.encode_prompt(["a red cube"]).negative_embeds[0, :n].sum() == n  # empty prompt = all objects
    with pytest.raises(UserError, match="not a ShapeWorld object"):
        exact.encode_prompt(["a purple elephant"])
    assert all(not p.requires_grad for p in exact.parameters())


def small_cfg(prompt, **kw):
    stage = GaussianStageConfig(batch_size=2, init_points=800)
    return SDSConfig(prompt=prompt, steps=kw.pop("steps", 12), stage=stage, turntable_frames=4, turntable_size=32, **kw)


def test_generate_writes_all_artefacts_and_resumes(tmp_path):
    m = run(small_cfg("a red cube"), "sds", tmp_path, progress=False)
    d = tmp_path / "a-red-cube"
    for f in ("model.ply", "model.splat", "turntable.mp4", "preview.png", "config.yaml", "metrics.json"):
        assert (d / f).stat().st_size > 0, f
    assert sorted((d / "previews").glob("sds_*.png")), "previews are written during training"
    gt = json.loads((d / "metrics.json").read_text())["ground_truth"]
    assert 0 <= gt["iou"] <= 1 and gt["psnr"] > 5 and m["steps"] == 12
    from studio.io import read_ply, read_video
    assert read_ply(d / "model.ply")["means"].shape[0] == m["n_gaussians"]
    assert read_video(d / "turntable.mp4").shape[0] == 4
    # a finished run resumed does no more steps and gives the same model
    before = read_ply(d / "model.ply")["means"]
    run(small_cfg("a red cube"), "sds", tmp_path, resume=True, progress=False)
    assert torch.equal(read_ply(d / "model.ply")["means"], before)


def test_same_seed_same_result(tmp_path):
    a = run(small_cfg("a blue ball", steps=6), "sds", tmp_path / "a", progress=False)
    b = run(small_cfg("a blue ball", steps=6), "sds", tmp_path / "b", progress=False)
    assert a["ground_truth"]["psnr"] == b["ground_truth"]["psnr"]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["generate", ""], "prompt is empty"),
    (["generate", "a red cube", "--steps", "0"], "--steps must be a positive"),
    (["generate", "a red cube", "--teacher", "/no/such/folder"], "not found"),
    (["generate", "a red cube", "--teacher", "nosuch"], "unknown teacher"),
    (["generate", "a purple elephant"], "not a ShapeWorld object"),
    (["generate", "a red cube", "--method", "nope"], "unknown method"),
    (["batch", "/no/prompts.txt"], "prompt file"),
])
def test_cli_bad_input_exit_code_2(args, needle, tmp_path):
    r = run_cli(*args, "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("generate", "a red cube", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "cannot write to output folder" in r.stderr


def test_batch_continues_after_a_failure_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n# a comment\na purple elephant\na green torus\n")
    args = ["batch", str(prompts), "--out", str(tmp_path / "out"), "--steps", "4", "--stage.batch-size", "1",
            "--stage.init-points", "300", "--turntable-frames", "2", "--turntable-size", "32"]
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr  # one prompt failed
    assert "2/3 done, 1 failed" in r.stdout
    assert (tmp_path / "out" / "a-green-torus" / "metrics.json").exists()
    # a prompt rejected before training leaves no folder; its reason is in the summary
    assert not (tmp_path / "out" / "a-purple-elephant").exists()
    rows = {r["prompt"]: r for r in json.loads((tmp_path / "out" / "batch_summary.json").read_text())}
    assert rows["a purple elephant"]["status"] == "failed" and "not a ShapeWorld object" in rows["a purple elephant"]["error"]
    r2 = run_cli(*args)
    assert r2.stderr.count("skip (done)") == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_batch_two_processes_with_accelerate(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # --multi_gpu launches 2 real processes (torchrun); on a CPU-only machine they join over gloo. (--cpu alone
    # starts ONE process: accelerate's multi-CPU mode expects mpirun.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio", "batch", str(prompts),
           "--out", str(tmp_path / "out"), "--steps", "3", "--stage.batch-size", "1", "--stage.init-points", "300",
           "--turntable-frames", "2", "--turntable-size", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2/2 done" in r.stdout
    assert r.stdout.count("2/2 done") == 1  # only the main process prints the summary
    # two real processes, each ran one prompt (sharded), not both
    assert "[rank 0/2] start: a red cube" in r.stderr and "[rank 1/2] start: a blue ball" in r.stderr
    assert r.stderr.count("start: ") == 2


def test_real_model_path_tiny_sd(tmp_path):
    """Tier 1: a tiny SD pipeline of the real diffusers classes, saved and loaded by path like --teacher."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_tiny_sd

    path = make_tiny_sd(tmp_path / "tiny-sd", sample_size=16)
    cfg = small_cfg("a red cube", steps=3, teacher=str(path), guidance_scale=7.5)
    m = run(cfg, "sds", tmp_path / "out", progress=False)
    assert m["teacher"] == str(path) and m["final_loss"] is not None and math.isfinite(m["final_loss"])
    assert (tmp_path / "out" / "a-red-cube" / "model.ply").exists()
