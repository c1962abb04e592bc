"""The deformable 4D Gaussian student (K-planes deformation field, spec dreamscene4d 4.1 / 11.6-7)."""
import torch

from studio.cameras import orbit_cameras
from studio.students.deform4d import (DeformableGaussians, DeformationField, KPlanesConfig, frame_time,
                                      time_resolution_for)
from studio.students.gaussians import GaussianModel

SMALL = KPlanesConfig(resolution=8, multires=(1, 2), time_resolution=6, channels=4, width=16)


def _model(n=60, seed=0):
    return GaussianModel.random_in_sphere(n, radius=0.5, seed=seed, sh_degree=0, opacity=0.5)


def test_zero_init_is_canonical_render_exactly():
    m = _model()
    d = DeformableGaussians(m, cfg=SMALL, seed=1)
    cam = orbit_cameras(0.0, 0.0, 2.0, 49.1, 24, 24)
    ref, ref_a, _ = m.render(cam.viewmats, cam.Ks, 24, 24, backend="torch")
    for tau in (-1.0, -0.3, 0.7):
        g = d.deformed(tau)
        assert torch.equal(g["means"], m.means) and torch.equal(g["scales"], m.scales)
        img, a, _ = d.render(cam.viewmats, cam.Ks, 24, 24, time=tau, backend="torch")
        assert torch.equal(img, ref) and torch.equal(a, ref_a)


def test_feature_independent_of_time_at_init_and_dims():
    f = DeformationField(KPlanesConfig(resolution=8, multires=(1, 2, 4, 8), time_resolution=5, channels=32))
    x = torch.rand(50, 3) * 3.2 - 1.6
    assert f.grid(x, -1.0).shape == (50, 128)
    # time planes are 1: the bilinear blend of ones is 1 up to float32 rounding (a few ulps of the product)
    assert torch.allclose(f.grid(x, -1.0), f.grid(x, 0.37), rtol=8 * 1.2e-7, atol=0)
    far = torch.full((3, 3), 10.0)  # outside the box: border padding keeps it finite
    assert torch.isfinite(f.grid(far, 0.0)).all()
    assert time_resolution_for(10) == 25 and time_resolution_for(100) == 80
    assert torch.allclose(frame_time(torch.arange(4), 4), torch.tensor([-1.0, -0.5, 0.0, 0.5]))


def test_gradient_reaches_planes_and_a_step_moves_means_towards_target():
    m = _model()
    d = DeformableGaussians(m, cfg=SMALL, seed=0)
    opt = torch.optim.Adam(d.field.parameters(), lr=1e-2)
    target = torch.tensor([0.1, 0.0, 0.0])
    losses = []
    for _ in range(2):
        g = d.deformed(0.5)
        loss = (g["means"] - (m.means.detach() + target)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        if len(losses) == 2:
            break
        opt.step()
        # after the first step the zero heads have moved; the planes get gradients from the second step on
    loss2 = (d.deformed(0.5)["means"] - m.means - target).pow(2).sum()
    loss2.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.field.grid.parameters())
    assert losses[1] < losses[0]
    assert m.params["means"].grad is None  # canonical frozen


def test_time_planes_interpolate_linearly_between_nodes():
    f = DeformationField(SMALL, seed=0)
    with torch.no_grad():
        for p in f.grid.planes:
            p.copy_(torch.randn_like(p))
    x = torch.rand(20, 3) - 0.5
    nodes = torch.linspace(-1, 1, SMALL.time_resolution)
    t0, t1 = float(nodes[2]), float(nodes[3])
    for k in (3, 4, 5):  # the planes with time
        c0, c1, cm = (f.grid.coords(x, torch.tensor(t)) for t in (t0, t1, 0.25 * t0 + 0.75 * t1))
        v0, v1, vm = (f.grid.sample_plane(k, c) for c in (c0, c1, cm))
        assert torch.allclose(vm, 0.25 * v0 + 0.75 * v1, atol=1e-5)
    # and a trained field deforms differently at different times
    d = DeformableGaussians(_model(), f)
    with torch.no_grad():
        d.field.pos_head.out.bias.fill_(0.0)
        d.field.pos_head.out.weight.normal_()
    assert not torch.allclose(d.deformed(t0)["means"], d.deformed(t1)["means"])


def test_save_load_round_trip(tmp_path):
    d = DeformableGaussians(_model(), cfg=SMALL, seed=3)
    with torch.no_grad():
        d.field.pos_head.out.weight.normal_()
    p = d.save(tmp_path / "obj4d", metadata={"frames": 4})
    d2 = DeformableGaussians.load(p)
    assert torch.equal(d.deformed(0.2)["means"], d2.deformed(0.2)["means"])
