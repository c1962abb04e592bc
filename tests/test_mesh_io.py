"""Mesh export and import (studio.io.mesh), texture baking (studio.students.texture) and the mesh turntable.

Round trips go through trimesh (an independent reader); the baked UV texture is checked by rendering the
unwrapped mesh with it and comparing against rendering the colour field directly.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from studio.errors import UserError
from studio.io import (
    read_mesh,
    read_video,
    uv_unwrap,
    write_glb,
    write_mp4,
    write_obj,
    xatlas_available,
)
from studio.render.turntable import render_mesh_turntable
from studio.students.dmtet import marching_tetrahedra, sphere_sdf, tet_grid
from studio.students.texture import (
    TextureField,
    bake_texture,
    bake_vertex_colors,
    export_textured_mesh,
)

needs_xatlas = pytest.mark.skipif(not xatlas_available(), reason="optional xatlas package not installed")


@pytest.fixture(scope="module")
def sphere():
    v, t = tet_grid(10)
    verts, faces = marching_tetrahedra(v, t, sphere_sdf(0.6)(v))
    return verts.detach(), faces


@pytest.fixture(scope="module")
def field():
    torch.manual_seed(3)
    tex = TextureField(n_frequencies=2, hidden=16)
    with torch.no_grad():  # a colourful field (the default init is nearly uniform grey)
        for p in tex.parameters():
            p.mul_(4)
    return tex


def test_vertex_color_roundtrip_obj_and_glb(tmp_path, sphere):
    verts, faces = sphere
    colors = torch.rand(verts.shape[0], 3)
    for name, writer in (("m.obj", write_obj), ("m.glb", write_glb)):
        writer(tmp_path / name, verts, faces, vertex_colors=colors)
        back = read_mesh(tmp_path / name)
        assert back["verts"].shape == verts.shape and torch.equal(back["faces"], faces)
        torch.testing.assert_close(back["verts"], verts, atol=1e-5, rtol=0)
        assert float((back["vertex_colors"] - colors).abs().max()) <= 1 / 255 + 1e-6  # 8-bit (GLB) / 5 digits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.glb", "m.obj"]  # atomic: no temp files left


def test_plain_mesh_and_uint8_colors(tmp_path, sphere):
    verts, faces = sphere
    write_obj(tmp_path / "p.obj", verts, faces)
    back = read_mesh(tmp_path / "p.obj")
    assert "vertex_colors" not in back and back["faces"].shape == faces.shape
    c8 = torch.randint(0, 256, (verts.shape[0], 3), dtype=torch.uint8)
    write_glb(tmp_path / "c.glb", verts, faces, vertex_colors=c8)
    assert torch.equal((read_mesh(tmp_path / "c.glb")["vertex_colors"] * 255).round().to(torch.uint8), c8)


def test_textured_obj_writes_png_and_mtl(tmp_path):
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uvs = verts[:, :2].clone()
    img = np.zeros((8, 8, 3), np.float32)
    img[:4] = (1.0, 0.0, 0.0)  # top half red (v > 0.5)
    write_obj(tmp_path / "q.obj", verts, faces, uvs=uvs, texture=img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.mtl", "q.obj", "q.png"]
    assert "map_Kd q.png" in (tmp_path / "q.mtl").read_text()
    assert "mtllib q.mtl" in (tmp_path / "q.obj").read_text()
    back = read_mesh(tmp_path / "q.obj")
    torch.testing.assert_close(back["uvs"], uvs)
    assert back["texture"].shape == (8, 8, 3)
    torch.testing.assert_close(back["texture"][0, 0], torch.tensor([1.0, 0, 0]))
    write_glb(tmp_path / "q.glb", verts, faces, uvs=uvs, texture=img)
    back = read_mesh(tmp_path / "q.glb")
    torch.testing.assert_close(back["uvs"], uvs)
    torch.testing.assert_close(back["texture"][0, 0], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(back["texture"][-1, 0], torch.tensor([0.0, 0, 0]))


def test_bad_input_messages(tmp_path, sphere):
    verts, faces = sphere
    with pytest.raises(UserError, match="faces index"):
        write_obj(tmp_path / "a.obj", verts[:5], faces)
    with pytest.raises(UserError, match="needs per-vertex uvs"):
        write_glb(tmp_path / "a.glb", verts, faces, texture=np.zeros((4, 4, 3)))
    with pytest.raises(UserError, match="vertex_colors"):
        write_obj(tmp_path / "a.obj", verts, faces, vertex_colors=torch.zeros(3, 3))
    with pytest.raises(UserError, match=r"\.obj"):
        write_obj(tmp_path / "a.ply", verts, faces)
    with pytest.raises(UserError, match="not found"):
        read_mesh(tmp_path / "missing.glb")
    (tmp_path / "junk.glb").write_bytes(b"not a mesh")
    with pytest.raises(UserError, match="junk.glb"):
        read_mesh(tmp_path / "junk.glb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.glb"]


def test_bake_vertex_colors_matches_field(sphere, field):
    verts, _ = sphere
    vc = bake_vertex_colors(verts, field, chunk=100)
    torch.testing.assert_close(vc, field(verts).detach().clamp(0, 1))


@needs_xatlas
def test_uv_unwrap_and_baked_texture_reproduce_the_field(sphere, field):
    verts, faces = sphere
    v2, f2, uvs, vmap = uv_unwrap(verts, faces)
    assert f2.shape == faces.shape and torch.equal(v2, verts[vmap])
    assert uvs.min() >= 0 and uvs.max() <= 1
    # same geometry: every new face is an old face with vertices renamed
    torch.testing.assert_close(v2[f2], verts[faces])
    img, covered = bake_texture(v2, f2, uvs, field, 192)
    assert 0.3 < float(covered.float().mean()) < 1.0
    direct = render_mesh_turntable(verts, faces, field, n_frames=3, size=48)
    baked = render_mesh_turntable(v2, f2, img, uvs=uvs, n_frames=3, size=48)
    assert float((direct - baked).abs().mean()) < 5e-3
    flipped = render_mesh_turntable(v2, f2, img.flip(0), uvs=uvs, n_frames=3, size=48)  # wrong v convention
    assert float((direct - flipped).abs().mean()) > 4 * float((direct - baked).abs().mean())


@needs_xatlas
def test_export_textured_glb_and_obj(tmp_path, sphere, field):
    verts, faces = sphere
    info = export_textured_mesh(tmp_path / "t.glb", verts, faces, field, texture_size=64)
    assert info["mode"] == "uv"
    back = read_mesh(tmp_path / "t.glb")
    assert back["texture"].shape == (64, 64, 3) and back["uvs"].shape[0] == back["verts"].shape[0]
    info = export_textured_mesh(tmp_path / "sub" / "t.obj", verts, faces, field, texture_size=64)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["t.mtl", "t.obj", "t.png"]


def test_export_falls_back_to_vertex_colors_without_xatlas(tmp_path, sphere, field, monkeypatch):
    import studio.io.mesh as mesh_io

    verts, faces = sphere
    monkeypatch.setattr(mesh_io, "xatlas_available", lambda: False)
    with pytest.warns(UserWarning, match="xatlas"):
        info = export_textured_mesh(tmp_path / "v.glb", verts, faces, field)
    assert info["mode"] == "vertex_colors"
    back = read_mesh(tmp_path / "v.glb")
    assert back["verts"].shape == verts.shape
    assert float((back["vertex_colors"] - bake_vertex_colors(verts, field)).abs().max()) <= 1 / 255 + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert export_textured_mesh(tmp_path / "w.obj", verts, faces, field, uv=False)["mode"] == "vertex_colors"
    with pytest.raises(UserError, match=r"\.obj or \.glb"):
        export_textured_mesh(tmp_path / "w.stl", verts, faces, field)


def test_mesh_turntable_mp4(tmp_path, sphere, field):
    verts, faces = sphere
    frames = render_mesh_turntable(verts, faces, None, n_frames=5, size=32)
    assert frames.shape == (5, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
    assert float(frames[:, 0, 0].min()) == 1.0  # white background in the corner
    assert float(frames[:, 16, 16].max()) < 0.95  # the shaded sphere in the centre
    colored = render_mesh_turntable(verts, faces, torch.tensor([1.0, 0.0, 0.0]).expand(verts.shape[0], 3),
                                    n_frames=5, size=32)
    torch.testing.assert_close(colored[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]).expand(5, 3))
    textured = render_mesh_turntable(verts, faces, field, n_frames=5, size=32)
    assert not torch.allclose(textured[0], textured[2], atol=1e-3)  # the field differs around the orbit
    path = write_mp4(tmp_path / "turntable.mp4", textured, fps=5)
    video = read_video(path)
    assert video.shape == (5, 32, 32, 3)
    assert float((video - textured).abs().mean()) < 0.06  # lossy H.264 of the same frames
