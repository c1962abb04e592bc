"""GaussianModel: activations, constructors, optimizers, density control, checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch

from studio.students.gaussians import (
    DefaultStrategy,
    GaussianModel,
    default_learning_rates,
    duplicate,
    knn_mean_distance,
    make_schedulers,
    remove,
    reset_opacity,
    rgb_to_sh,
    split,
    update_params_and_optimizers,
)


def _camera(width=24, height=20, dist=3.0):
    """One OpenCV-frame camera on the +z axis looking at the origin (world-to-camera)."""
    viewmat = torch.eye(4)
    viewmat[1, 1] = -1.0  # camera y down
    viewmat[2, 2] = -1.0  # camera z towards -world z
    viewmat[2, 3] = dist
    f = 1.2 * width
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return viewmat[None], K[None], width, height


def _train_one_step(model, optimizers):
    """A fake backward pass: give every parameter a gradient, then step."""
    loss = sum((p * p).sum() for p in model.params.values())
    loss.backward()
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad(set_to_none=True)


def _assert_consistent(model, optimizers):
    n = model.num_gaussians
    for name, p in model.params.items():
        assert p.shape[0] == n, name
        opt = optimizers[name]
        held = opt.param_groups[0]["params"][0]
        assert held is p, name
        st = opt.state.get(p)
        if st:
            assert st["exp_avg"].shape == p.shape
            assert st["exp_avg_sq"].shape == p.shape


# --------------------------------------------------------------------------------------- activations

def test_activations_and_colors():
    model = GaussianModel.random_in_sphere(50, radius=1.0, seed=0, sh_degree=2)
    p = model.params
    with torch.no_grad():
        p["scales"].normal_()
        p["quats"].normal_()
        p["opacities"].normal_()
    assert torch.allclose(model.scales, p["scales"].exp())
    assert torch.allclose(model.quats.norm(dim=-1), torch.ones(50), atol=1e-6)
    assert torch.allclose(model.opacities, torch.sigmoid(p["opacities"]))
    assert model.colors.shape == (50, 9, 3)
    assert torch.equal(model.colors[:, :1], p["sh0"])
    assert model.means is p["means"]
    assert len(model) == 50 and model.sh_degree == 2 and model.active_sh_degree == 0


def test_sh_degree_schedule():
    model = GaussianModel.random_in_sphere(4, seed=0, sh_degree=3)
    assert [model.step_sh_degree(s, every=10) for s in (0, 9, 10, 25, 30, 1000)] == [0, 0, 1, 2, 3, 3]
    assert model.active_sh_degree == 3


def test_invalid_params_are_rejected():
    model = GaussianModel.random_in_sphere(4, seed=0, sh_degree=1)
    bad = {k: v.detach() for k, v in model.params.items()}
    bad["quats"] = bad["quats"][:, :3]
    with pytest.raises(ValueError, match="quats"):
        GaussianModel(bad, 1)
    with pytest.raises(ValueError, match="shN"):
        GaussianModel({k: v.detach() for k, v in model.params.items()}, 2)


# ------------------------------------------------------------------------------------- constructors

def test_random_in_sphere_deterministic_and_inside():
    a = GaussianModel.random_in_sphere(200, radius=2.0, seed=7, sh_degree=1)
    b = GaussianModel.random_in_sphere(200, radius=2.0, seed=7, sh_degree=1)
    c = GaussianModel.random_in_sphere(200, radius=2.0, seed=8, sh_degree=1)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    assert not torch.equal(a.means, c.means)
    assert float(a.means.detach().norm(dim=-1).max()) <= 2.0 + 1e-5
    assert torch.allclose(a.opacities, torch.full((200,), 0.1), atol=1e-6)
    assert torch.equal(a.params["shN"], torch.zeros(200, 3, 3))
    # colours in [0,1]
    rgb = a.params["sh0"][:, 0].detach() * 0.28209479177387814 + 0.5
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1


def test_from_points_knn_scale():
    xyz = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [10.0, 10, 10]])
    d = knn_mean_distance(xyz, k=3)
    # point 0: neighbours at distances 1, 2, 3
    assert math.isclose(float(d[0]), 2.0, rel_tol=1e-5)
    # chunking does not change the result
    big = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    # cdist expands |a|^2 + |b|^2 - 2 a.b in float32: a few ulps of |p|^2, over 2 d in the distance d
    full = knn_mean_distance(big)
    tol = 4 * torch.finfo(torch.float32).eps * float(big.square().sum(-1).max()) / (2 * float(full.min()))
    assert torch.allclose(knn_mean_distance(big, max_block=1000), full, rtol=0, atol=tol)
    model = GaussianModel.from_points(xyz, rgb=torch.tensor([1.0, 0.0, 0.5]), sh_degree=0)
    assert torch.allclose(model.scales[:, 0], d, atol=1e-6)
    assert torch.equal(model.scales[:, 0], model.scales[:, 1]) and torch.equal(model.scales[:, 0], model.scales[:, 2])
    assert torch.allclose(model.params["sh0"][0, 0], rgb_to_sh(torch.tensor([1.0, 0.0, 0.5])))
    assert model.params["shN"].shape == (5, 0, 3)
    assert torch.equal(model.quats, torch.tensor([[1.0, 0, 0, 0]]).repeat(5, 1))
    with pytest.raises(ValueError, match="xyz"):
        GaussianModel.from_points(torch.zeros(5, 2))


def test_from_mesh_uniform_scaling_and_determinism():
    # unit square in the z=0 plane (two triangles) + a sliver triangle with ~0 area
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [5, 5, 5], [5, 5, 5.0], [5, 5, 5.000001]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    vcol = torch.zeros(7, 3)
    vcol[:, 0] = torch.tensor([0.0, 1, 1, 0, 0, 0, 0])  # red grows with x
    a = GaussianModel.from_mesh(verts, faces, 500, colors=vcol, seed=3, sh_degree=1)
    b = GaussianModel.from_mesh(verts, faces, 500, colors=vcol, seed=3, sh_degree=1)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    m = a.means.detach()
    assert float(m[:, 2].abs().max()) < 1e-6  # all on the square
    assert float(m[:, :2].min()) >= -1e-6 and float(m[:, :2].max()) <= 1 + 1e-6
    # area-weighted: both triangles of the square get about half the samples
    frac = float((m[:, 0] > m[:, 1]).float().mean())
    assert 0.4 < frac < 0.6
    # isotropic: one scalar per Gaussian, identical on all three axes
    s = a.params["scales"]
    assert torch.equal(s[:, 0], s[:, 1]) and torch.equal(s[:, 1], s[:, 2])
    # barycentric colour interpolation: red == x
    red = (a.params["sh0"][:, 0, 0] * 0.28209479177387814 + 0.5).detach()
    assert torch.allclose(red, m[:, 0], atol=1e-5)
    # explicit scale
    c = GaussianModel.from_mesh(verts, faces, 100, scale=0.02, seed=0)
    assert torch.allclose(c.scales, torch.full((100, 3), 0.02))
    # per-face colours
    d = GaussianModel.from_mesh(verts, faces, 10, colors=torch.tensor([[0.0, 1, 0], [0, 1, 0], [1, 0, 0]]), seed=0)
    assert torch.allclose(d.params["sh0"][:, 0, 1] * 0.28209479177387814 + 0.5, torch.ones(10), atol=1e-6)
    with pytest.raises(ValueError, match="faces"):
        GaussianModel.from_mesh(verts, torch.tensor([[0, 1, 9]]), 10)


def test_from_mesh_accepts_trimesh():
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    model = GaussianModel.from_mesh(box, n_points=300, seed=0, sh_degree=0)
    m = model.means.detach()
    assert torch.allclose(m.abs().max(dim=-1).values, torch.ones(300), atol=1e-5)  # on the cube's surface


# ---------------------------------------------------------------------------------------- optimizers

def test_make_optimizers_learning_rates_and_schedule():
    model = GaussianModel.random_in_sphere(10, seed=0, sh_degree=1, features_dim=4)
    opts = model.make_optimizers(scene_scale=2.0, lrs={"quats": 0.5})
    assert set(opts) == set(model.params.keys())
    lr = {k: o.param_groups[0]["lr"] for k, o in opts.items()}
    assert lr["means"] == pytest.approx(3.2e-4)
    assert lr["scales"] == 5e-3 and lr["opacities"] == 5e-2 and lr["sh0"] == 2.5e-3
    assert lr["shN"] == pytest.approx(2.5e-3 / 20) and lr["quats"] == 0.5
    assert default_learning_rates()["means"] == 1.6e-4
    sched = make_schedulers(opts, max_steps=100, final_ratio=0.01)
    for _ in range(100):
        opts["means"].step()
        sched["means"].step()
    assert opts["means"].param_groups[0]["lr"] == pytest.approx(3.2e-6, rel=1e-6)
    with pytest.raises(ValueError, match="nope"):
        model.make_optimizers(lrs={"nope": 1.0})


# ------------------------------------------------------------------------------ density-control primitives

def _model_with_state(n=20, sh_degree=1):
    model = GaussianModel.random_in_sphere(n, seed=1, sh_degree=sh_degree, features_dim=2)
    opts = model.make_optimizers()
    _train_one_step(model, opts)  # creates Adam moments
    return model, opts


def test_duplicate_split_remove_keep_optimizer_state_consistent():
    model, opts = _model_with_state(20)
    before = {k: v.detach().clone() for k, v in model.params.items()}
    old_avg = opts["means"].state[model.params["means"]]["exp_avg"].clone()

    mask = torch.zeros(20, dtype=torch.bool)
    mask[[2, 5, 7]] = True
    assert duplicate(model.params, opts, None, mask) == 3
    assert model.num_gaussians == 23
    _assert_consistent(model, opts)
    assert torch.equal(model.means[20:], before["means"][[2, 5, 7]])
    st = opts["means"].state[model.params["means"]]
    assert torch.equal(st["exp_avg"][:20], old_avg) and torch.equal(st["exp_avg"][20:], torch.zeros(3, 3))

    smask = torch.zeros(23, dtype=torch.bool)
    smask[[0, 1]] = True
    g = torch.Generator().manual_seed(0)
    assert split(model.params, opts, None, smask, generator=g) == 2
    assert model.num_gaussians == 25
    _assert_consistent(model, opts)
    # children: 2 per parent, scales / 1.6, same colour, near the parent
    new_scales = model.scales[-4:].detach()
    assert torch.allclose(new_scales[:2], before["scales"][[0, 1]].exp() / 1.6, atol=1e-6)
    assert torch.allclose(new_scales[2:], before["scales"][[0, 1]].exp() / 1.6, atol=1e-6)
    assert torch.equal(model.params["sh0"][-4:-2], before["sh0"][[0, 1]])
    assert torch.equal(model.params["features"][-2:], before["features"][[0, 1]])
    # the survivors come first, in order
    assert torch.equal(model.means[:18].detach(), before["means"][2:20])

    rmask = torch.zeros(25, dtype=torch.bool)
    rmask[:5] = True
    assert remove(model.params, opts, None, rmask) == 5
    assert model.num_gaussians == 20
    _assert_consistent(model, opts)
    _train_one_step(model, opts)  # a subsequent optimiser step works
    _assert_consistent(model, opts)


def test_reset_opacity_clamps_and_zeroes_moments():
    model, opts = _model_with_state(10)
    with torch.no_grad():
        model.params["opacities"][:5] = 3.0
        model.params["opacities"][5:] = -6.0
    reset_opacity(model.params, opts, value=0.01)
    o = model.opacities.detach()
    assert torch.allclose(o[:5], torch.full((5,), 0.01), atol=1e-6)
    assert torch.allclose(o[5:], torch.sigmoid(torch.tensor(-6.0)).expand(5))
    st = opts["opacities"].state[model.params["opacities"]]
    assert torch.equal(st["exp_avg"], torch.zeros(10)) and torch.equal(st["exp_avg_sq"], torch.zeros(10))
    assert opts["means"].state[model.params["means"]]["exp_avg"].abs().sum() > 0  # other groups untouched


def test_update_helper_rejects_unrelated_optimizer():
    model, _ = _model_with_state(5)
    other = GaussianModel.random_in_sphere(5, seed=0, sh_degree=1, features_dim=2).make_optimizers()
    with pytest.raises(ValueError, match="does not hold"):
        update_params_and_optimizers(model.params, other, lambda n, p: p, lambda k, v: v, names=["means"])


# ---------------------------------------------------------------------------------------- the strategy

def test_strategy_grows_splits_prunes_and_resets():
    model, opts = _model_with_state(30)
    with torch.no_grad():
        model.params["scales"][:10] = math.log(0.001)  # small -> duplicated
        model.params["scales"][10:20] = math.log(0.05)  # large -> split
        model.params["opacities"][20:25] = -10.0  # transparent -> pruned
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=2, reset_every=4, refine_stop_iter=100,
                               grow_grad2d=1e-3, grow_scale3d=0.01)
    strategy.check_sanity(model.params, opts)
    state = strategy.initialize_state(scene_scale=1.0)

    C, N = 2, 30
    means2d = torch.zeros(C, N, 2, requires_grad=True)
    radii = torch.ones(C, N, 2, dtype=torch.int32)
    radii[:, 25:] = 0  # never visible
    info = {"means2d": means2d, "radii": radii, "width": 20, "height": 10, "n_cameras": C}
    strategy.step_pre_backward(model.params, opts, state, 1, info)
    g = torch.zeros(C, N, 2)
    g[:, :20, 0] = 1.0  # high screen-space gradient for the first 20
    means2d.backward(g)
    strategy.step_post_backward(model.params, opts, state, 1, info)
    # normalised like gsplat: grad * W/2 * n_cameras, summed over cameras, counted per visible camera
    assert torch.allclose(state["grad2d"][:20], torch.full((20,), 2 * 1.0 * 10 * 2))
    assert torch.equal(state["count"][:25], torch.full((25,), 2.0)) and float(state["count"][25:].sum()) == 0

    means2d.grad = None
    means2d.backward(g)
    strategy.step_post_backward(model.params, opts, state, 2, info)  # refine step
    last = state["last_refine"]
    assert last["duplicated"] == 10 and last["split"] == 10 and last["pruned"] == 5
    assert model.num_gaussians == 30 + 10 + 10 - 5 == last["num_gaussians"]
    assert float(state["grad2d"].abs().sum()) == 0 and state["grad2d"].shape[0] == model.num_gaussians
    _assert_consistent(model, opts)
    _train_one_step(model, opts)

    # opacity reset at step 4 (after a refine that grows nothing)
    n = model.num_gaussians
    info4 = {"means2d": torch.zeros(1, n, 2, requires_grad=True), "radii": torch.ones(1, n, 2, dtype=torch.int32),
             "width": 20, "height": 10, "n_cameras": 1}
    strategy.step_pre_backward(model.params, opts, state, 4, info4)
    (info4["means2d"] * 0).sum().backward()
    with torch.no_grad():
        model.params["opacities"].fill_(4.0)
    strategy.step_post_backward(model.params, opts, state, 4, info4)
    assert state["last_refine"]["step"] == 4 and state["last_refine"]["duplicated"] == 0
    assert state["last_refine"]["split"] == 0 and model.num_gaussians == n
    assert torch.allclose(model.opacities.detach(), torch.full((model.num_gaussians,), 0.01), atol=1e-6)
    _train_one_step(model, opts)
    _assert_consistent(model, opts)

    # after refine_stop_iter nothing happens
    n = model.num_gaussians
    strategy.step_post_backward(model.params, opts, state, 100, info4)
    assert model.num_gaussians == n


def test_strategy_packed_matches_dense():
    """gsplat's packed layout (means2d [nnz,2] + gaussian_ids) accumulates the same statistics."""
    C, N = 2, 6
    g = torch.randn(C, N, 2, generator=torch.Generator().manual_seed(0))
    radii = torch.ones(C, N, 2, dtype=torch.int32)
    radii[0, [1, 4]] = 0
    vis = (radii > 0).all(-1)
    strategy = DefaultStrategy()
    params = GaussianModel.random_in_sphere(N, seed=0, sh_degree=0).params
    dense_state, packed_state = strategy.initialize_state(), strategy.initialize_state()
    m2d = torch.zeros(C, N, 2, requires_grad=True)
    m2d.grad = g.clone()
    strategy._update_state(params, dense_state, {"means2d": m2d, "radii": radii, "width": 8, "height": 6,
                                                 "n_cameras": C}, packed=False)
    packed = torch.zeros(int(vis.sum()), 2, requires_grad=True)
    packed.grad = g[vis].clone()
    strategy._update_state(params, packed_state, {"means2d": packed, "radii": radii[vis], "width": 8, "height": 6,
                                                  "n_cameras": C, "gaussian_ids": vis.nonzero()[:, 1]}, packed=True)
    assert torch.allclose(dense_state["grad2d"], packed_state["grad2d"])
    assert torch.equal(dense_state["count"], packed_state["count"])
    assert dense_state["count"].tolist() == [2, 1, 2, 2, 1, 2]


def test_strategy_requires_pre_backward():
    model, opts = _model_with_state(4)
    strategy = DefaultStrategy()
    state = strategy.initialize_state()
    info = {"means2d": torch.zeros(1, 4, 2, requires_grad=True), "radii": torch.ones(1, 4, 2),
            "width": 8, "height": 8, "n_cameras": 1}
    with pytest.raises(ValueError, match="step_pre_backward"):
        strategy.step_post_backward(model.params, opts, state, 1, info)
    with pytest.raises(ValueError, match="same keys"):
        strategy.check_sanity(model.params, {"means": opts["means"]})


def test_train_few_steps_with_renderer_and_strategy():
    torch.manual_seed(0)
    viewmats, Ks, W, H = _camera(24, 20)
    target = torch.zeros(1, H, W, 3)
    target[..., 0] = 1.0  # a red image
    model = GaussianModel.random_in_sphere(40, radius=0.5, seed=0, sh_degree=1)
    opts = model.make_optimizers(lrs={"sh0": 0.05})
    strategy = DefaultStrategy(refine_start_iter=1, refine_every=3, reset_every=1000, refine_stop_iter=50,
                               grow_grad2d=1e-6, prune_opa=0.05)
    strategy.check_sanity(model.params, opts)
    state = strategy.initialize_state(scene_scale=1.0)
    n0 = model.num_gaussians
    losses = []
    for step in range(7):
        model.step_sh_degree(step, every=4)
        img, alpha, info = model.render(viewmats, Ks, W, H, backend="torch")
        assert img.shape == (1, H, W, 3) and alpha.shape == (1, H, W, 1)
        strategy.step_pre_backward(model.params, opts, state, step, info)
        loss = (img - target).abs().mean()
        loss.backward()
        losses.append(loss.item())
        strategy.step_post_backward(model.params, opts, state, step, info)
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        _assert_consistent(model, opts)
    assert state["last_refine"] is not None and model.num_gaussians != n0
    assert losses[-1] < losses[0]
    assert model.active_sh_degree == 1


def test_render_features():
    viewmats, Ks, W, H = _camera(16, 12)
    model = GaussianModel.random_in_sphere(10, radius=0.3, seed=0, sh_degree=0, features_dim=5)
    img, _, _ = model.render(viewmats, Ks, W, H, use_features=True, backend="torch")
    assert img.shape == (1, H, W, 5)
    with pytest.raises(ValueError, match="features"):
        GaussianModel.random_in_sphere(3, seed=0).render(viewmats, Ks, W, H, use_features=True)


# ---------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_roundtrip_bitwise(tmp_path):
    model, opts = _model_with_state(25, sh_degree=2)
    model.active_sh_degree = 1
    st_path, js_path = model.save(tmp_path / "ckpt", step=123, metadata={"prompt": "a red cube"}, optimizers=opts)
    assert st_path.name == "ckpt.safetensors" and js_path.name == "ckpt.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]  # no temp files
    info = json.loads(js_path.read_text())
    assert info["sh_degree"] == 2 and info["active_sh_degree"] == 1 and info["step"] == 123
    assert info["metadata"] == {"prompt": "a red cube"}

    loaded = GaussianModel.load(tmp_path / "ckpt")
    assert loaded.sh_degree == 2 and loaded.active_sh_degree == 1 and loaded.step == 123
    assert loaded.metadata == {"prompt": "a red cube"}
    assert set(loaded.params.keys()) == set(model.params.keys())
    for k, v in model.params.items():
        assert loaded.params[k].dtype == v.dtype
        assert torch.equal(loaded.params[k].view(torch.int32), v.detach().view(torch.int32)), k  # bitwise
        assert loaded.params[k].requires_grad
    # ".safetensors" suffix also accepted; optimizer state restores exactly
    again = GaussianModel.load(tmp_path / "ckpt.safetensors")
    opts2 = again.make_optimizers()
    again.load_optimizer_state(tmp_path / "ckpt", opts2)
    for k in model.params:
        a = opts[k].state[model.params[k]]
        b = opts2[k].state[again.params[k]]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert torch.equal(a["step"], b["step"])
    _train_one_step(model, opts)
    _train_one_step(again, opts2)
    for k in model.params:
        assert torch.equal(model.params[k], again.params[k]), k  # resumed training is identical


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        GaussianModel.load(tmp_path / "missing")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        GaussianModel.load(tmp_path / "bad")
    model = GaussianModel.random_in_sphere(3, seed=0)
    with pytest.raises(ValueError, match="JSON"):
        model.save(tmp_path / "x", metadata={"obj": object()})
    assert not any(tmp_path.glob("x*")) and not any(tmp_path.glob(".x*"))


def test_save_replaces_atomically_and_keeps_old_on_failure(tmp_path, monkeypatch):
    model = GaussianModel.random_in_sphere(5, seed=0, sh_degree=0)
    model.save(tmp_path / "c")
    old = (tmp_path / "c.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    bigger = GaussianModel.random_in_sphere(9, seed=1, sh_degree=0)
    monkeypatch.setattr(safetensors.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        bigger.save(tmp_path / "c")
    assert (tmp_path / "c.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.safetensors"]
