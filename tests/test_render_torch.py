"""The torch twin against a literal per-pixel loop, and the public API's validation and conventions."""

import pytest
import torch

from studio.cameras import Cameras, intrinsics_from_fov, look_at, orbit_cameras
from studio.render import rasterize_gaussians
from studio.render._common import ALPHA_MAX, ALPHA_MIN, T_EPS
from studio.render._gaussians_torch import rasterize_to_pixels_torch


def scene(n=30, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        means=(torch.randn(n, 3, generator=g) * 0.4).to(dtype),
        quats=torch.randn(n, 4, generator=g).to(dtype),
        scales=(torch.rand(n, 3, generator=g) * 0.15 + 0.03).to(dtype),
        opacities=(torch.rand(n, generator=g) * 0.9 + 0.05).to(dtype),
        colors=torch.rand(n, 3, generator=g).to(dtype),
    )


def cams(C=2, w=24, h=18, dtype=torch.float32):
    c = orbit_cameras(torch.linspace(0, 30, C), torch.linspace(0, 120, C), 2.5, 50.0, w, h)
    return c.viewmats.to(dtype), c.Ks.to(dtype)


def literal_blend(means2d, conics, colors, opacities, depths, radii, w, h, bg):
    """One pixel at a time, one Gaussian at a time: the algorithm as written in _common."""
    out = torch.zeros(h, w, colors.shape[-1], dtype=colors.dtype)
    alpha_img = torch.zeros(h, w, 1, dtype=colors.dtype)
    vis = [i for i in range(len(depths)) if (radii[i] > 0).all()]
    order = sorted(vis, key=lambda i: (float(depths[i]), i))
    for r in range(h):
        for c in range(w):
            T = 1.0
            acc = torch.zeros(colors.shape[-1], dtype=colors.dtype)
            for i in order:
                dx, dy = c + 0.5 - means2d[i, 0], r + 0.5 - means2d[i, 1]
                a, b, cc = conics[i]
                sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
                if sigma < 0:
                    continue
                alpha = min(ALPHA_MAX, float(opacities[i] * torch.exp(-sigma)))
                if alpha < ALPHA_MIN:
                    continue
                nt = T * (1 - alpha)
                if nt <= T_EPS:
                    break
                acc += colors[i] * alpha * T
                T = nt
            out[r, c] = acc + T * bg
            alpha_img[r, c] = 1 - T
    return out, alpha_img


def test_torch_twin_matches_literal_loop():
    s = scene(12)
    V, K = cams(1, 14, 10)
    bg = torch.tensor([[0.2, 0.4, 0.9]])
    with torch.no_grad():
        img, alpha, meta = rasterize_gaussians(**s, viewmats=V, Ks=K, width=14, height=10, backgrounds=bg, backend="torch")
        ref, ref_a = literal_blend(meta["means2d"][0], meta["conics"][0], s["colors"], s["opacities"], meta["depths"][0],
                                   meta["radii"][0], 14, 10, bg[0])
    assert torch.allclose(img[0], ref, atol=1e-5)
    assert torch.allclose(alpha[0], ref_a, atol=1e-5)


def test_early_termination_stops_at_opaque_stack():
    # 12 nearly opaque Gaussians stacked at the centre: the stack saturates and later ones are ignored.
    n = 12
    means = torch.stack([torch.zeros(n), torch.zeros(n), torch.linspace(0, 1, n)], -1)
    s = dict(means=means, quats=torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4), scales=torch.full((n, 3), 0.3),
             opacities=torch.full((n,), 0.99), colors=torch.eye(3).repeat(4, 1))
    V = look_at(torch.tensor([[0.0, 0.0, -3.0]]))
    K = intrinsics_from_fov(40.0, 9, 9)
    img, alpha, _ = rasterize_gaussians(**s, viewmats=V, Ks=K, width=9, height=9, backend="torch")
    # After the nearest Gaussian T = 0.01; the next would leave T = 1e-4 <= T_EPS, so the pixel stops
    # there (gsplat's rule): exactly one Gaussian (red, z=0 nearest to the camera at z=-3) is blended.
    assert alpha[0, 4, 4, 0] == pytest.approx(0.99, abs=1e-5)
    assert img[0, 4, 4].tolist() == pytest.approx([0.99, 0.0, 0.0], abs=1e-5)


def test_projection_matches_camera_projection():
    s = scene(20)
    V, K = cams(3, 32, 20)
    c = Cameras(V, K, 32, 20)
    _, _, meta = rasterize_gaussians(**s, viewmats=V, Ks=K, width=32, height=20, backend="torch")
    pix, z = c.project(s["means"])
    vis = meta["radii"].all(-1)
    assert torch.allclose(meta["means2d"][vis], pix[vis], atol=1e-4)
    assert torch.allclose(meta["depths"], z, atol=1e-5)
    for k in ("means2d", "radii", "depths", "conics", "opacities", "width", "height", "n_cameras", "tile_size"):
        assert k in meta
    assert meta["radii"].shape == (3, 20, 2) and meta["radii"].dtype == torch.int32


def test_gradcheck_torch_twin_float64():
    s = scene(4, seed=3, dtype=torch.float64)
    V, K = cams(1, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        _, _, meta = rasterize_gaussians(**s, viewmats=V, Ks=K, width=6, height=5, backend="torch")
    m2 = meta["means2d"].clone().requires_grad_(True)
    con = meta["conics"].clone().requires_grad_(True)
    col = s["colors"][None].clone().requires_grad_(True)
    op = s["opacities"][None].clone().requires_grad_(True)
    bg = torch.rand(1, 3, dtype=torch.float64, requires_grad=True)

    def f(m2, con, col, op, bg):
        return rasterize_to_pixels_torch(m2, con, col, op, meta["radii"], meta["depths"], 6, 5, bg)

    assert torch.autograd.gradcheck(f, (m2, con, col, op, bg), eps=1e-6, atol=1e-5)


def test_full_pipeline_gradcheck_including_viewmats():
    s = scene(3, seed=5, dtype=torch.float64)
    V, K = cams(1, 5, 4, dtype=torch.float64)
    params = {k: v.clone().requires_grad_(True) for k, v in s.items()}
    V = V.clone().requires_grad_(True)

    def f(means, quats, scales, opacities, colors, V):
        img, a, _ = rasterize_gaussians(means, quats, scales, opacities, colors, V, K, 5, 4, backend="torch")
        return img, a

    assert torch.autograd.gradcheck(f, (*params.values(), V), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("mode", ["RGB", "D", "ED", "RGB+D", "RGB+ED"])
def test_render_modes(mode):
    s = scene(25)
    V, K = cams(2, 20, 16)
    img, alpha, meta = rasterize_gaussians(**s, viewmats=V, Ks=K, width=20, height=16, render_mode=mode, backend="torch")
    D = {"RGB": 3, "D": 1, "ED": 1, "RGB+D": 4, "RGB+ED": 4}[mode]
    assert img.shape == (2, 16, 20, D)
    if mode in ("ED", "RGB+ED"):
        covered = alpha[..., 0] > 0.5
        d = img[..., -1][covered]
        assert (d > meta["depths"].min() - 1e-3).all() and (d < meta["depths"].max() + 1e-3).all()


def test_sh_degree_zero_equals_rgb():
    s = scene(20)
    V, K = cams(2)
    from studio.render._common import SH_C0
    sh = ((s["colors"] - 0.5) / SH_C0)[:, None, :]
    rgb, _, _ = rasterize_gaussians(**s, viewmats=V, Ks=K, width=24, height=18, backend="torch")
    s2 = dict(s, colors=sh)
    shimg, _, _ = rasterize_gaussians(**s2, viewmats=V, Ks=K, width=24, height=18, sh_degree=0, backend="torch")
    assert torch.allclose(rgb, shimg, atol=1e-5)


def test_empty_and_culled_sets_render_background():
    V, K = cams(2)
    bg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    e = torch.zeros(0, 3)
    img, alpha, _ = rasterize_gaussians(e, torch.zeros(0, 4), e, torch.zeros(0), e, V, K, 24, 18, backgrounds=bg)
    assert torch.allclose(img, bg[:, None, None, :].expand_as(img)) and (alpha == 0).all()
    s = scene(5)
    s["means"] = s["means"] + torch.tensor([0.0, 0.0, 100.0])  # far behind / outside every camera
    V1 = look_at(torch.tensor([[0.0, 0.0, 3.0]]))
    K1 = intrinsics_from_fov(40.0, 24, 18)
    img, alpha, meta = rasterize_gaussians(**s, viewmats=V1, Ks=K1, width=24, height=18, backend="torch")
    assert (meta["radii"] == 0).all() and (alpha == 0).all() and torch.isfinite(img).all()


def _args():
    s = scene(5)
    V, K = cams(2)
    return dict(**s, viewmats=V, Ks=K, width=24, height=18)


@pytest.mark.parametrize("key,value,match", [
    ("means", torch.zeros(5, 2), r"means must have shape \[N, 3\]"),
    ("quats", torch.zeros(4, 4), r"quats must have shape \[N, 4\] with N=5"),
    ("scales", torch.zeros(5, 3, dtype=torch.int64), "scales must be a floating-point tensor"),
    ("opacities", torch.zeros(5, 1), r"opacities must have shape \[N\]"),
    ("colors", torch.zeros(4, 3), r"colors must have shape"),
    ("viewmats", torch.zeros(2, 3, 4), r"viewmats must have shape \[C, 4, 4\]"),
    ("Ks", torch.zeros(3, 3, 3), r"Ks must have shape \[C, 3, 3\] with C=2"),
    ("width", 0, "width must be a positive int"),
    ("means", torch.full((5, 3), float("nan")), "means contains NaN"),
    ("colors", torch.zeros(5, 3, dtype=torch.float64), "colors has dtype"),
])
def test_bad_inputs_raise_value_error(key, value, match):
    a = _args()
    a[key] = value
    with pytest.raises(ValueError, match=match):
        rasterize_gaussians(**a)


def test_bad_options():
    with pytest.raises(ValueError, match="render_mode"):
        rasterize_gaussians(**_args(), render_mode="RGBD")
    with pytest.raises(ValueError, match="backend"):
        rasterize_gaussians(**_args(), backend="vulkan")
    with pytest.raises(ValueError, match="sh_degree"):
        rasterize_gaussians(**_args(), sh_degree=4)
    with pytest.raises(ValueError, match=r"backgrounds must have shape \[C, D\]"):
        rasterize_gaussians(**_args(), backgrounds=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="CUDA tensors"):
        rasterize_gaussians(**_args(), backend="cuda")
