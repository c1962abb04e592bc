"""Implicit-field students (studio.students.fields): hash grid, NeRF / NeuS fields, conversion, meshes."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from studio.cameras import orbit_cameras
from studio.errors import UserError
from studio.render import (
    OccupancyGrid,
    face_normals,
    rays_from_cameras,
    render_field,
    render_mesh,
)
from studio.students import (
    HashGridEncoding,
    NeRFField,
    NeuSField,
    eikonal_loss,
    extract_mesh,
    load_field,
    neus_from_nerf,
    sdf_grid,
)

SMALL = {"n_levels": 6, "log2_hashmap_size": 12, "base_resolution": 4, "per_level_scale": 1.5, "hidden_dim": 32}


def naive_encode(enc: HashGridEncoding, x: list[float]) -> torch.Tensor:
    """Instant-NGP encoding of one point written out with Python integers (independent of the module)."""
    T = 2 ** enc.log2_hashmap_size
    table = enc.embeddings.detach().double()
    feats, offset = [], 0
    for lvl in range(enc.n_levels):
        n = math.floor(enc.base_resolution * enc.per_level_scale ** lvl)
        dense = (n + 1) ** 3 <= T
        cell = [min(math.floor(xi * n), n - 1) for xi in x]
        frac = [xi * n - c for xi, c in zip(x, cell)]
        acc = torch.zeros(enc.n_features_per_level, dtype=torch.float64)
        for b in itertools.product((0, 1), repeat=3):
            v = [c + bi for c, bi in zip(cell, b)]
            i = v[0] + v[1] * (n + 1) + v[2] * (n + 1) ** 2 if dense else \
                ((v[0] * 1) ^ (v[1] * 2654435761) ^ (v[2] * 805459861)) % T
            w = math.prod(f if bi else 1 - f for f, bi in zip(frac, b))
            acc += w * table[offset + i]
        feats.append(acc)
        offset += (n + 1) ** 3 if dense else T
    return torch.cat(feats)


# ------------------------------------------------------------------------------------ hash grid

def test_hash_grid_matches_naive_twin_and_shapes():
    enc = HashGridEncoding(**{k: v for k, v in SMALL.items() if k != "hidden_dim"}, init_scale=1.0, seed=3)
    assert enc.n_output_dims == 12
    assert enc.resolutions.tolist() == [math.floor(4 * 1.5**lvl) for lvl in range(6)]
    assert enc.dense_levels.tolist() == [(n + 1) ** 3 <= 4096 for n in enc.resolutions.tolist()]
    assert enc.embeddings.shape[0] == sum(min((n + 1) ** 3, 4096) for n in enc.resolutions.tolist())
    x = torch.rand(7, 3, dtype=torch.float64).float()
    x[0] = torch.tensor([1.0, 0.0, 0.5])  # box faces
    out = enc(x.reshape(7, 1, 3))
    assert out.shape == (7, 1, 12)
    for i in range(7):
        ref = naive_encode(enc, x[i].double().tolist())
        assert torch.allclose(out[i, 0].double(), ref, atol=1e-5)


def test_hash_collisions_only_above_the_dense_levels():
    enc = HashGridEncoding(n_levels=5, log2_hashmap_size=12, base_resolution=8, per_level_scale=1.6)
    for lvl in range(enc.n_levels):
        n = int(enc.resolutions[lvl])
        ax = torch.arange(n + 1)
        verts = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        rows = enc.table_index(lvl, verts)
        lo, size = int(enc.level_offsets[lvl]), int(enc.level_sizes[lvl])
        assert rows.min() >= lo and rows.max() < lo + size
        n_unique = rows.unique().numel()
        if bool(enc.dense_levels[lvl]):
            assert n_unique == verts.shape[0] == size  # one row per vertex
        else:
            assert verts.shape[0] > size and n_unique < verts.shape[0]  # hashed: collisions
            assert n_unique > 0.5 * size  # ... but the hash spreads over the table
    assert enc.dense_levels.tolist() == [True, True, False, False, False]


def test_hash_grid_is_continuous_trilinear_and_differentiable():
    enc = HashGridEncoding(n_levels=3, log2_hashmap_size=10, base_resolution=5, per_level_scale=2.0, init_scale=1.0)
    # exact at a vertex of level 1 (10 cells): the feature is the table row of that vertex
    v = torch.tensor([[3, 7, 2]])
    out = enc(v.float() / 10)
    assert torch.allclose(out[0, 2:4], enc.embeddings[enc.table_index(1, v)][0], atol=1e-6)
    # continuous across a cell face of every level (x = 0.4 is a face of levels 0..2), not constant
    e = 1e-5
    a = enc(torch.tensor([[0.4 - e, 0.33, 0.71]]))
    b = enc(torch.tensor([[0.4 + e, 0.33, 0.71]]))
    c = enc(torch.tensor([[0.4 + 0.05, 0.33, 0.71]]))
    assert (a - b).abs().max() < 1e-3 < (a - c).abs().max()
    # gradients: to the 8 rows per level of the point's cells, and to the point itself
    x = torch.rand(1, 3, requires_grad=True)
    enc(x).sum().backward()
    touched = (enc.embeddings.grad.abs().sum(-1) > 0).sum()
    assert 0 < touched <= 8 * 3
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_progressive_band_masks_fine_levels():
    enc = HashGridEncoding(n_levels=6, log2_hashmap_size=10, base_resolution=4, init_scale=1.0,
                           start_level=2, start_step=100, update_steps=50)
    x = torch.rand(5, 3)
    assert enc.current_level == 2
    assert (enc(x)[:, 4:] == 0).all() and (enc(x)[:, :4] != 0).any()
    assert enc.update_step(149) == 2 and enc.update_step(150) == 3 and enc.update_step(10_000) == 6
    assert (enc(x)[:, 10:] != 0).any()
    enc.update_step(0)
    enc(x).sum().backward()
    lo = int(enc.level_offsets[2])
    assert enc.embeddings.grad[lo:].abs().sum() == 0  # masked levels learn nothing
    with pytest.raises(UserError, match="update_steps"):
        HashGridEncoding(start_level=2)


# ------------------------------------------------------------------------------------ NeRF

def test_nerf_blob_init_density_profile_and_normals():
    nerf = NeRFField(**SMALL, blob_density=10.0, blob_radius=0.5)
    r = torch.linspace(0.0, 0.95, 20)
    dirs = F.normalize(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    pts = r[:, None] * dirs
    with torch.no_grad():
        out = nerf(pts, None)
    assert torch.allclose(out["density"], F.softplus(10.0 * (1 - r / 0.5)), rtol=1e-2, atol=1e-3)
    assert torch.allclose(out["rgb"], torch.full((20, 3), 0.5), atol=1e-3)  # grey at init
    assert (out["density"][1:] < out["density"][:-1]).all()  # decreasing with radius
    # normals point away from the blob centre, by both methods
    p = pts[3:15]
    n_fd = nerf(p, None, with_normals=True)["normal"]
    nerf.normal_method = "autograd"
    n_ad = nerf(p, None, with_normals=True)["normal"]
    assert torch.allclose(n_ad, F.normalize(p, dim=-1), atol=1e-2)
    assert torch.allclose(n_fd, n_ad, atol=2e-2)


# ------------------------------------------------------------------------------------ NeuS

def test_neus_sphere_init_is_an_sdf_and_renders_the_sphere_silhouette():
    neus = NeuSField(**SMALL, sphere_radius=0.5, init_variance=0.5)
    pts = (torch.rand(500, 3) * 2 - 1) * 0.9
    out = neus(pts, None)
    assert torch.allclose(out["sdf"], pts.norm(dim=-1) - 0.5, atol=1e-3)
    assert eikonal_loss(out["gradient"]) < 1e-4 and neus.eikonal_loss(pts) < 1e-4
    assert torch.allclose(out["normal"], F.normalize(pts, dim=-1), atol=1e-2)
    assert abs(neus.inv_s.item() - math.exp(5.0)) < 1e-3
    size = 32
    cams = orbit_cameras([0.0, 35.0], [0.0, 250.0], 3.0, 40.0, size, size)
    with torch.no_grad():
        img = render_field(neus, cams, n_samples=48)
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    ref = render_mesh(torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces), cams, antialias=False)
    mask = img["opacity"][..., 0] > 0.5
    iou = (mask & ref["mask"]).sum() / (mask | ref["mask"]).sum()
    assert iou > 0.95


def test_extract_mesh_and_sdf_grid():
    neus = NeuSField(**SMALL, sphere_radius=0.5)
    g = sdf_grid(neus, 17)
    assert g.shape == (17, 17, 17) and abs(g[8, 8, 8].item() + 0.5) < 1e-3  # centre of linspace(-1, 1, 17)
    v, f = extract_mesh(neus, 32)
    assert f.dtype == torch.long and v.shape[1] == 3
    assert (v.norm(dim=-1) - 0.5).abs().max() < 0.02
    cent = v[f].mean(1)
    assert ((face_normals(v, f) * cent).sum(-1) > 0).float().mean() > 0.99  # outward (CCW from outside)
    nerf = NeRFField(**SMALL, blob_density=10.0, blob_radius=0.5)
    vn, fn = extract_mesh(nerf, 32, threshold=5.0)
    r_iso = 0.5 * (1 - math.log(math.expm1(5.0)) / 10.0)  # softplus(10 (1 - r / 0.5)) = 5
    assert (vn.norm(dim=-1) - r_iso).abs().max() < 0.02
    assert ((face_normals(vn, fn) * vn[fn].mean(1)).sum(-1) > 0).float().mean() > 0.99
    with pytest.raises(UserError, match="no surface"):
        extract_mesh(nerf, 16)  # default level 25 > the blob's peak density 10


class EllipsoidNeRF(NeRFField):
    """A non-spherical NeRF target: blob bias on an ellipsoid with semi-axes (0.6, 0.3, 0.4)."""

    AXES = torch.tensor([0.6, 0.3, 0.4])

    def density_bias(self, points):
        return 10.0 * (1.0 - (points / self.AXES).norm(dim=-1))


def test_neus_from_nerf_matches_the_iso_surface():
    nerf = EllipsoidNeRF(**SMALL)
    thr = math.log(2.0)  # softplus(0): the iso-surface is exactly the ellipsoid |x / axes| = 1
    start = NeuSField(**SMALL, sphere_radius=0.7)
    neus = neus_from_nerf(nerf, threshold=thr, neus=start, steps=100, batch=1024, resolution=32, seed=0)
    assert neus is start
    g = torch.Generator().manual_seed(5)
    dirs = F.normalize(torch.randn(2000, 3, generator=g), dim=-1)
    surf = dirs / (dirs / EllipsoidNeRF.AXES).norm(dim=-1, keepdim=True)  # points on the ellipsoid
    pts = surf * (0.75 + 0.5 * torch.rand(2000, 1, generator=g))  # within +-25 % of the surface
    with torch.no_grad():
        inside = nerf(pts, None)["density"] > thr
        sdf = neus(pts, None, with_normals=False)["sdf"]
        sdf0 = NeuSField(**SMALL, sphere_radius=0.7)(pts, None, with_normals=False)["sdf"]
    agree = ((sdf < 0) == inside).float().mean()
    agree0 = ((sdf0 < 0) == inside).float().mean()
    assert agree > 0.95 and agree > agree0 + 0.3
    with torch.no_grad():
        on = neus(surf[:500], None, with_normals=False)["sdf"].abs()
    assert on.median() < 0.01 and on.max() < 0.05  # the zero level set is on the iso-surface
    assert neus.eikonal_loss(pts[:500]) < 0.05  # and the field is a distance
    with pytest.raises(UserError, match="no surface"):
        neus_from_nerf(nerf, threshold=50.0, steps=1)


def test_neus_fit_to_shapeworld_silhouettes_increases_iou(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_SHAPEWORLD_CACHE", str(tmp_path / "sw"))
    from studio.world import (
        held_out_cameras,
        reference_views,
        render_reference,
        silhouette_iou,
    )

    obj, size = "yellow_cone", 32
    ref = reference_views(obj, n_azimuth=6, elevations=(0.0, 25.0), size=size)
    test_cams = held_out_cameras(3, n_azimuth_train=6, size=size).cameras
    test_ref = render_reference(obj, test_cams)
    neus = NeuSField(**SMALL, radius=0.8, sphere_radius=0.5, init_variance=0.4)
    opt = neus.make_optimizer(lr_encoding=0.02, lr_mlp=3e-3)
    o, d = rays_from_cameras(ref["cameras"])
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    alpha = ref["alphas"].reshape(-1)
    rgb = ref["images"].reshape(-1, 3)
    g = torch.Generator().manual_seed(0)

    def iou() -> float:
        with torch.no_grad():
            out = render_field(neus, test_cams, n_samples=48)
        return float(silhouette_iou(out["opacity"], test_ref["alphas"]))

    iou0 = iou()
    grid = OccupancyGrid(neus.bbox, 24, update_every=10)  # as a training loop uses it
    skipped = []
    for step in range(80):
        grid.update_from_field(step, neus, step_size=1.6 / 32)
        idx = torch.randint(0, o.shape[0], (256,), generator=g)
        out = render_field(neus, rays=(o[idx], d[idx]), n_samples=32, stratified=True, generator=g,
                           background=1.0, occupancy_grid=grid)
        skipped.append(1 - out["n_samples_evaluated"] / out["n_samples_total"])
        loss = F.binary_cross_entropy(out["opacity"][:, 0].clamp(1e-4, 1 - 1e-4), alpha[idx])
        loss = loss + F.mse_loss(out["rgb"], rgb[idx]) + 0.1 * eikonal_loss(out["gradient"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    iou1 = iou()
    assert iou1 > iou0 + 0.2 and iou1 > 0.9, (iou0, iou1)
    assert sum(skipped[-10:]) / 10 > 0.4  # the grid skipped most empty samples while training
    # the grid of the fitted field gives the same render as no skipping
    grid.update_from_field(0, neus, step_size=1.6 / 48, force=True)
    with torch.no_grad():
        full = render_field(neus, test_cams[:1], n_samples=48)
        fast = render_field(neus, test_cams[:1], n_samples=48, occupancy_grid=grid)
    assert fast["n_samples_evaluated"] < 0.5 * full["n_samples_evaluated"]
    assert (full["rgb"] - fast["rgb"]).abs().max() < 0.03
    assert (full["opacity"] - fast["opacity"]).abs().max() < 0.03


# ------------------------------------------------------------------------------------ bookkeeping

def test_param_groups_optimizer_and_checkpoint_roundtrip(tmp_path):
    neus = NeuSField(**SMALL, start_level=3, update_steps=10, seed=1)
    groups = neus.param_groups(lr_variance=5e-4)
    assert [gr["name"] for gr in groups] == ["encoding", "geometry", "color", "variance"]
    assert [gr["lr"] for gr in groups] == [0.01, 1e-3, 1e-3, 5e-4]
    n_params = sum(p.numel() for gr in groups for p in gr["params"])
    assert n_params == sum(p.numel() for p in neus.parameters())  # every parameter in exactly one group
    opt = neus.make_optimizer()
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-15
    with pytest.raises(UserError, match="parameter group"):
        neus.param_groups(lr_bogus=1.0)
    neus.update_step(25)
    path = neus.save(tmp_path / "neus")
    back = load_field(path)
    assert isinstance(back, NeuSField) and back.encoding.current_level == 5
    pts = torch.rand(10, 3)
    assert torch.equal(back(pts, None)["sdf"], neus(pts, None)["sdf"])
    nerf = NeRFField(**SMALL, seed=2)
    back2 = load_field(nerf.save(tmp_path / "nerf.safetensors"))
    assert torch.equal(back2.density(pts), nerf.density(pts))
    with pytest.raises(UserError, match="not found"):
        load_field(tmp_path / "missing")
