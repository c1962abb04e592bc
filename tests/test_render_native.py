"""Parity tests: the native C++/OpenMP tile rasterizer against the dense torch twin.

Tolerances (``_close`` compares ``max|a - b| <= atol + rtol * max|b|`` over the whole tensor):

* float32 forward (render, alphas): 2e-5 relative to the largest value (the remaining differences are
  libm ``exp`` vs torch's vectorised ``exp`` and the summation order of the colour sum);
* float32 gradients: 1e-4 relative to the largest gradient entry of that tensor;
* float64: 1e-9 forward and gradients (the backends agree to ~1e-15 in practice).

Most edge cases run in float64, where a pixel/Gaussian pair sitting exactly on the ALPHA_MIN or T_EPS
threshold (which could flip between two ``exp`` implementations in float32) is practically impossible.
"""
from __future__ import annotations

import math

import pytest
import torch

from studio.render import rasterize_gaussians
from studio.render._gaussians_ext import native as _native
from studio.render._common import ALPHA_MIN
from studio.render._gaussians_torch import rasterize_to_pixels_torch

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"native rasterizer extension unavailable: {_native.load_error()}"
)

TOL = {torch.float32: dict(fwd=2e-5, grad=1e-4), torch.float64: dict(fwd=1e-9, grad=1e-9)}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), dtype=torch.float32) -> torch.Tensor:
    """World-to-camera matrix (OpenCV axes: x right, y down, z forward) looking from eye at target."""
    eye_t = torch.tensor(eye, dtype=torch.float64)
    f = torch.tensor(target, dtype=torch.float64) - eye_t
    f = f / f.norm()
    r = torch.linalg.cross(f, torch.tensor(up, dtype=torch.float64))
    r = r / r.norm()
    u = torch.linalg.cross(r, f)
    R = torch.stack([r, -u, f])
    M = torch.eye(4, dtype=torch.float64)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye_t
    return M.to(dtype)


def intrinsics(W, H, f_scale=1.1, dtype=torch.float32) -> torch.Tensor:
    f = f_scale * W
    return torch.tensor([[f, 0.0, W / 2], [0.0, f, H / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def make_scene(N, W, H, C=1, *, seed=0, dtype=torch.float32, scale=(0.02, 0.2), opacity=(0.0, 1.0), D=3,
               sh_degree=None, per_camera_colors=False, radius=3.0):
    """Random Gaussians in the unit ball seen by C cameras on a circle of ``radius``."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(N, 3, generator=g, dtype=torch.float64)
    means = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-9) * torch.rand(N, 1, generator=g, dtype=torch.float64) ** (1 / 3)
    quats = torch.randn(N, 4, generator=g, dtype=torch.float64)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(N, 3, generator=g, dtype=torch.float64)
    opac = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(N, generator=g, dtype=torch.float64)
    if sh_degree is not None:
        K = (sh_degree + 1) ** 2
        colors = 0.3 * torch.randn(N, K, 3, generator=g, dtype=torch.float64)
    elif per_camera_colors:
        colors = torch.rand(C, N, D, generator=g, dtype=torch.float64)
    else:
        colors = torch.rand(N, D, generator=g, dtype=torch.float64)
    viewmats = torch.stack([
        look_at((radius * math.sin(2 * math.pi * c / C + 0.3), 0.4 * radius / 3, radius * math.cos(2 * math.pi * c / C + 0.3)),
                dtype=dtype)
        for c in range(C)
    ])
    Ks = torch.stack([intrinsics(W, H, dtype=dtype) for _ in range(C)])
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(means=cast(means), quats=cast(quats), scales=cast(scales), opacities=cast(opac),
                colors=cast(colors), viewmats=viewmats, Ks=Ks)


GRAD_KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "backgrounds")


def render_both(scene, W, H, *, backgrounds=None, loss_seed=1, **kw):
    """Render with both backends; returns {backend: (render, alphas, meta, grads)} under a random linear loss."""
    out = {}
    for backend in ("torch", "native"):
        inputs = {k: v.clone().requires_grad_(True) for k, v in scene.items() if k != "Ks"}
        bgs = backgrounds.clone().requires_grad_(True) if backgrounds is not None else None
        render, alphas, meta = rasterize_gaussians(
            inputs["means"], inputs["quats"], inputs["scales"], inputs["opacities"], inputs["colors"],
            inputs["viewmats"], scene["Ks"], W, H, backgrounds=bgs, backend=backend, **kw,
        )
        g = torch.Generator().manual_seed(loss_seed)
        w_r = torch.randn(render.shape, generator=g, dtype=render.dtype)
        w_a = torch.randn(alphas.shape, generator=g, dtype=alphas.dtype)
        loss = (render * w_r).sum() + (alphas * w_a).sum()
        if loss.requires_grad:
            loss.backward()
        grads = {k: inputs[k].grad for k in inputs}
        grads["backgrounds"] = bgs.grad if bgs is not None else None
        out[backend] = (render.detach(), alphas.detach(), meta, grads)
    return out


def _close(a, b, rtol, atol=1e-12, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max abs err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def assert_parity(res, dtype, *, check_grads=True, keys=GRAD_KEYS):
    tol = TOL[dtype]
    rt, at, mt, gt = res["torch"]
    rn, an, mn, gn = res["native"]
    assert mn["backend"] == "native" or mt["radii"].numel() == 0
    _close(rn, rt, tol["fwd"], what="render")
    _close(an, at, tol["fwd"], what="alphas")
    if check_grads:
        for k in keys:
            a, b = gn.get(k), gt.get(k)
            if a is None and b is None:
                continue
            # a backend may leave a grad unset (None) where the other computes exact zeros
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            _close(a, b, tol["grad"], atol=1e-10, what=f"grad {k}")


def conservative_radii(conics, opacities):
    """Opacity-aware radii (as ``project_gaussians`` computes them) straight from conics."""
    a, b, c = conics.detach().unbind(-1)
    det = a * c - b * b
    sxx, syy = c / det, a / det
    k = 2.0 * torch.log(torch.clamp(opacities.detach().clamp(max=1.0) / ALPHA_MIN, min=1.0))
    r = torch.stack([torch.ceil(torch.sqrt(k * sxx) + 1), torch.ceil(torch.sqrt(k * syy) + 1)], dim=-1)
    return torch.where(opacities.detach()[..., None] >= ALPHA_MIN, r, torch.zeros_like(r)).to(torch.int32)


def random_2d(C, N, W, H, D, *, seed=0, dtype=torch.float64, sigma=(1.0, 3.0), opacity=(0.2, 0.9)):
    """Random projected Gaussians for direct ``rasterize_to_pixels`` calls."""
    g = torch.Generator().manual_seed(seed)
    means2d = torch.rand(C, N, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype)
    sx = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(C, N, generator=g, dtype=dtype)
    sy = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(C, N, generator=g, dtype=dtype)
    rho = 0.8 * (2 * torch.rand(C, N, generator=g, dtype=dtype) - 1)
    det = (sx * sy) ** 2 * (1 - rho**2)
    conics = torch.stack([sy**2 / det, -rho * sx * sy / det, sx**2 / det], dim=-1)
    colors = torch.rand(C, N, D, generator=g, dtype=dtype)
    opac = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(C, N, generator=g, dtype=dtype)
    depths = 1 + torch.rand(C, N, generator=g, dtype=dtype)
    bgs = torch.rand(C, D, generator=g, dtype=dtype)
    return means2d, conics, colors, opac, conservative_radii(conics, opac), depths, bgs


# ------------------------------------------------------------------------------------------------
# parity through rasterize_gaussians
# ------------------------------------------------------------------------------------------------


def test_auto_backend_picks_native_on_cpu():
    from studio.render import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "native"


@pytest.mark.parametrize("render_mode", ["RGB", "D", "ED", "RGB+D", "RGB+ED"])
def test_render_modes_float32(render_mode):
    W, H = 37, 23
    scene = make_scene(300, W, H, C=2, seed=3)
    bgs = torch.rand(2, 3, generator=torch.Generator().manual_seed(5))
    res = render_both(scene, W, H, backgrounds=bgs, render_mode=render_mode)
    assert_parity(res, torch.float32)
    assert res["native"][1].max() > 0.5  # the scene actually covers pixels


@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED"])
def test_render_modes_float64(render_mode):
    W, H = 29, 31
    scene = make_scene(200, W, H, C=2, seed=4, dtype=torch.float64)
    bgs = torch.rand(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_parity(render_both(scene, W, H, backgrounds=bgs, render_mode=render_mode), torch.float64)


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_sh_degrees(sh_degree):
    W, H = 32, 24
    scene = make_scene(250, W, H, C=2, seed=10 + sh_degree, sh_degree=sh_degree)
    bgs = torch.rand(2, 3, generator=torch.Generator().manual_seed(6))
    assert_parity(render_both(scene, W, H, backgrounds=bgs, sh_degree=sh_degree), torch.float32)


def test_larger_scene_float32_small_gaussians():
    """A denser scene closer to training conditions (many small splats, deep per-pixel lists)."""
    W, H = 48, 40
    scene = make_scene(2000, W, H, seed=7, scale=(0.01, 0.05))
    res = render_both(scene, W, H)
    assert_parity(res, torch.float32)
    assert res["native"][2]["flatten_ids"].numel() > 2000


def test_early_termination_and_alpha_clamp():
    """Opaque, overlapping splats: pixels hit T_EPS termination and the ALPHA_MAX clamp."""
    W, H = 33, 27
    scene = make_scene(150, W, H, seed=8, dtype=torch.float64, scale=(0.1, 0.4), opacity=(0.9, 1.0))
    bgs = torch.rand(1, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = render_both(scene, W, H, backgrounds=bgs)
    assert_parity(res, torch.float64)
    alphas = res["native"][1]
    assert alphas.max() > 1 - 1e-3, "expected pixels that reached early termination"


@pytest.mark.parametrize("D", [1, 32])
def test_feature_dims(D):
    W, H = 23, 19
    scene = make_scene(150, W, H, C=2, seed=20 + D, D=D, per_camera_colors=True)
    bgs = torch.rand(2, D, generator=torch.Generator().manual_seed(3))
    assert_parity(render_both(scene, W, H, backgrounds=bgs), torch.float32)


def test_several_cameras_non_square_float64():
    W, H = 37, 23
    scene = make_scene(120, W, H, C=4, seed=30, dtype=torch.float64)
    assert_parity(render_both(scene, W, H), torch.float64)


def test_single_gaussian():
    W, H = 21, 17
    scene = make_scene(1, W, H, seed=0, dtype=torch.float64, scale=(0.3, 0.5), opacity=(0.7, 0.8))
    scene["means"] = torch.zeros(1, 3, dtype=torch.float64)
    bgs = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    res = render_both(scene, W, H, backgrounds=bgs)
    assert_parity(res, torch.float64)
    assert res["native"][1].max() > 0.5


def test_empty_scene_gives_backgrounds():
    W, H = 19, 13
    scene = make_scene(0, W, H, C=2)
    bgs = torch.rand(2, 3, generator=torch.Generator().manual_seed(4))
    res = render_both(scene, W, H, backgrounds=bgs)
    rn, an, _, gn = res["native"]
    assert torch.equal(an, torch.zeros(2, H, W, 1))
    assert torch.allclose(rn, bgs[:, None, None, :].expand(2, H, W, 3))
    assert_parity(res, torch.float32)
    # and the extension itself copes with N = 0
    z = torch.zeros(2, 0)
    bg = bgs.clone().requires_grad_(True)
    r, a, extra = _native.rasterize_to_pixels(torch.zeros(2, 0, 2), torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), z,
                                              torch.zeros(2, 0, 2, dtype=torch.int32), z, W, H, bg)
    assert torch.equal(a, torch.zeros(2, H, W, 1)) and torch.allclose(r, bgs[:, None, None, :].expand(2, H, W, 3))
    r.sum().backward()
    assert torch.allclose(bg.grad, torch.full((2, 3), float(H * W)))
    assert extra["flatten_ids"].numel() == 0


def test_behind_camera_and_outside_frustum():
    W, H = 30, 20
    scene = make_scene(60, W, H, seed=40, dtype=torch.float64)
    eye = torch.tensor([3 * math.sin(0.3), 0.4, 3 * math.cos(0.3)], dtype=torch.float64)
    m = scene["means"].clone()
    m[:20] = eye * 1.5 + 0.1 * m[:20]  # behind the camera
    m[20:40] = m[20:40] + torch.tensor([0.0, 10.0, 0.0], dtype=torch.float64)  # far outside the frustum
    scene["means"] = m
    bgs = torch.rand(1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res = render_both(scene, W, H, backgrounds=bgs)
    assert_parity(res, torch.float64)
    radii = res["native"][2]["radii"]
    assert (radii[0, :40] == 0).all() and (radii[0, 40:] > 0).any()
    # every Gaussian culled: the image is the background and grads are zero except backgrounds
    scene["means"] = eye * 1.5 + 0.1 * scene["means"]
    res = render_both(scene, W, H, backgrounds=bgs)
    assert_parity(res, torch.float64)
    rn, an, _, gn = res["native"]
    assert torch.equal(an, torch.zeros_like(an))
    assert gn["means"].abs().max() == 0 and gn["opacities"].abs().max() == 0


def test_zero_opacity():
    W, H = 25, 18
    scene = make_scene(50, W, H, seed=50, dtype=torch.float64)
    scene["opacities"] = torch.zeros(50, dtype=torch.float64)
    bgs = torch.rand(1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res = render_both(scene, W, H, backgrounds=bgs)
    assert_parity(res, torch.float64)
    assert torch.equal(res["native"][1], torch.zeros(1, H, W, 1))


@pytest.mark.parametrize("scales", [(3.0, 6.0), (1e-4, 1e-3)], ids=["huge", "tiny"])
def test_huge_and_tiny_scales(scales):
    W, H = 26, 22
    scene = make_scene(40, W, H, seed=60, dtype=torch.float64, scale=scales)
    bgs = torch.rand(1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert_parity(render_both(scene, W, H, backgrounds=bgs), torch.float64)


def test_tile_size_does_not_change_the_image():
    """Every pixel sees the same depth-ordered Gaussians whatever the tiling: bitwise equal outputs."""
    W, H = 45, 29
    scene = make_scene(300, W, H, C=2, seed=70)
    bgs = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    outs = []
    for ts in (4, 16, 64):
        means = scene["means"].clone().requires_grad_(True)
        r, a, meta = rasterize_gaussians(means, scene["quats"], scene["scales"], scene["opacities"], scene["colors"],
                                         scene["viewmats"], scene["Ks"], W, H, backgrounds=bgs, backend="native",
                                         tile_size=ts)
        (r.square().sum() + a.sum()).backward()
        assert meta["isect_offsets"].shape == (2, math.ceil(H / ts), math.ceil(W / ts))
        outs.append((r.detach(), a.detach(), means.grad))
    for r, a, g in outs[1:]:
        assert torch.equal(r, outs[0][0]) and torch.equal(a, outs[0][1])
        _close(g, outs[0][2], 1e-5, what="means grad across tile sizes")


def test_backward_is_deterministic():
    W, H = 40, 30
    scene = make_scene(500, W, H, seed=80)
    grads = []
    for _ in range(2):
        inputs = {k: v.clone().requires_grad_(True) for k, v in scene.items() if k != "Ks"}
        r, a, _ = rasterize_gaussians(inputs["means"], inputs["quats"], inputs["scales"], inputs["opacities"],
                                      inputs["colors"], inputs["viewmats"], scene["Ks"], W, H, backend="native")
        (r.sum() + a.sum()).backward()
        grads.append([inputs[k].grad for k in ("means", "scales", "opacities", "colors")])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


# ------------------------------------------------------------------------------------------------
# rasterize_to_pixels directly
# ------------------------------------------------------------------------------------------------


def test_binning_meta_is_consistent():
    C, N, W, H, ts = 2, 80, 37, 23, 8
    means2d, conics, colors, opac, radii, depths, bgs = random_2d(C, N, W, H, 3, seed=1, dtype=torch.float32)
    radii[0, :10] = 0  # culled
    _, _, extra = _native.rasterize_to_pixels(means2d, conics, colors, opac, radii, depths, W, H, bgs, tile_size=ts)
    offs, flat, tpg = extra["isect_offsets"], extra["flatten_ids"], extra["tiles_per_gauss"]
    assert offs.shape == (C, math.ceil(H / ts), math.ceil(W / ts)) and offs.dtype == torch.int32
    assert int(tpg.sum()) == flat.numel() and (tpg[0, :10] == 0).all()
    bounds = torch.cat([offs.flatten(), torch.tensor([flat.numel()], dtype=torch.int32)]).tolist()
    for t in range(len(bounds) - 1):
        ids = flat[bounds[t] : bounds[t + 1]].long()
        cam = t // (offs.shape[1] * offs.shape[2])
        assert ((ids // N) == cam).all()
        d = depths.flatten()[ids]
        assert (d[1:] >= d[:-1]).all(), "tile list not depth sorted"


@pytest.mark.parametrize("with_bg", [True, False])
def test_direct_float64_matches_torch_twin(with_bg):
    C, N, W, H, D = 2, 40, 19, 14, 2
    means2d, conics, colors, opac, radii, depths, bgs = random_2d(C, N, W, H, D, seed=2)
    radii[1, 3] = 0
    opac[0, :5] = 1.0  # ALPHA_MAX clamp at the centres
    bgs = bgs if with_bg else None
    outs = {}
    for name in ("torch", "native"):
        leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac)]
        bg = bgs.clone().requires_grad_(True) if bgs is not None else None
        if name == "torch":
            r, a = rasterize_to_pixels_torch(*leaves, radii, depths, W, H, bg)
        else:
            r, a, _ = _native.rasterize_to_pixels(*leaves, radii, depths, W, H, bg, tile_size=4)
        g = torch.Generator().manual_seed(0)
        ((r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum() + (a * torch.randn(a.shape, generator=g, dtype=a.dtype)).sum()).backward()
        outs[name] = [r, a] + [t.grad for t in leaves] + ([bg.grad] if bg is not None else [])
    for x, y in zip(outs["native"], outs["torch"]):
        _close(x.detach(), y.detach(), 1e-10, atol=1e-12, what="direct float64")


def test_gradcheck_float64():
    C, N, W, H, D = 2, 5, 9, 7, 2
    means2d, conics, colors, opac, radii, depths, bgs = random_2d(C, N, W, H, D, seed=3, sigma=(1.0, 2.0))

    def f(m, q, c, o, b):
        r, a, _ = _native.rasterize_to_pixels(m, q, c, o, radii, depths, W, H, b, tile_size=4)
        return r, a

    leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac, bgs)]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_early_termination_and_clamp():
    """Opaque stack (termination + ALPHA_MAX clamp) on one pixel block, no background."""
    C, N, W, H, D = 1, 6, 6, 5, 3
    means2d, conics, colors, opac, radii, depths, _ = random_2d(C, N, W, H, D, seed=4, sigma=(2.0, 3.0),
                                                               opacity=(0.9, 0.97))
    means2d = means2d * 0.3 + torch.tensor([2.0, 1.5], dtype=torch.float64)
    r0, a0, _ = _native.rasterize_to_pixels(means2d, conics, colors, opac, radii, depths, W, H, None)
    assert a0.max() > 1 - 1e-3

    def f(m, q, c, o):
        r, a, _ = _native.rasterize_to_pixels(m, q, c, o, radii, depths, W, H, None, tile_size=4)
        return r, a

    leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac)]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-7, atol=1e-5, rtol=1e-4)


def test_rejects_non_cpu_and_bad_shapes():
    means2d, conics, colors, opac, radii, depths, bgs = random_2d(1, 3, 8, 8, 3, dtype=torch.float32)
    with pytest.raises(ValueError):
        _native.rasterize_to_pixels(means2d, conics[:, :2], colors, opac, radii, depths, 8, 8, bgs)
    with pytest.raises(ValueError):
        _native.rasterize_to_pixels(means2d, conics, colors, opac, radii, depths, 8, 8, bgs[:, :2])
    if torch.cuda.is_available():
        with pytest.raises(ValueError):
            _native.rasterize_to_pixels(means2d.cuda(), conics, colors, opac, radii, depths, 8, 8, bgs)
