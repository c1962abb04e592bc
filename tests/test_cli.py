"""The `studio` command: help, doctor, the render demo and rendering a PLY."""
import json
import os
import subprocess
import sys
from pathlib import Path

from studio.io import read_ply, read_splat, read_video

REPO = Path(__file__).resolve().parents[1]


def studio(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, env=env, timeout=600)


def test_help_lists_commands():
    r = studio("--help")
    assert r.returncode == 0
    for cmd in ("generate", "batch", "demo", "render", "doctor", "build-ext"):
        assert cmd in r.stdout


def test_doctor_table():
    r = studio("doctor")
    assert r.returncode == 0, r.stderr
    for row in ("torch", "CUDA", "C++ compiler", "nvcc", "native extension", "cuda extension", "gsplat"):
        assert row in r.stdout


def test_demo_then_render_the_ply(tmp_path):
    out = tmp_path / "demo"
    r = studio("demo", "--object", "house", "--out", str(out), "--frames", "6", "--size", "48", "--n-gaussians", "3000")
    assert r.returncode == 0, r.stderr
    ply = read_ply(out / "house.ply")
    assert ply["means"].shape == (3000, 3) and ply["sh_degree"] == 0
    assert read_splat(out / "house.splat")["means"].shape == (3000, 3)
    video = read_video(out / "turntable.mp4")
    assert video.shape[0] == 6 and video.shape[1:] == (48, 48, 3)
    assert json.loads((out / "config.json").read_text())["object_name"] == "house"
    assert (out / "views.png").stat().st_size > 0
    r = studio("render", str(out / "house.ply"), "--out", str(tmp_path / "r"), "--frames", "3", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert read_video(tmp_path / "r" / "turntable.mp4").shape[0] == 3


def test_demo_and_render_errors(tmp_path):
    r = studio("demo", "--object", "dragon", "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown ShapeWorld object" in r.stderr and "Traceback" not in r.stderr
    r = studio("render", str(tmp_path / "missing.ply"))
    assert r.returncode == 2 and "could not read PLY" in r.stderr
    r = studio("demo", "--frames", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "--frames" in r.stderr
