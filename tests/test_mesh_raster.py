"""The differentiable mesh rasterizer (studio.render.mesh): hand-computed values, native-vs-torch parity,
gradients, depth test, silhouette antialiasing and normals.

References used here are independent of the rasterizer's edge-function formulation where possible:
a single triangle is checked against ray/plane intersection (solve ``t d = A + u (B - A) + v (C - A)``
per pixel ray) and against numbers worked out by hand.
"""
from __future__ import annotations

import pytest
import torch

from studio.cameras import Cameras, orbit_cameras
from studio.errors import UserError
from studio.render import (
    _mesh_ext,
    antialias,
    face_normals,
    interpolate,
    mesh_edge_topology,
    rasterize_mesh,
    render_mesh,
    resolve_mesh_backend,
    vertex_normals,
)

HAS_NATIVE = _mesh_ext.available("native")
native_only = pytest.mark.skipif(not HAS_NATIVE, reason=f"native mesh rasterizer unavailable: "
                                                        f"{_mesh_ext.load_error('native')}")
BACKENDS = ["torch", pytest.param("native", marks=native_only)]


# ------------------------------------------------------------------------------------------------ meshes


def cube(dtype=torch.float32):
    """Unit cube [-0.5, 0.5]^3, 8 vertices, 12 outward-facing (counter-clockwise) triangles."""
    v = torch.tensor([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)], dtype=dtype)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = []
    for a, b, c, d in quads:
        f += [(a, b, c), (a, c, d)]
    faces = torch.tensor(f, dtype=torch.long)
    # make every face point away from the centre (the quads above are listed with mixed winding)
    n = torch.linalg.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]], dim=-1)
    flip = (n * v[faces].mean(1)).sum(-1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return v, faces


def icosphere(subdiv=2, dtype=torch.float32):
    t = (1 + 5 ** 0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6),
         (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10),
         (8, 6, 7), (9, 8, 1)]
    verts = [tuple(float(c) for c in p) for p in v]
    for _ in range(subdiv):
        cache: dict = {}

        def mid(a, b, cache=cache):
            key = (min(a, b), max(a, b))
            if key not in cache:
                verts.append(tuple((verts[a][i] + verts[b][i]) / 2 for i in range(3)))
                cache[key] = len(verts) - 1
            return cache[key]

        nf = []
        for a, b, c in f:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            nf += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        f = nf
    vt = torch.tensor(verts, dtype=torch.float64)
    vt = vt / vt.norm(dim=-1, keepdim=True)
    return vt.to(dtype), torch.tensor(f, dtype=torch.long)


def identity_camera(f, cx, cy, dtype=torch.float64):
    """World == OpenCV camera frame; pixel = (f X / Z + cx, f Y / Z + cy)."""
    K = torch.tensor([[[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]]], dtype=dtype)
    return torch.eye(4, dtype=dtype)[None], K


def two_cameras(W, H, dtype=torch.float32):
    cams = orbit_cameras(torch.tensor([25.0, -15.0]), torch.tensor([35.0, 210.0]), 2.6, 45.0, W, H)
    return cams.viewmats.to(dtype), cams.Ks.to(dtype)


# ------------------------------------------------------------------------------------ hand-computed values


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_triangle_hand_computed(backend):
    """Screen triangle (0,0), (8,0), (0,8) at depth 2 in an 8x8 image: pixel (i, j) is covered iff its
    centre satisfies (j + .5) + (i + .5) <= 8, i.e. i + j <= 7 (36 pixels); the centre (0.5, 0.5) of
    pixel (0, 0) has barycentrics (1 - 1/16 - 1/16, 1/16, 1/16)."""
    V, K = identity_camera(2.0, 0.0, 0.0)
    verts = torch.tensor([[0.0, 0.0, 2.0], [8.0, 0.0, 2.0], [0.0, 8.0, 2.0]], dtype=torch.float64)  # pixel = X
    faces = torch.tensor([[0, 1, 2]])
    r = rasterize_mesh(verts, faces, V, K, 8, 8, backend=backend)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(r["mask"][0], i + j <= 7)
    assert int(r["mask"].sum()) == 36
    assert torch.equal(r["face_id"][0], torch.where(i + j <= 7, 0, -1))
    torch.testing.assert_close(r["bary"][0, 0, 0], torch.tensor([0.875, 0.0625, 0.0625], dtype=torch.float64))
    torch.testing.assert_close(r["bary"][0, 2, 5], torch.tensor([1 - 5.5 / 8 - 2.5 / 8, 5.5 / 8, 2.5 / 8],
                                                                dtype=torch.float64))
    assert torch.all(r["depth"][0][r["mask"][0]] == 2.0) and torch.all(r["depth"][0][~r["mask"][0]] == 0)
    assert torch.all(r["bary"][0][~r["mask"][0]] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_tilted_triangle_matches_ray_intersection(backend):
    """A triangle slanted in depth: coverage, perspective-correct barycentrics and depth equal the ray /
    triangle intersection of every pixel's ray (an independent reference)."""
    W, H = 24, 20
    Vm, K = identity_camera(20.0, 11.0, 9.0)
    A = torch.tensor([-0.5, -0.4, 1.5], dtype=torch.float64)
    B = torch.tensor([0.9, -0.2, 3.5], dtype=torch.float64)
    Cc = torch.tensor([-0.1, 0.7, 2.2], dtype=torch.float64)
    verts = torch.stack([A, B, Cc])
    r = rasterize_mesh(verts, torch.tensor([[0, 1, 2]]), Vm, K, W, H, backend=backend)
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    d = torch.stack([(j + 0.5 - 11.0) / 20.0, (i + 0.5 - 9.0) / 20.0, torch.ones_like(i)], -1)  # [H,W,3]
    M = torch.stack([d, (A - B).expand_as(d), (A - Cc).expand_as(d)], -1)  # t d - u (B-A) - v (C-A) = A
    sol = torch.linalg.solve(M, A.expand_as(d)[..., None])[..., 0]
    t, u, v = sol.unbind(-1)
    inside = (u >= 0) & (v >= 0) & (u + v <= 1)
    margin = torch.minimum(torch.minimum(u, v), 1 - u - v).abs() > 1e-9
    assert int(inside.sum()) > 40
    assert torch.equal(r["mask"][0][margin], inside[margin])
    m = r["mask"][0]
    torch.testing.assert_close(r["bary"][0][m], torch.stack([1 - u - v, u, v], -1)[m], atol=1e-10, rtol=0)
    torch.testing.assert_close(r["depth"][0][m], t[m], atol=1e-10, rtol=0)  # d_z = 1: t is the view depth


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_test_nearer_triangle_occludes(backend):
    """Two overlapping screen-identical triangles: the nearer wins whatever its index; the farther shows
    where only it covers."""
    Vm, K = identity_camera(10.0, 8.0, 8.0)

    def tri(z, s=1.0):
        return torch.tensor([[-0.6 * s, -0.6 * s, 1.0], [0.6 * s, -0.6 * s, 1.0], [-0.6 * s, 0.6 * s, 1.0]],
                            dtype=torch.float64) * z  # screen position independent of z

    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for z_first, z_second in ((3.0, 2.0), (2.0, 3.0)):
        verts = torch.cat([tri(z_first), tri(z_second, s=0.8)])
        r = rasterize_mesh(verts, faces, Vm, K, 16, 16, backend=backend)
        fid, depth = r["face_id"][0], r["depth"][0]
        both = torch.zeros(16, 16, dtype=torch.bool)
        # pixels covered by the smaller (second) triangle are covered by both
        small = rasterize_mesh(tri(z_second, s=0.8), faces[:1], Vm, K, 16, 16, backend=backend)["mask"][0]
        both |= small
        assert int(both.sum()) > 10
        nearer = 0 if z_first < z_second else 1
        assert torch.all(fid[both] == nearer)
        torch.testing.assert_close(depth[both], torch.full_like(depth[both], min(z_first, z_second)))
        only_big = r["mask"][0] & ~both
        assert int(only_big.sum()) > 5 and torch.all(fid[only_big] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_and_far_planes(backend):
    Vm, K = identity_camera(10.0, 8.0, 8.0)
    verts = torch.tensor([[-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [-0.5, 0.5, 1.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    assert rasterize_mesh(verts, faces, Vm, K, 16, 16, backend=backend)["mask"].any()
    behind = verts.clone()
    behind[0, 2] = -1.0  # one vertex behind the camera: the whole face is dropped (no clipping)
    assert not rasterize_mesh(behind, faces, Vm, K, 16, 16, backend=backend)["mask"].any()
    assert not rasterize_mesh(verts, faces, Vm, K, 16, 16, far=0.9, backend=backend)["mask"].any()
    assert not rasterize_mesh(verts, faces, Vm, K, 16, 16, near=1.0, backend=backend)["mask"].any()
    empty = rasterize_mesh(verts, faces[:0], Vm, K, 16, 16, backend=backend)
    assert not empty["mask"].any() and torch.all(empty["face_id"] == -1)


# ---------------------------------------------------------------------------------- native vs torch


def _render_pair(verts, faces, Vm, K, W, H, attrs, seed=0):
    """Rasterize with both backends, then backpropagate the same random linear loss of bary, depth and
    interpolated attributes through each, restricted to pixels whose face ids agree."""
    g = torch.Generator().manual_seed(seed)
    C = Vm.shape[0]
    leaves, rasts = {}, {}
    for backend in ("torch", "native"):
        leaves[backend] = [t.clone().requires_grad_(True) for t in (verts, attrs, Vm)]
        v, a, vm = leaves[backend]
        rasts[backend] = rasterize_mesh(v, faces, vm, K, W, H, backend=backend)
        assert rasts[backend]["backend"] == backend
    agree = (rasts["torch"]["face_id"] == rasts["native"]["face_id"]).to(verts.dtype)
    wb = torch.randn(C, H, W, 3, generator=g, dtype=verts.dtype) * agree[..., None]
    wd = torch.randn(C, H, W, generator=g, dtype=verts.dtype) * agree
    wa = torch.randn(C, H, W, attrs.shape[-1], generator=g, dtype=verts.dtype) * agree[..., None]
    out = {}
    for backend, r in rasts.items():
        v, a, vm = leaves[backend]
        loss = (r["bary"] * wb).sum() + (r["depth"] * wd).sum() + (interpolate(a, r, faces) * wa).sum()
        loss.backward()
        out[backend] = {"r": r, "verts": v.grad, "attrs": a.grad, "viewmats": vm.grad}
    return out


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_camera_verts", [False, True])
def test_cube_two_cameras_native_matches_torch(dtype, per_camera_verts):
    W, H = 40, 32
    verts, faces = cube(dtype)
    Vm, K = two_cameras(W, H, dtype)
    if per_camera_verts:  # e.g. a deforming mesh: one vertex set per camera
        verts = torch.stack([verts, verts * 0.9 + 0.05])
    attrs = torch.rand(verts.shape[-2], 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    res = _render_pair(verts, faces, Vm, K, W, H, attrs)
    rt, rn = res["torch"]["r"], res["native"]["r"]
    cover = rt["mask"].float().mean()
    assert 0.15 < cover < 0.8, cover
    agree = rt["face_id"] == rn["face_id"]
    assert agree.float().mean() > 0.995  # ties on shared edges may go either way
    assert torch.equal(rt["mask"], rn["mask"])
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(rn["bary"][agree], rt["bary"][agree], atol=atol, rtol=0)
    torch.testing.assert_close(rn["depth"][agree], rt["depth"][agree], atol=atol, rtol=0)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name in ("verts", "attrs", "viewmats"):
        ref, got = res["torch"][name], res["native"][name]
        assert ref.norm() > 0
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < tol, f"{name}: relative error {rel:.3g}"


@native_only
def test_overlapping_triangle_soup_parity_and_gradcheck():
    """Many random overlapping triangles at mixed depths (deep z-buffer contention, both windings)."""
    g = torch.Generator().manual_seed(3)
    n = 60
    W, H = 33, 27
    Vm, K = identity_camera(30.0, W / 2, H / 2)
    centre = torch.cat([(torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 1.2,
                        1.5 + torch.rand(n, 1, generator=g, dtype=torch.float64) * 2], -1)
    verts = (centre[:, None, :] + torch.randn(n, 3, 3, generator=g, dtype=torch.float64) * 0.25).reshape(-1, 3)
    faces = torch.arange(3 * n).reshape(n, 3)
    attrs = torch.rand(3 * n, 2, generator=g, dtype=torch.float64)
    res = _render_pair(verts, faces, Vm, K, W, H, attrs)
    assert torch.equal(res["torch"]["r"]["face_id"], res["native"]["r"]["face_id"])
    assert res["native"]["r"]["face_id"].unique().numel() > 20
    for name in ("verts", "attrs", "viewmats"):
        ref, got = res["torch"][name], res["native"][name]
        assert ((got - ref).norm() / ref.norm()).item() < 1e-10, name

    # the native analytic backward against finite differences (visibility is locally constant)
    fid0 = res["native"]["r"]["face_id"]

    def f(v):
        r = rasterize_mesh(v, faces, Vm, K, W, H, backend="native")
        assert torch.equal(r["face_id"], fid0)
        return (r["bary"] ** 2).sum() + r["depth"].sum()

    v = verts.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(v), v)
    direction = torch.randn(verts.shape, generator=g, dtype=torch.float64)
    eps = 1e-7
    fd = (f(verts + eps * direction) - f(verts - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-5, atol=1e-8)


def test_auto_backend_picks_native_on_cpu():
    assert resolve_mesh_backend("auto", torch.device("cpu")) == ("native" if HAS_NATIVE else "torch")


# ----------------------------------------------------------------------------------- antialiasing


def _big_triangle():
    return torch.tensor([[5.3, 4.2], [26.7, 8.1], [11.2, 27.6]], dtype=torch.float64)


def _coverage(P, backend="torch"):
    """Antialiased alpha [32,32] of screen triangle P [3,2] (pixel = X with f = Z = 2)."""
    Vm, K = identity_camera(2.0, 0.0, 0.0)
    verts = torch.cat([P, torch.full((3, 1), 2.0, dtype=P.dtype)], 1)
    faces = torch.tensor([[0, 1, 2]])
    r = rasterize_mesh(verts, faces, Vm, K, 32, 32, backend=backend)
    return antialias(r["mask"][..., None].to(P.dtype), r, faces)[0, ..., 0], r["mask"][0]


def _outward_offsets(P):
    """For each edge k (opposite vertex k): a [3,2] displacement moving that edge along its outward
    unit normal, and d(exact area)/d(offset) = edge length / 2 (the opposite vertex stays put)."""
    cen = P.mean(0)
    out = []
    for k in range(3):
        a, b = P[(k + 1) % 3], P[(k + 2) % 3]
        n = torch.stack([b[1] - a[1], a[0] - b[0]])
        n = n / n.norm()
        if (n * (a - cen)).sum() < 0:
            n = -n
        off = torch.zeros(3, 2, dtype=P.dtype)
        off[(k + 1) % 3] = n
        off[(k + 2) % 3] = n
        out.append((off, 0.5 * (b - a).norm().item()))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_silhouette_gradient_sign_and_magnitude(backend):
    P = _big_triangle()
    area = 0.5 * abs(float((P[1, 0] - P[0, 0]) * (P[2, 1] - P[0, 1]) - (P[2, 0] - P[0, 0]) * (P[1, 1] - P[0, 1])))
    cov, mask = _coverage(P, backend)
    assert abs(float(cov.sum()) - area) < 0.02 * area  # antialiased coverage ~ exact area
    assert abs(float(mask.sum()) - area) > abs(float(cov.sum()) - area)  # and closer than the hard mask
    for off, d_area in _outward_offsets(P):
        Pp = P.clone().requires_grad_(True)
        c, m = _coverage(Pp, backend)
        (g_total,) = torch.autograd.grad(c.sum(), Pp, retain_graph=True)
        # total coverage follows the exact area: d/d(offset) = |edge| / 2
        slope = float((g_total * off).sum())
        assert slope == pytest.approx(d_area, rel=0.1)
        # the pixels just outside this edge (partially covered, centre outside) gain coverage
        with torch.no_grad():
            grown, _ = _coverage(P + 0.3 * off, backend)
        outside = (~m) & (c > 0) & (grown > c)
        assert int(outside.sum()) >= 3
        (g_pix,) = torch.autograd.grad(c[outside].sum(), Pp)
        assert float((g_pix * off).sum()) > 0
        # finite differences of the (continuous) antialiased coverage agree with autograd
        eps = 0.05
        fd = (_coverage(P + eps * off, backend)[0].sum() - _coverage(P - eps * off, backend)[0].sum()) / (2 * eps)
        assert float(fd) == pytest.approx(slope, rel=0.05, abs=0.3)


def test_antialias_leaves_interior_edges_alone():
    """A square split into two triangles: the shared diagonal is not a silhouette, so only the outer
    boundary is blended; image gradients flow; topology marks the diagonal."""
    Vm, K = identity_camera(2.0, 0.0, 0.0)
    verts = torch.tensor([[4.3, 4.3, 2.0], [20.6, 4.3, 2.0], [20.6, 20.6, 2.0], [4.3, 20.6, 2.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    topo = mesh_edge_topology(faces)
    assert topo.tolist() == [[-1, 1, -1], [-1, -1, 0]]
    r = rasterize_mesh(verts, faces, Vm, K, 24, 24)
    img = torch.rand(1, 24, 24, 3, dtype=torch.float64, requires_grad=True)
    out = antialias(img, r, faces, topology=topo)
    inner = torch.zeros(24, 24, dtype=torch.bool)
    inner[6:19, 6:19] = True  # away from the outer boundary (at 4.3 and 20.6)
    assert torch.equal(out[0][inner], img[0][inner])
    assert not torch.equal(out, img)
    out.sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_mesh_edge_topology_closed_mesh():
    _, faces = cube()
    topo = mesh_edge_topology(faces)
    assert bool((topo >= 0).all())  # closed, manifold
    for f in range(faces.shape[0]):
        for k in range(3):
            g = int(topo[f, k])
            edge = {int(faces[f, (k + 1) % 3]), int(faces[f, (k + 2) % 3])}
            assert any({int(faces[g, (j + 1) % 3]), int(faces[g, (j + 2) % 3])} == edge and int(topo[g, j]) == f
                       for j in range(3))


# -------------------------------------------------------------------------------- normals and render


def test_vertex_and_face_normals_point_outward():
    verts, faces = icosphere(2)
    vn = vertex_normals(verts, faces)
    assert float((vn * verts).sum(-1).min()) > 0.99
    fn = face_normals(verts, faces)
    assert float((fn * verts[faces].mean(1)).sum(-1).min()) > 0.9
    torch.testing.assert_close(fn.norm(dim=-1), torch.ones(faces.shape[0]))
    # area weighting: a vertex shared by a large and a tiny face leans to the large face's normal
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0.01]])
    n = vertex_normals(v, torch.tensor([[0, 1, 2], [0, 3, 1]]))
    assert float(n[0, 2]) > 0.99
    # per-camera vertex sets
    vb = vertex_normals(torch.stack([verts, 2 * verts]), faces)
    torch.testing.assert_close(vb[0], vn)
    torch.testing.assert_close(vb[1], vn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_mesh_sphere_normals_and_outputs(backend):
    verts, faces = icosphere(2)
    cams = orbit_cameras(torch.tensor([20.0, -30.0]), torch.tensor([0.0, 130.0]), 3.5, 40.0, 32, 32)
    out = render_mesh(verts, faces, cams, backend=backend, background=(0.0, 0.5, 1.0))
    assert out["rgb"].shape == (2, 32, 32, 3) and out["alpha"].shape == (2, 32, 32, 1)
    assert out["depth"].shape == (2, 32, 32, 1) and out["normal"].shape == (2, 32, 32, 3)
    m = out["mask"]
    assert 0.2 < m.float().mean() < 0.9
    pos = interpolate(verts, out["rast"], faces)
    n = out["normal"]
    assert float((n[m] * pos[m]).sum(-1).min()) > 0.9  # world-space normals point outward
    torch.testing.assert_close(n[m].norm(dim=-1), torch.ones(int(m.sum())))
    assert torch.all(n[~m] == 0)
    centres = torch.linalg.inv(cams.viewmats)[:, :3, 3]
    flat = render_mesh(verts, faces, (cams.viewmats, cams.Ks), 32, 32, normals="face", backend=backend)
    facing = (flat["normal"] * (centres[:, None, None, :] - pos)).sum(-1)
    assert float(facing[m].min()) > 0  # visible faces of a convex mesh face the camera (depth test works)
    assert float(((n * (centres[:, None, None, :] - pos)).sum(-1)[m] > 0).float().mean()) > 0.95
    a = out["alpha"][..., 0]
    assert float(a.min()) >= 0 and float(a.max()) <= 1 + 1e-6
    assert float(a[m].mean()) > 0.9 and float(a[~m].mean()) < 0.1  # only edge pixels are partial
    inner = m.clone()  # pixels whose 4 neighbours are covered too: interior edges are never blended
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[:, :, 1:] &= m[:, :, :-1]
    inner[:, :, :-1] &= m[:, :, 1:]
    assert int(inner.sum()) > 100 and torch.all(a[inner] == 1)
    bg = torch.tensor([0.0, 0.5, 1.0])
    far_px = out["rgb"][:, 0, 0]  # image corner: background
    torch.testing.assert_close(far_px, bg.expand(2, 3))
    assert float((flat["normal"][m] * pos[m]).sum(-1).min()) > 0.9
    torch.testing.assert_close(flat["alpha"], out["alpha"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_mesh_vertex_colors_and_gradients(backend):
    verts, faces = cube()
    cams = orbit_cameras(20.0, 30.0, 2.5, 45.0, 24, 24)
    colors = torch.rand(verts.shape[0], 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    v = verts.clone().requires_grad_(True)
    out = render_mesh(v, faces, cams, vertex_colors=colors, normals=False, background=0.0, backend=backend)
    assert "normal" not in out
    m = out["mask"]
    ref = interpolate(colors, out["rast"], faces)
    interior = m.clone()
    interior[:, 1:] &= m[:, :-1]
    interior[:, :-1] &= m[:, 1:]
    interior[:, :, 1:] &= m[:, :, :-1]
    interior[:, :, :-1] &= m[:, :, 1:]
    torch.testing.assert_close(out["rgb"][interior], ref[interior])
    (out["rgb"].sum() + out["alpha"].sum()).backward()
    assert colors.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert torch.isfinite(v.grad).all()


def test_interpolate_per_camera_attributes():
    verts, faces = cube(torch.float64)
    Vm, K = two_cameras(20, 20, torch.float64)
    r = rasterize_mesh(verts, faces, Vm, K, 20, 20, backend="torch")
    attrs = torch.rand(2, verts.shape[0], 2, dtype=torch.float64)
    out = interpolate(attrs, r, faces)
    for c in range(2):
        single = {k: (v[c:c + 1] if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
        torch.testing.assert_close(out[c:c + 1], interpolate(attrs[c], single, faces))
    # interpolating the positions reproduces the view depth
    cam = (Vm[:, None, :3, :3] @ interpolate(verts, r, faces).reshape(2, -1, 3, 1)).reshape(2, 20, 20, 3)
    z = cam[..., 2] + Vm[:, None, None, 2, 3]
    torch.testing.assert_close(z[r["mask"]], r["depth"][r["mask"]])


def test_bad_inputs_raise_user_error():
    verts, faces = cube()
    Vm, K = two_cameras(8, 8)
    with pytest.raises(UserError, match="faces"):
        rasterize_mesh(verts, faces + 100, Vm, K, 8, 8)
    with pytest.raises(UserError, match="faces"):
        rasterize_mesh(verts, faces.float(), Vm, K, 8, 8)
    with pytest.raises(UserError, match="verts"):
        rasterize_mesh(verts[:, :2], faces, Vm, K, 8, 8)
    with pytest.raises(UserError, match="Ks"):
        rasterize_mesh(verts, faces, Vm, K[:1], 8, 8)
    with pytest.raises(UserError, match="backend"):
        rasterize_mesh(verts, faces, Vm, K, 8, 8, backend="opengl")
    with pytest.raises(UserError, match="near"):
        rasterize_mesh(verts, faces, Vm, K, 8, 8, near=2.0, far=1.0)
    with pytest.raises(UserError, match="NaN"):
        rasterize_mesh(verts * float("nan"), faces, Vm, K, 8, 8)
    with pytest.raises(UserError, match="cameras"):
        render_mesh(verts, faces, Vm, 8, 8)
    with pytest.raises(UserError, match="width"):
        render_mesh(verts, faces, Cameras(Vm, K, 8, 8), 16, 16)
    with pytest.raises(UserError, match="normals"):
        render_mesh(verts, faces, (Vm, K), 8, 8, normals="smooth")
