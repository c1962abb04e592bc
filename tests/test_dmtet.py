"""DMTet student (studio.students.dmtet): tetrahedral grid, marching tetrahedra, regularisers, fitting;
and the texture field renderer (studio.students.texture).

References are independent of the code under test where possible: analytic sphere distances, determinant
volumes, the right-hand rule on hand-made meshes, finite differences (gradcheck), ShapeWorld silhouettes.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from studio.errors import UserError
from studio.render import face_normals, mesh_edge_topology, render_mesh
from studio.students.dmtet import (
    TET_EDGES,
    DMTet,
    laplacian_loss,
    marching_tetrahedra,
    mesh_edges,
    normal_consistency_loss,
    sdf_sign_flip_loss,
    sphere_sdf,
    tet_edges,
    tet_grid,
    uniform_laplacian,
)
from studio.students.texture import TextureField, render_textured
from studio.world.metrics import chamfer_to_surface, silhouette_iou
from studio.world.objects import get_object

# ----------------------------------------------------------------------------------------------- helpers


def tet_volumes6(verts, tets):
    """Six times the signed volumes: det[v1 - v0, v2 - v0, v3 - v0]."""
    a = verts[tets]
    return torch.linalg.det(torch.stack([a[:, 1] - a[:, 0], a[:, 2] - a[:, 0], a[:, 3] - a[:, 0]], dim=-1))


def edge_face_counts(faces):
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, counts = torch.unique(torch.sort(e, dim=-1).values, dim=0, return_counts=True)
    return counts


def box_sdf(half):
    h = torch.as_tensor(half, dtype=torch.float32)

    def fn(p):
        q = p.abs() - h
        return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)

    return fn


def flat_patch(n=6):
    """An n x n grid of vertices in the z = 0 plane, every quad split along the same diagonal."""
    ij = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1, 2).float()
    verts = torch.cat([ij, torch.zeros(n * n, 1)], dim=1)
    faces = []
    for i, j in itertools.product(range(n - 1), range(n - 1)):
        a, b, c, d = i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1
        faces += [(a, b, c), (a, c, d)]
    return verts, torch.tensor(faces)


@pytest.fixture(scope="module")
def sphere_mesh():
    v, t = tet_grid(32)
    return marching_tetrahedra(v, t, sphere_sdf(0.6)(v))


# ------------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("R", [1, 3, 5])
def test_tet_grid_counts_volumes_and_conformity(R):
    verts, tets = tet_grid(R, ((-1.0, -0.5, 0.0), (1.0, 0.5, 2.0)))
    assert verts.shape == ((R + 1) ** 3, 3) and tets.shape == (6 * R ** 3, 4)
    assert torch.unique(tets).numel() == verts.shape[0]  # every vertex used, indices shared between cells
    assert torch.unique(verts, dim=0).shape[0] == verts.shape[0]  # no duplicated positions
    cell = torch.tensor([2.0, 1.0, 2.0]) / R
    vol6 = tet_volumes6(verts, tets)
    assert (vol6 > 0).all()
    torch.testing.assert_close(vol6, torch.full_like(vol6, float(cell.prod())))  # each tet = cell / 6
    assert float(vol6.sum() / 6) == pytest.approx(4.0, rel=1e-5)  # the tets tile the box exactly
    # conforming: interior triangles shared by exactly 2 tets, boundary triangles (2 per boundary cell face) by 1
    tri = torch.cat([tets[:, [1, 2, 3]], tets[:, [0, 2, 3]], tets[:, [0, 1, 3]], tets[:, [0, 1, 2]]])
    _, counts = torch.unique(torch.sort(tri, dim=-1).values, dim=0, return_counts=True)
    assert counts.max() == 2
    assert int((counts == 1).sum()) == 12 * R * R
    # edges: unique sorted pairs, each an edge of some tet
    e = tet_edges(tets)
    assert (e[:, 0] < e[:, 1]).all() and torch.unique(e, dim=0).shape[0] == e.shape[0]


def test_tet_grid_bad_input():
    with pytest.raises(UserError, match="resolution"):
        tet_grid(0)
    with pytest.raises(UserError, match="bbox"):
        tet_grid(4, ((0, 0, 0), (1, -1, 1)))


# ------------------------------------------------------------------------------------- marching tetrahedra


def test_case_table_orientation_every_case():
    """All 16 sign cases on a random positively oriented tetrahedron: 0 / 1 / 2 triangles, every vertex on a
    sign-changing edge at the SDF's zero, every normal pointing from the inside vertices to the outside."""
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        v = torch.randn(4, 3, generator=g, dtype=torch.float64)
        if tet_volumes6(v, torch.tensor([[0, 1, 2, 3]])) < 0:
            v = v[[0, 1, 3, 2]]
        mag = 0.1 + torch.rand(4, generator=g, dtype=torch.float64)
        for case in range(16):
            inside = torch.tensor([bool(case >> k & 1) for k in range(4)])
            s = torch.where(inside, -mag, mag)
            mv, f = marching_tetrahedra(v, torch.tensor([[0, 1, 2, 3]]), s)
            n_in = int(inside.sum())
            assert f.shape[0] == (0 if n_in in (0, 4) else 1 if n_in in (1, 3) else 2)
            assert mv.shape[0] == n_in * (4 - n_in)
            if f.shape[0] == 0:
                continue
            # each mesh vertex is the zero of the linear interpolant on one cut edge
            on_edge = []
            for a, b in TET_EDGES:
                if inside[a] != inside[b]:
                    on_edge.append((v[a] * s[b] - v[b] * s[a]) / (s[b] - s[a]))
            torch.testing.assert_close(torch.sort(mv.sum(-1)).values, torch.sort(torch.stack(on_edge).sum(-1)).values)
            direction = v[~inside].mean(0) - v[inside].mean(0)
            n = torch.linalg.cross(mv[f[:, 1]] - mv[f[:, 0]], mv[f[:, 2]] - mv[f[:, 0]], dim=-1)
            assert ((n @ direction) > 0).all(), (trial, case)


def test_sphere_watertight_outward_and_close(sphere_mesh):
    mv, f = sphere_mesh
    assert f.shape[0] > 1000
    counts = edge_face_counts(f)
    assert (counts == 2).all()  # closed 2-manifold edges
    assert (mesh_edge_topology(f) >= 0).all()
    assert mv.shape[0] - mesh_edges(f).shape[0] + f.shape[0] == 2  # Euler characteristic of a sphere
    n = face_normals(mv, f)
    assert ((n * mv[f].mean(1)).sum(-1) > 0).all()  # outward
    assert float((mv.norm(dim=-1) - 0.6).abs().max()) < 0.01  # cell = 0.0625
    surf = get_object("blue_ball").surface(8000).points  # the ShapeWorld r = 0.6 sphere
    c = chamfer_to_surface(mv, surf)
    assert float(c["chamfer"]) < 0.025


def test_marching_tets_gradients_match_finite_differences():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.float64)
    tets = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    s0 = torch.tensor([-0.3, 0.4, -0.2, 0.5, 0.7], dtype=torch.float64)

    def f_s(s):
        return marching_tetrahedra(v, tets, s)[0]

    def f_v(verts):
        return marching_tetrahedra(verts, tets, s0)[0]

    assert torch.autograd.gradcheck(f_s, (s0.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(f_v, (v.clone().requires_grad_(),))


def test_marching_tets_empty_and_bad_input():
    v, t = tet_grid(2)
    sdf = torch.ones(v.shape[0], requires_grad=True)
    mv, f = marching_tetrahedra(v, t, sdf)
    assert mv.shape == (0, 3) and f.shape == (0, 3)
    mv.sum().backward()  # still in the graph
    assert torch.equal(sdf.grad, torch.zeros_like(sdf))
    with pytest.raises(UserError, match="sdf"):
        marching_tetrahedra(v, t, torch.ones(3))
    with pytest.raises(UserError, match="tets"):
        marching_tetrahedra(v, t.float(), torch.ones(v.shape[0]))


# ------------------------------------------------------------------------------------------------ student


def test_dmtet_gradients_reach_sdf_and_deformation():
    model = DMTet.from_sdf(sphere_sdf(0.5), resolution=8)
    verts, _ = model.mesh()
    # a loss whose minimiser moves the surface: push every vertex to radius 0.3
    loss = (verts.norm(dim=-1) - 0.3).pow(2).mean()
    loss.backward()
    assert model.sdf.grad is not None and float(model.sdf.grad.abs().sum()) > 0
    assert model.deformation.grad is not None and float(model.deformation.grad.abs().sum()) > 0
    # only vertices on cut edges get an SDF gradient
    cut = torch.zeros_like(model.sdf, dtype=torch.bool)
    e = model.edges
    s = model.sdf.detach()
    crossing = (s[e[:, 0]] < 0) != (s[e[:, 1]] < 0)
    cut[e[crossing].reshape(-1)] = True
    assert (model.sdf.grad[~cut] == 0).all()


def test_dmtet_deformation_bounded_and_param_groups():
    model = DMTet(resolution=4, bbox=1.0)
    with torch.no_grad():
        model.deformation.copy_(torch.randn_like(model.deformation) * 100)
    moved = (model.vertices() - model.grid_verts).abs().detach()
    assert float(moved.max()) <= 0.5 * 0.5 + 1e-6  # half a cell (cell = 2 / 4)
    assert float(moved.max()) > 0.2
    groups = model.param_groups(lr=0.01, lr_deformation=0.001)
    assert [g["name"] for g in groups] == ["sdf", "deformation"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == 0.001
    assert isinstance(model.make_optimizer(), torch.optim.Adam)


def test_dmtet_from_sdf_inputs():
    v, _ = tet_grid(6)
    values = box_sdf((0.4, 0.3, 0.2))(v)
    a = DMTet.from_sdf(values, resolution=6)
    b = DMTet.from_sdf(box_sdf((0.4, 0.3, 0.2)), resolution=6, chunk=50)  # chunked evaluation
    torch.testing.assert_close(a.sdf, b.sdf)
    with pytest.raises(UserError, match="one value per grid vertex"):
        DMTet.from_sdf(values[:-1], resolution=6)
    with pytest.raises(UserError, match="NaN"):
        DMTet.from_sdf(lambda p: p[:, 0] * float("nan"), resolution=2)
    with pytest.raises(UserError, match="callable"):
        DMTet.from_sdf("sphere", resolution=2)


def test_dmtet_fits_shapeworld_silhouettes(tmp_path, monkeypatch):
    """From a smaller box SDF, a few Adam steps on ShapeWorld's red-cube silhouettes (mesh rasterizer with
    antialiasing: the only source of silhouette gradients) lower the loss and raise the IoU."""
    monkeypatch.setenv("STUDIO_SHAPEWORLD_CACHE", str(tmp_path))
    from studio.world.references import reference_views

    ref = reference_views("red_cube", n_azimuth=4, elevations=(15.0,), size=32)
    cams, target = ref["cameras"], ref["alphas"]
    model = DMTet.from_sdf(box_sdf((0.3, 0.3, 0.3)), resolution=12)
    opt = model.make_optimizer(lr=0.1)

    def render(verts, faces):
        out = render_mesh(verts, faces, cams, vertex_colors=verts.new_zeros(verts.shape[0], 1), normals=False,
                          background=0.0)
        return out["alpha"]

    losses, ious = [], []
    for _ in range(15):
        verts, faces = model.mesh()
        alpha = render(verts, faces)
        loss = (alpha - target).pow(2).mean()
        losses.append(float(loss.detach()))
        ious.append(float(silhouette_iou(alpha.detach(), target)))
        opt.zero_grad()
        (loss + 1e-3 * model.sdf_loss() + 0.1 * normal_consistency_loss(verts, faces)).backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert ious[-1] > ious[0] + 0.15


# ------------------------------------------------------------------------------------------- regularisers


def test_laplacian_zero_on_flat_interior():
    v, f = flat_patch(6)
    lap = uniform_laplacian(v, f)
    ij = v[:, :2]
    interior = ((ij > 0) & (ij < 5)).all(-1)
    assert float(lap[interior].abs().max()) < 1e-6
    assert float(lap[~interior].norm(dim=-1).min()) > 0.1  # boundary vertices pull inward
    # a bump on one interior vertex is penalised
    bumped = v.clone()
    bumped[2 * 6 + 2, 2] = 0.5
    assert laplacian_loss(bumped, f) > laplacian_loss(v, f)
    torch.testing.assert_close(uniform_laplacian(bumped, f)[2 * 6 + 2], torch.tensor([0.0, 0.0, -0.5]))


def test_normal_consistency_flat_sphere_crumpled(sphere_mesh):
    v, f = flat_patch(5)
    assert float(normal_consistency_loss(v, f)) < 1e-6
    mv, mf = sphere_mesh
    smooth = float(normal_consistency_loss(mv, mf))
    g = torch.Generator().manual_seed(0)
    crumpled = mv + 0.02 * torch.randn(mv.shape, generator=g)
    rough = float(normal_consistency_loss(crumpled, mf))
    assert smooth < 0.01
    assert rough > 5 * smooth
    # hand-checked value: two triangles folded at 90 degrees -> 1 - cos(90) = 1
    v2 = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    f2 = torch.tensor([[0, 1, 2], [0, 3, 1]])
    assert float(normal_consistency_loss(v2, f2)) == pytest.approx(1.0, abs=1e-6)
    # gradient flows to positions
    x = crumpled.clone().requires_grad_()
    normal_consistency_loss(x, mf).backward()
    assert float(x.grad.abs().sum()) > 0


def test_sdf_sign_flip_loss_removes_a_floater():
    v, t = tet_grid(6)
    sdf = sphere_sdf(0.5)(v)
    edges = tet_edges(t)
    far = (v - torch.tensor([0.9, 0.9, 0.9])).norm(dim=-1).argmin()
    assert float(sdf_sign_flip_loss(torch.ones(v.shape[0]), edges)) == 0.0
    base = float(sdf_sign_flip_loss(sdf, edges))
    sdf_f = sdf.clone()
    sdf_f[far] = -0.2  # an isolated inside vertex: a floater
    assert float(sdf_sign_flip_loss(sdf_f, edges)) > base
    p = sdf_f.clone().requires_grad_()
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        sdf_sign_flip_loss(p, edges).backward()
        opt.step()
    assert float(p.detach()[far]) > 0  # the floater's sign flipped back


# -------------------------------------------------------------------------------------------------- texture


def test_render_textured_queries_surface_points():
    model = DMTet.from_sdf(sphere_sdf(0.6), resolution=10)
    verts, faces = model.mesh()
    from studio.cameras import orbit_cameras

    cams = orbit_cameras([0.0, 30.0], [0.0, 120.0], 3.0, 40.0, 24, 24)

    def field(p):  # colour = position mapped to [0, 1]
        return p * 0.5 + 0.5

    out = render_textured((verts, faces), field, cams, background=0.25, antialias=False)
    m = out["mask"]
    torch.testing.assert_close(out["rgb"][m], out["position"][m] * 0.5 + 0.5)
    assert torch.allclose(out["rgb"][~m], torch.tensor(0.25))
    ref = render_mesh(verts, faces, cams, antialias=False)
    assert torch.equal(out["mask"], ref["mask"])
    torch.testing.assert_close(out["normal"], ref["normal"])
    # gradients reach the field's parameters and (with antialiasing) the DMTet
    tex = TextureField(bbox=1.0)
    out = render_textured(model, tex, cams)
    out["rgb"].mean().backward()
    assert all(p.grad is not None for p in tex.parameters())
    assert model.sdf.grad is not None and float(model.sdf.grad.abs().sum()) > 0


def test_texture_field_fits_colours():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(512, 3, generator=g) * 2 - 1
    target = torch.stack([(pts[:, 0] > 0).float(), 0.5 + 0.4 * pts[:, 1], torch.full((512,), 0.2)], -1)
    tex = TextureField(n_frequencies=3, hidden=32)
    opt = torch.optim.Adam(tex.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = (tex(pts) - target).pow(2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    out = tex(pts)
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(UserError, match="points"):
        tex(torch.zeros(4, 2))


def test_texture_field_hashgrid_encoding_and_param_groups():
    fourier = TextureField()
    assert [g["name"] for g in fourier.param_groups()] == ["mlp"]
    pytest.importorskip("studio.students.fields")
    tex = TextureField(bbox=1.0, encoding="hashgrid", hash_grid={"n_levels": 4, "log2_hashmap_size": 12},
                       hidden=16)
    groups = tex.param_groups(lr_encoding=0.01, lr_mlp=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoding", 0.01), ("mlp", 1e-3)]
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in tex.parameters())
    pts = torch.rand(64, 3) * 2 - 1
    target = (pts * 0.5 + 0.5).detach()
    opt = torch.optim.Adam(tex.param_groups(lr_encoding=0.05, lr_mlp=1e-2))
    first = float((tex(pts) - target).pow(2).mean().detach())
    for _ in range(30):
        loss = (tex(pts) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    with pytest.raises(UserError, match="encoding"):
        TextureField(encoding="voxels")
