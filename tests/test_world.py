"""ShapeWorld ground truth: objects, reference renders + cache, held-out cameras and metrics."""
import math

import pytest
import torch

from studio.world import metrics as M
from studio.world import primitives as P
from studio.world import references as R
from studio.world.objects import OBJECTS, ShapeObject, find_object_for_prompt, get_object, list_objects

N_GAUSS = 1200
SIZE = 24  # small: the test must stay fast even on the dense torch rasterizer


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_SHAPEWORLD_CACHE", str(tmp_path / "sw"))
    return tmp_path / "sw"


# --------------------------------------------------------------------------------------------- objects

def test_catalog():
    objs = list_objects()
    assert len(objs) >= 12
    prompts = [o.prompt for o in objs]
    assert len(set(prompts)) == len(prompts) and len({o.name for o in objs}) == len(objs)
    assert len(list_objects(front_back_differ=True)) >= 3
    assert {"snowman", "house"} <= {o.name for o in list_objects(front_back_differ=True)}
    for o in objs:
        assert o.prompt == o.prompt.lower().strip() and o.prompt.split()[0] in ("a", "an")
        assert o.colors and all(c in o.prompt.split() for c in o.colors), o.name
        assert OBJECTS[o.name] is o
    # colour words tell objects of the same shape apart
    assert len({frozenset(o.colors) | {o.prompt.split()[-1]} for o in objs}) == len(objs)


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_object_surfaces(name):
    obj = OBJECTS[name]
    s = obj.surface(3000, seed=0)
    assert s.points.shape == (3000, 3) and s.normals.shape == (3000, 3) and s.colors.shape == (3000, 3)
    assert torch.isfinite(s.points).all() and (s.colors >= 0).all() and (s.colors <= 1).all()
    torch.testing.assert_close(s.normals.norm(dim=-1), torch.ones(3000), atol=1e-4, rtol=0)
    assert s.points.abs().max() < 1.0  # fits the default cameras' view
    if obj.convex:
        centre = 0.5 * (s.points.max(0).values + s.points.min(0).values)
        assert ((s.points - centre) * s.normals).sum(-1).min() > -1e-4
    # Gaussians carry the same normals as local z axes, deterministic in the seed
    g = obj.gaussians(3000, seed=0)
    torch.testing.assert_close(P.gaussian_normals(g["quats"]), s.normals, atol=1e-4, rtol=0)
    torch.testing.assert_close(obj.gaussians(3000, seed=0)["colors"], g["colors"])


def test_primitives_outward():
    g = torch.Generator().manual_seed(0)
    convex = {
        "sphere": P.sphere(800, 0.5, (1, 0, 0), g),
        "box": P.box(800, (0.3, 0.4, 0.5), (1, 0, 0), g),
        "cylinder": P.cylinder(800, 0.4, 0.5, (1, 0, 0), g),
        "cone": P.cone(800, 0.5, 1.0, (1, 0, 0), g).transformed((0, -0.5, 0)),
        "hemisphere": P.hemisphere(800, 0.5, (1, 0, 0), g).transformed((0, -0.25, 0)),
        "pyramid": P.pyramid(800, 0.5, 1.0, (1, 0, 0), g).transformed((0, -0.3, 0)),
    }
    for name, s in convex.items():
        assert len(s) == 800, name
        torch.testing.assert_close(s.normals.norm(dim=-1), torch.ones(800), atol=1e-5, rtol=0)
        assert (s.points * s.normals).sum(-1).min() > -1e-5, name
    t = P.torus(800, 0.5, 0.2, (0, 1, 0), g)
    core = t.points * torch.tensor([1.0, 0.0, 1.0])
    core = 0.5 * core / core.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(((t.points - core) * t.normals).sum(-1), torch.full((800,), 0.2), atol=1e-4, rtol=0)
    d = P.disk(100, 0.5, (0, 0, 1), g).rotated("x", 90)
    torch.testing.assert_close(d.normals, torch.tensor([0.0, 0.0, 1.0]).expand(100, 3), atol=1e-6, rtol=0)
    assert d.points[:, 2].abs().max() < 1e-6


def test_find_object_for_prompt():
    cube = OBJECTS["red_cube"]
    for q in ["a red cube", "A Red  Cube", "red_cube", "a red cube, front view", "a red cube, side view",
              "front view of a red cube", "the back view of a red cube", "a red cube from the back",
              "a red cube, overhead view"]:
        assert find_object_for_prompt(q) is cube, q
    box = OBJECTS["two_tone_box"]
    assert find_object_for_prompt(box.prompt) is box  # ends in "back" yet is not a view suffix
    assert find_object_for_prompt(box.prompt + ", back view") is box
    assert find_object_for_prompt("a green dog") is None
    assert get_object("a snowman with an orange carrot nose, back view").name == "snowman"
    with pytest.raises(ValueError, match="unknown ShapeWorld object"):
        get_object("a green dog")
    for o in list_objects():
        assert find_object_for_prompt(o.prompt) is o and find_object_for_prompt(o.name) is o


# ----------------------------------------------------------------------------------------- references

def test_reference_views_shapes_determinism_and_cache(cache):
    kw = dict(n_azimuth=2, elevations=(0, 20), size=SIZE, n_gaussians=N_GAUSS)
    a = R.reference_views("house", **kw)
    V = 4
    assert not a["from_cache"]
    assert a["images"].shape == (V, SIZE, SIZE, 3) and a["alphas"].shape == (V, SIZE, SIZE, 1)
    assert a["depths"].shape == (V, SIZE, SIZE, 1) and a["normals"].shape == (V, SIZE, SIZE, 3)
    assert len(a["cameras"]) == V and a["cameras"].width == SIZE
    torch.testing.assert_close(a["azimuth"], torch.tensor([0.0, 180] * 2))
    torch.testing.assert_close(a["elevation"], torch.tensor([0.0] * 2 + [20.0] * 2))
    fg = a["alphas"][..., 0] > 0.9
    bgm = a["alphas"][..., 0] < 1e-3
    assert fg.float().mean() > 0.1 and bgm.float().mean() > 0.1
    torch.testing.assert_close(a["images"][bgm], torch.ones_like(a["images"][bgm]))  # white background
    torch.testing.assert_close(a["normals"][fg].norm(dim=-1), torch.ones(int(fg.sum())), atol=1e-3, rtol=0)
    d = a["depths"][..., 0][fg]
    assert d.min() > R.DEFAULT_RADIUS - 1.0 and d.max() < R.DEFAULT_RADIUS + 1.0
    # front view: camera-frame normals face the camera (z < 0) and the front wall is red
    cam_n = R.camera_normals(a["normals"], a["cameras"].viewmats)
    assert cam_n[0][fg[0]][:, 2].mean() < -0.5
    centre = a["images"][0, SIZE // 2 + 4, SIZE // 2]
    assert centre[0] > 0.5 and centre[2] < 0.3
    # back view of the house is the yellow wall
    back = a["images"][1, SIZE // 2 + 4, SIZE // 2]
    assert back[0] > 0.5 and back[1] > 0.4

    b = R.reference_views("house", **kw)  # cache hit
    assert b["from_cache"]
    files = list(cache.glob("house-*.safetensors"))
    assert len(files) == 1 and not list(cache.glob(".*tmp*"))
    for k in ("images", "alphas", "depths", "normals"):
        assert torch.equal(a[k], b[k]), k
    c = R.reference_views("house", **kw, cache=False)  # deterministic render
    assert not c["from_cache"]
    for k in ("images", "alphas", "depths", "normals"):
        torch.testing.assert_close(a[k], c[k], atol=1e-5, rtol=0)
    # other parameters -> other cache entry; a corrupt entry is re-rendered
    black = R.reference_views("house", **{**kw, "elevations": (0,)}, background=None)
    assert not black["from_cache"] and black["images"][bgm[:2]].abs().max() < 1e-6
    black_file = [f for f in cache.glob("house-*.safetensors") if f != files[0]]
    assert len(black_file) == 1
    black_file[0].write_bytes(b"garbage")
    e = R.reference_views("house", **{**kw, "elevations": (0,)}, background="black")
    assert not e["from_cache"] and torch.equal(e["images"], black["images"])
    assert R.reference_views("house", **{**kw, "elevations": (0,)}, background=(0, 0, 0))["from_cache"]


def test_held_out_cameras_disjoint():
    train = R.reference_cameras(8, (0, 20), SIZE)
    for n in (4, 8, 16):
        h = R.held_out_cameras(n, SIZE, seed=3)
        assert len(h.cameras) == n and h.cameras.width == SIZE
        daz = (h.azimuth[:, None] - train.azimuth[None]) % 360
        daz = torch.minimum(daz, 360 - daz)
        assert daz.min() >= 45 / 4 - 1e-4
        assert (h.elevation[:, None] - train.elevation[None]).abs().min() >= 5
        # cameras themselves are not training cameras
        dist = torch.cdist(h.cameras.centers, train.cameras.centers)
        assert dist.min() > 0.3
    h1, h2, h3 = (R.held_out_cameras(8, SIZE, seed=s) for s in (0, 0, 1))
    assert torch.equal(h1.cameras.viewmats, h2.cameras.viewmats)
    assert not torch.equal(h1.cameras.viewmats, h3.cameras.viewmats)
    f, b = R.front_back_cameras(SIZE)
    torch.testing.assert_close(b.azimuth - f.azimuth, torch.full_like(f.azimuth, 180.0))
    torch.testing.assert_close(f.cameras.centers * torch.tensor([-1.0, 1, -1]), b.cameras.centers, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- metrics

def test_image_metrics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 24, 24, 3, generator=g)
    assert math.isinf(float(M.psnr(x, x))) and float(M.psnr(x, x)) > 0
    y = (x + 0.1).clamp(0, 1)
    z = x.clone()
    z[..., :] = 0.5
    assert abs(float(M.psnr(torch.zeros(4, 4, 3), torch.full((4, 4, 3), 0.1))) - 20.0) < 1e-4
    assert float(M.psnr(y, x)) > float(M.psnr(z, x))
    assert abs(float(M.ssim(x, x)) - 1) < 1e-5 and float(M.ssim(z, x)) < 0.5
    assert float(M.ssim(x[0, :8, :8], x[0, :8, :8])) > 0.999  # tiny images shrink the window
    a = torch.zeros(1, 8, 8, 1)
    a[:, 2:6, 2:6] = 1
    b = torch.zeros_like(a)
    b[:, 2:6, 4:8] = 1
    assert float(M.silhouette_iou(a, a)) == 1.0
    assert abs(float(M.silhouette_iou(a, b)) - 8 / 24) < 1e-6
    assert float(M.silhouette_iou(torch.zeros_like(a), torch.zeros_like(a))) == 1.0
    with pytest.raises(ValueError):
        M.psnr(x, x[0])


def test_chamfer():
    obj = OBJECTS["blue_ball"]
    s = obj.surface(8000, seed=1)
    c0 = M.chamfer_to_surface(s.points[:3000], s.points[:3000])
    assert float(c0["chamfer"]) < 1e-6 and float(c0["precision"]) < 1e-6
    other = obj.surface(2000, seed=2).points
    assert float(M.chamfer_to_surface(other, s.points)["precision"]) < 0.02  # another sample of the same surface
    for delta in (0.04, 0.08):  # offset along the normals: every point lies exactly delta off the surface
        c = M.chamfer_to_surface(other + delta * obj.surface(2000, seed=2).normals, s.points, chunk=1000)
        assert abs(float(c["precision"]) - delta) < 0.15 * delta
    shifts = [float(M.chamfer_to_surface(other + torch.tensor([d, 0, 0]), s.points)["chamfer"])
              for d in (0.0, 0.05, 0.1)]
    assert shifts[0] < shifts[1] < shifts[2] and 0.3 * 0.1 < shifts[2] < 1.1 * 0.1
    # precision is one-sided: points on part of the surface are precise but incomplete
    half = other[other[:, 2] > 0]
    c = M.chamfer_to_surface(half, s.points)
    assert float(c["precision"]) < 0.02 and float(c["completeness"]) > 0.1
    assert math.isinf(float(M.chamfer_to_surface(torch.zeros(0, 3), s.points)["chamfer"]))


def test_saturation_gap():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 16, 16, 3, generator=g) * 0.8 + 0.1
    grey = img.mean(-1, keepdim=True).expand_as(img)
    washed = 0.5 * img + 0.5 * grey
    mask = torch.zeros(1, 16, 16, 1)
    mask[:, 4:12, 4:12] = 1
    assert abs(float(M.saturation_gap(img, img, mask))) < 1e-6
    assert float(M.saturation_gap(washed, img, mask)) < -0.05
    assert float(M.saturation_gap(img, washed)) > 0.05
    assert float(M.saturation_gap(grey, img, mask > 0.5)) < float(M.saturation_gap(washed, img, mask))


def _janus_student(g):
    """Front half of the truth plus its mirror image behind: a two-faced student."""
    front = {k: v[g["means"][:, 2] > 0] for k, v in g.items()}
    back = P.mirror_gaussians_z(front)
    return {k: torch.cat([front[k], back[k]]) for k in front}


def test_janus_score(cache):
    obj = get_object("house")
    f, b = R.front_back_cameras(SIZE, elevations=(10,), azimuth_offsets=(-20, 20))
    gf = R.render_reference(obj, f, n_gaussians=N_GAUSS)["images"]
    gb = R.render_reference(obj, b, n_gaussians=N_GAUSS)["images"]
    assert M.janus_score(gf, gb, gf, gb) == 0.0
    assert M.janus_score(gb, gf, gf, gb) == 1.0  # front and back swapped
    student = _janus_student(R.reference_gaussians(obj, N_GAUSS))
    pf = R.render_gaussian_views(student, f.cameras)["images"]
    pb = R.render_gaussian_views(student, b.cameras)["images"]
    det = M.janus_score(pf, pb, gf, gb, return_details=True)
    assert det["score"] == 1.0 and det["back_confusion"] == 1.0 and det["front_confusion"] == 0.0
    assert M.janus_score(pf, pb, gf, gb) == det["score"]


def test_evaluate_gaussians(cache):
    obj = get_object("two_tone_box")
    # few views: this must stay fast on the dense torch rasterizer too
    kw = dict(size=SIZE, n_views=2, n_reference=N_GAUSS, n_surface=3000, janus=False, janus_elevations=(10,),
              janus_azimuth_offsets=(0,))
    gt = obj.gaussians(N_GAUSS)
    r = M.evaluate_gaussians(obj, gt, **{**kw, "janus": True})
    assert r["iou"] > 0.99 and r["psnr"] > 40 and r["ssim"] > 0.99
    assert abs(r["saturation_gap"]) < 1e-3 and r["janus"] == 0.0 and r["chamfer"] < 0.03
    assert r["n_views"] == 2 and r["n_gaussians"] == N_GAUSS

    # SH colours (degree 0, and degree 1 with zero higher bands) render the same
    sh0 = (gt["colors"] - 0.5) / 0.28209479177387814
    sh1 = torch.cat([sh0[:, None], torch.zeros(N_GAUSS, 3, 3)], dim=1)
    r_sh = M.evaluate_gaussians(obj, {**gt, "colors": sh1}, **{**kw, "n_views": 1})
    assert r_sh["psnr"] > 40 and r_sh["iou"] > 0.99

    moved = {**gt, "means": gt["means"] + torch.tensor([0.08, 0.0, 0.0]), "scales": gt["scales"] * 2.5}
    w = M.evaluate_gaussians(obj, moved, **kw)
    assert w["psnr"] < r["psnr"] - 10 and w["psnr"] < 30 and w["iou"] < 0.97 and w["ssim"] < r["ssim"]
    assert w["chamfer"] > r["chamfer"] + 0.01

    janus = M.evaluate_gaussians(obj, _janus_student(gt), **{**kw, "janus": True})
    assert janus["janus"] == 1.0 and janus["iou"] > 0.95

    dull = {**gt, "colors": 0.5 * gt["colors"] + 0.5 * gt["colors"].mean(-1, keepdim=True)}
    assert M.evaluate_gaussians(obj, dull, **{**kw, "n_views": 1})["saturation_gap"] < -0.05

    assert w["janus"] is None  # skipped
    cube = M.evaluate_gaussians("red cube", OBJECTS["red_cube"].gaussians(N_GAUSS),
                                **{**kw, "janus": True, "n_views": 1})
    assert cube["janus"] is None and cube["psnr"] > 40  # not a front/back object


def test_shape_object_api_unchanged():
    o = OBJECTS["red_cube"]
    assert isinstance(o, ShapeObject) and o.prompt == "a red cube" and not o.front_back_differ
    g = o.gaussians(100)
    assert set(g) == {"means", "quats", "scales", "opacities", "colors"} and g["means"].shape == (100, 3)
