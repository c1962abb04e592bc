"""Issue 15, messages of the file readers: a NaN in a PLY names the file, ``studio render`` reads the project's
own ``.splat`` output and refuses a file with 0 Gaussians, a damaged ``model_index.json`` names the file and
the fix. All are ``UserError`` (CLI exit code 2)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.demo import read_gaussians, render_ply
from studio.errors import UserError
from studio.io import read_ply, read_splat, write_ply, write_splat
from studio.io.splat import SH_C0

REPO = Path(__file__).resolve().parents[1]


def gaussians(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"means": torch.randn(n, 3, generator=g) * 0.3, "scales_log": torch.log(torch.rand(n, 3, generator=g) * 0.05 + 0.02),
            "quats": torch.randn(n, 4, generator=g), "opacity_logits": torch.randn(n, generator=g),
            "sh": torch.randn(n, 1, 3, generator=g) * 0.5}


def render_kw(tmp_path):
    return dict(out=tmp_path / "render", frames=2, size=16, radius=3.2, elevation=15.0, fovy=35.0, backend="torch")


def test_nan_in_a_ply_names_the_file_the_property_and_the_vertex(tmp_path):
    g = gaussians(5)
    g["means"][3, 1] = float("nan")
    path = write_ply(tmp_path / "broken.ply", **g)
    with pytest.raises(UserError, match=r"broken\.ply.*positions.*1 of its 5 Gaussians.*vertex 3"):
        read_ply(path)
    g = gaussians(5)
    g["opacity_logits"][0] = float("inf")
    path = write_ply(tmp_path / "inf.ply", **g)
    with pytest.raises(UserError, match=r"inf\.ply.*opacity") as e:
        render_ply(path, **render_kw(tmp_path))
    assert "check the values you pass" not in str(e.value)


def test_splat_round_trip(tmp_path):
    g = gaussians(40)
    path = write_splat(tmp_path / "m.splat", **g)
    d = read_splat(path)
    order = torch.argsort(-(torch.exp(g["scales_log"]).prod(-1) * torch.sigmoid(g["opacity_logits"])), stable=True)
    assert torch.equal(d["means"], g["means"][order])
    assert torch.allclose(d["scales"], torch.exp(g["scales_log"][order]), rtol=1e-6)
    rgb = (0.5 + SH_C0 * g["sh"][order, 0]).clamp(0, 1)
    assert (d["colors"] - rgb).abs().max() <= 1 / 255 + 1e-6
    assert (d["opacities"] - torch.sigmoid(g["opacity_logits"][order])).abs().max() <= 1 / 255 + 1e-6
    q = g["quats"][order] / g["quats"][order].norm(dim=-1, keepdim=True)
    assert (d["quats"] - q).abs().max() <= 1 / 128 + 1e-6
    # written again from what was read: the same bytes
    again = write_splat(tmp_path / "again.splat", d["means"], torch.log(d["scales"]), d["quats"],
                        torch.logit(d["opacities"].clamp(1e-6, 1 - 1e-6)), (d["colors"] - 0.5) / SH_C0)
    assert np.frombuffer(again.read_bytes(), np.uint8).shape == np.frombuffer(path.read_bytes(), np.uint8).shape


def test_render_reads_the_projects_own_splat_output(tmp_path):
    g = gaussians(30)
    path = write_splat(tmp_path / "model.splat", **g)
    gs, degree, fmt = read_gaussians(path)
    assert fmt == "splat" and degree is None and gs["means"].shape == (30, 3)
    assert torch.allclose(gs["quats"].norm(dim=-1), torch.ones(30), atol=1e-5)
    m = render_ply(path, **render_kw(tmp_path))
    assert m["format"] == "splat" and m["n_gaussians"] == 30
    assert (tmp_path / "render" / "turntable.mp4").stat().st_size > 0
    # the same Gaussians from the PLY render alike (the splat keeps base colours, quantised to bytes)
    ply = write_ply(tmp_path / "model.ply", **g)
    assert read_gaussians(ply)[2] == "ply"


def test_render_refuses_a_file_with_no_gaussians(tmp_path):
    empty = write_ply(tmp_path / "empty.ply", **gaussians(0))
    with pytest.raises(UserError, match=r"empty\.ply.*0 Gaussians"):
        render_ply(empty, **render_kw(tmp_path))
    (tmp_path / "empty.splat").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.splat.*0 Gaussians"):
        render_ply(tmp_path / "empty.splat", **render_kw(tmp_path))
    assert not (tmp_path / "render" / "turntable.mp4").exists()


def test_studio_render_of_an_empty_ply_exits_2_with_the_message(tmp_path):
    empty = write_ply(tmp_path / "empty.ply", **gaussians(0))
    r = subprocess.run([sys.executable, "-m", "studio", "render", str(empty), "--out", str(tmp_path / "r"),
                        "--frames", "2", "--size", "16", "--backend", "torch"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "0 Gaussians" in r.stderr and "Traceback" not in r.stderr


def test_render_refuses_non_finite_camera_numbers(tmp_path):
    path = write_ply(tmp_path / "m.ply", **gaussians(3))
    for name in ("radius", "elevation", "fovy"):
        kw = render_kw(tmp_path)
        kw[name] = float("nan")
        with pytest.raises(UserError, match=f"--{name}"):
            render_ply(path, **kw)


def test_splat_and_ply_reader_errors_are_user_errors(tmp_path):
    (tmp_path / "bad.splat").write_bytes(b"x" * 33)
    with pytest.raises(UserError, match=r"bad\.splat.*multiple of 32"):
        read_splat(tmp_path / "bad.splat")
    rec = bytearray(write_splat(tmp_path / "n.splat", **gaussians(2)).read_bytes())
    rec[0:4] = np.float32("nan").tobytes()
    (tmp_path / "n.splat").write_bytes(bytes(rec))
    with pytest.raises(UserError, match=r"n\.splat.*non-finite.*positions"):
        read_splat(tmp_path / "n.splat")
    (tmp_path / "x.ply").write_bytes(b"hello")
    with pytest.raises(UserError, match=r"x\.ply.*does not start with 'ply'"):
        read_ply(tmp_path / "x.ply")


@pytest.mark.parametrize("content", ['{"_class_name": "StableDiffusionPipeline", ', '["unet"]', b"\xff\xfe{}"])
def test_damaged_model_index_names_the_file_and_the_fix(tmp_path, content):
    from studio.teachers.registry import load_teacher

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    f = folder / "model_index.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        load_teacher(str(folder))
    msg = str(e.value)
    assert str(f) in msg and "damaged" in msg and "download the model again" in msg
