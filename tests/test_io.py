"""studio.io: atomic writes, 3DGS PLY, .splat, MP4 / PNG writing and video reading."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from studio.io import (
    atomic_path,
    atomic_write_bytes,
    make_grid,
    ply_property_names,
    read_ply,
    read_splat,
    read_video,
    write_mp4,
    write_png,
    write_png_grid,
    write_ply,
    write_splat,
)
from studio.students.gaussians import GaussianModel

SH_C0 = 0.28209479177387814


def _gaussians(n=7, degree=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {
        "means": torch.randn(n, 3, generator=g),
        "scales_log": torch.randn(n, 3, generator=g) - 3,
        "quats": torch.randn(n, 4, generator=g),
        "opacity_logits": torch.randn(n, generator=g),
        "sh": torch.randn(n, k, 3, generator=g),
    }


# -------------------------------------------------------------------------------------------- atomic

def test_atomic_write_bytes_and_no_partial_file_on_exception(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".bin" and tmp != target
            tmp.write_bytes(b"half-written")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"first"  # old content intact
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temp left behind
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("crash")
    assert not (tmp_path / "new.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_writers_leave_nothing_on_failure(tmp_path):
    with pytest.raises(ValueError):
        write_ply(tmp_path / "a.ply", torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 4), torch.zeros(3),
                  torch.zeros(3, 2, 3))
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "a.mp4", np.zeros((2, 4, 4, 5), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_mp4_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    import imageio.v2 as iio

    path = write_mp4(tmp_path / "v.mp4", np.zeros((3, 8, 8, 3), np.uint8), fps=3)
    old = path.read_bytes()
    real_get_writer = iio.get_writer

    def failing_get_writer(*args, **kwargs):
        writer = real_get_writer(*args, **kwargs)
        real_append, calls = writer.append_data, []

        def append(frame):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("encoder died")
            real_append(frame)

        writer.append_data = append
        return writer

    monkeypatch.setattr(iio, "get_writer", failing_get_writer)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(path, np.full((5, 8, 8, 3), 200, np.uint8), fps=3)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


# ----------------------------------------------------------------------------------------------- PLY

@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_roundtrip(tmp_path, degree):
    g = _gaussians(n=11, degree=degree, seed=degree)
    path = write_ply(tmp_path / "g.ply", **g)
    d = read_ply(path)
    assert d["sh_degree"] == degree
    assert torch.equal(d["means"], g["means"])
    assert torch.equal(d["scales"], g["scales_log"])
    assert torch.equal(d["quats"], g["quats"])
    assert torch.equal(d["opacities"], g["opacity_logits"])
    assert torch.equal(d["sh"], g["sh"])
    assert torch.equal(d["sh0"], g["sh"][:, :1]) and torch.equal(d["shN"], g["sh"][:, 1:])
    assert d["extra"] == {}
    # header: binary little-endian, one vertex element, Inria property order
    raw = path.read_bytes()
    header = raw[:raw.index(b"end_header\n") + len(b"end_header\n")].decode()
    assert "format binary_little_endian 1.0" in header and "element vertex 11" in header
    props = [ln.split()[-1] for ln in header.splitlines() if ln.startswith("property")]
    assert props == ply_property_names(degree)
    assert all(ln.startswith("property float ") for ln in header.splitlines() if ln.startswith("property"))
    assert len(raw) - len(header) == 11 * 4 * len(props)
    # f_rest is channel-major: f_rest_0 is the first red higher-order coefficient, f_rest_{K-1} the first green
    if degree:
        k = (degree + 1) ** 2
        body = np.frombuffer(raw[len(header):], "<f4").reshape(11, len(props))
        col = {nm: i for i, nm in enumerate(props)}
        assert body[3, col["f_rest_0"]] == g["sh"][3, 1, 0]
        assert body[3, col[f"f_rest_{k - 1}"]] == g["sh"][3, 1, 1]
        assert body[3, col[f"f_rest_{2 * (k - 1)}"]] == g["sh"][3, 1, 2]
        assert body[3, col["f_rest_1"]] == g["sh"][3, 2, 0]


def _inria_file(path, n, rng, byteorder="<", extra_first=False):
    """A 3DGS degree-1 PLY written straight from the Inria layout description (independent of write_ply)."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(9)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    vals = rng.standard_normal((n, len(names))).astype(np.float32)
    fmt = "binary_little_endian" if byteorder == "<" else "binary_big_endian"
    lines = ["ply", f"format {fmt} 1.0", "comment written by hand", "element vertex %d" % n]
    if extra_first:
        lines.append("property uchar red")
    lines += [f"property float {nm}" for nm in names]
    lines += ["property double confidence", "end_header"]
    body = b""
    for r in range(n):
        if extra_first:
            body += struct.pack(byteorder + "B", r % 256)
        body += struct.pack(byteorder + "%df" % len(names), *vals[r].tolist())
        body += struct.pack(byteorder + "d", r * 0.5)
    path.write_bytes(("\n".join(lines) + "\n").encode() + body)
    return {nm: vals[:, i] for i, nm in enumerate(names)}


@pytest.mark.parametrize("byteorder,extra_first", [("<", False), (">", True)])
def test_ply_handwritten_inria_file_loads(tmp_path, byteorder, extra_first):
    rng = np.random.default_rng(0)
    v = _inria_file(tmp_path / "h.ply", 5, rng, byteorder, extra_first)
    d = read_ply(tmp_path / "h.ply")
    assert d["sh_degree"] == 1
    np.testing.assert_array_equal(d["means"].numpy(), np.stack([v["x"], v["y"], v["z"]], 1))
    np.testing.assert_array_equal(d["opacities"].numpy(), v["opacity"])
    np.testing.assert_array_equal(d["scales"].numpy(), np.stack([v[f"scale_{i}"] for i in range(3)], 1))
    np.testing.assert_array_equal(d["quats"].numpy(), np.stack([v[f"rot_{i}"] for i in range(4)], 1))
    np.testing.assert_array_equal(d["sh"][:, 0].numpy(), np.stack([v[f"f_dc_{i}"] for i in range(3)], 1))
    # channel-major f_rest: red coefficients are f_rest_0..2, green 3..5, blue 6..8
    for c in range(3):
        for j in range(3):
            np.testing.assert_array_equal(d["sh"][:, 1 + j, c].numpy(), v[f"f_rest_{3 * c + j}"])
    np.testing.assert_array_equal(d["extra"]["confidence"].numpy(), np.arange(5) * 0.5)
    if extra_first:
        assert d["extra"]["red"].tolist() == [0, 1, 2, 3, 4]
    model = GaussianModel.from_ply(tmp_path / "h.ply")
    assert model.sh_degree == 1 and model.active_sh_degree == 1 and len(model) == 5


def test_ply_ascii_and_f_rest_numeric_order(tmp_path):
    # ascii, f_rest listed out of order (f_rest_10 before f_rest_2 would break a lexicographic sort)
    n_rest = 24
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in reversed(range(n_rest))]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    vals = np.arange(2 * len(names), dtype=np.float32).reshape(2, len(names))
    text = "ply\nformat ascii 1.0\nelement vertex 2\n" + "".join(f"property float {nm}\n" for nm in names)
    text += "end_header\n" + "\n".join(" ".join(str(x) for x in row) for row in vals) + "\n"
    (tmp_path / "a.ply").write_text(text)
    d = read_ply(tmp_path / "a.ply")
    assert d["sh_degree"] == 2 and d["sh"].shape == (2, 9, 3)
    col = {nm: i for i, nm in enumerate(names)}
    assert float(d["sh"][1, 1, 0]) == vals[1, col["f_rest_0"]]
    assert float(d["sh"][1, 3, 1]) == vals[1, col["f_rest_10"]]  # green (8 per channel), third coefficient
    assert torch.equal(d["normals"], torch.zeros(2, 3))


def test_ply_errors(tmp_path):
    with pytest.raises(ValueError, match="could not read PLY .*missing.ply.*not found"):
        read_ply(tmp_path / "missing.ply")
    (tmp_path / "x.ply").write_bytes(b"hello")
    with pytest.raises(ValueError, match="does not start with 'ply'"):
        read_ply(tmp_path / "x.ply")
    g = _gaussians(4, 1)
    p = write_ply(tmp_path / "t.ply", **g)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_ply(p)
    rest5 = "ply\nformat binary_little_endian 1.0\nelement vertex 0\n" + "".join(
        f"property float {nm}\n" for nm in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "f_rest_0", "f_rest_1"])
    (tmp_path / "r.ply").write_text(rest5 + "end_header\n")
    with pytest.raises(ValueError, match="f_rest"):
        read_ply(tmp_path / "r.ply")


def test_model_ply_roundtrip(tmp_path):
    model = GaussianModel.random_in_sphere(30, seed=0, sh_degree=3)
    with torch.no_grad():
        model.params["shN"].normal_()
        model.params["quats"].normal_()
    model.save_ply(tmp_path / "m.ply")
    back = GaussianModel.from_ply(tmp_path / "m.ply")
    for k in ("means", "scales", "quats", "opacities", "sh0", "shN"):
        assert torch.equal(back.params[k], model.params[k]), k


# --------------------------------------------------------------------------------------------- splat

def test_splat_layout_and_values(tmp_path):
    means = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]])
    scales_log = torch.log(torch.tensor([[0.1, 0.1, 0.1], [1.0, 2.0, 0.5]]))
    quats = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.5, 0.5, -0.5, 0.5]])
    opacity_logits = torch.tensor([0.0, 2.0])
    sh = torch.zeros(2, 4, 3)
    sh[0, 0] = torch.tensor([1.0, -1.0, 10.0])
    path = write_splat(tmp_path / "s.splat", means, scales_log, quats, opacity_logits, sh)
    raw = path.read_bytes()
    assert len(raw) == 2 * 32
    # the second Gaussian is bigger (size 1 * sigmoid(2)) so it comes first
    first = struct.unpack("<3f3f4B4B", raw[:32])
    assert first[:3] == pytest.approx((-1.0, 0.5, 0.25))
    assert first[3:6] == pytest.approx((1.0, 2.0, 0.5), rel=1e-6)
    assert first[6:9] == (127, 127, 127)  # f_dc 0 -> 0.5 * 255 = 127.5, truncated
    assert first[9] == int(1 / (1 + np.exp(-2.0)) * 255)
    assert first[10:14] == (192, 192, 64, 192)  # (0.5, 0.5, -0.5, 0.5) * 128 + 128
    second = struct.unpack("<3f3f4B4B", raw[32:])
    assert second[:3] == pytest.approx((1.0, 2.0, 3.0))
    r, g_, b = (np.clip(0.5 + SH_C0 * np.array([1.0, -1.0, 10.0]), 0, 1) * 255).astype(np.uint8)
    assert second[6:10] == (r, g_, b, 127)
    assert second[10:14] == (255, 128, 128, 128)  # normalised (1,0,0,0): 256 clamps to 255
    d = read_splat(path)
    assert d["means"].shape == (2, 3) and torch.allclose(d["scales"][1], torch.full((3,), 0.1))
    assert d["rgba"][0].tolist() == [127, 127, 127, first[9]]
    model = GaussianModel.random_in_sphere(9, seed=0)
    model.save_splat(tmp_path / "m.splat")
    assert (tmp_path / "m.splat").stat().st_size == 9 * 32
    sizes = read_splat(tmp_path / "m.splat")["scales"].prod(-1) * read_splat(tmp_path / "m.splat")["opacities"]
    assert bool((sizes[:-1] >= sizes[1:] - 1e-6).all())  # descending size x opacity
    (tmp_path / "bad.splat").write_bytes(b"x" * 33)
    with pytest.raises(ValueError, match="multiple of 32"):
        read_splat(tmp_path / "bad.splat")


# ------------------------------------------------------------------------------------------ video / png

def test_mp4_write_then_read(tmp_path):
    import imageio.v3 as iio

    t, h, w = 12, 33, 47  # odd sizes are padded to even
    frames = np.zeros((t, h, w, 3), np.float32)
    for i in range(t):
        frames[i, :, :, 0] = i / (t - 1)  # red ramps over time
        frames[i, :, : w // 2, 2] = 1.0  # blue left half
    path = write_mp4(tmp_path / "clip.mp4", torch.from_numpy(frames), fps=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(12) and meta["duration"] == pytest.approx(1.0, abs=0.1)
    video = read_video(path)
    assert video.shape == (t, h + 1, w + 1, 3) and video.dtype == torch.float32
    assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    red = video[:, 10:20, 30:40, 0].mean(dim=(1, 2))
    assert float(red[0]) < 0.1 and float(red[-1]) > 0.9 and bool((red[1:] >= red[:-1] - 0.03).all())
    assert float(video[5, 16, 5, 2]) > 0.8 and float(video[5, 16, 40, 2]) < 0.2
    sub = read_video(path, num_frames=4, size=(16, 24))
    assert sub.shape == (4, 16, 24, 3)
    assert float(sub[0, ..., 0].mean()) < 0.1 and float(sub[-1, ..., 0].mean()) > 0.9
    assert read_video(path, num_frames=1, size=8).shape == (1, 8, 8, 3)


def test_read_video_imageio_fallback(tmp_path, monkeypatch):
    import builtins

    frames = (np.random.default_rng(0).random((5, 16, 16, 3)) * 255).astype(np.uint8)
    path = write_mp4(tmp_path / "c.mp4", frames, fps=5)
    real_import = builtins.__import__

    def no_decord(name, *args, **kwargs):
        if name == "decord":
            raise ImportError("no decord here")
        return real_import(name, *args, **kwargs)

    with_decord = read_video(path, num_frames=3)
    monkeypatch.setattr(builtins, "__import__", no_decord)
    without = read_video(path, num_frames=3)
    assert without.shape == with_decord.shape == (3, 16, 16, 3)
    assert float((without - with_decord).abs().mean()) < 0.02


def test_read_video_errors(tmp_path):
    with pytest.raises(ValueError, match=r"could not read video '.*nope\.mp4': file not found; expected an mp4/webm/gif file"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match=r"could not read video '.*junk\.mp4': .*expected an mp4/webm/gif file"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="not a regular file"):
        read_video(tmp_path)


def test_png_and_grid(tmp_path):
    from PIL import Image

    img = torch.zeros(5, 7, 3)
    img[..., 1] = 1.0
    write_png(tmp_path / "a.png", img)
    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert back.shape == (5, 7, 3) and back[0, 0].tolist() == [0, 255, 0]
    write_png(tmp_path / "g.png", np.full((4, 4), 0.5, np.float32))  # grey, no channel axis
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (4, 4, 3)

    images = np.stack([np.full((4, 6, 3), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    grid = write_png_grid(tmp_path / "grid.png", images, ncols=3)
    assert grid.shape == (2 * 4, 3 * 6, 3)
    loaded = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(loaded, grid)
    assert loaded[0, 0, 0] == 10 and loaded[0, 6, 0] == 20 and loaded[0, 12, 0] == 30
    assert loaded[4, 0, 0] == 40 and loaded[4, 6, 0] == 50 and loaded[4, 12, 0] == 255  # empty cell: white
    padded = make_grid(torch.rand(4, 3, 3, 3), pad=1, pad_value=0.0)
    assert padded.shape == (7, 7, 3) and padded[3, :, :].max() == 0
    with pytest.raises(ValueError, match="channels last"):
        write_png(tmp_path / "bad.png", np.zeros((3, 4, 5, 6)))
