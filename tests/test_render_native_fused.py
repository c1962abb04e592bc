"""The fused native path (projection + SH + binning + blend in one C++ call, and back in one): parity with the
torch backend and with the reference native path (torch projection + native blend, ``STUDIO_NATIVE_FUSED=0``),
its SIMD builds against each other, its screen-space gradient tap, and gradchecks of the whole pipeline.

Tolerances are those of tests/test_render_native.py (float32 forward 2e-5, gradients 1e-4, relative to the
largest entry; float64 1e-9), except where the ED modes divide by small alphas (see the test)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from studio.render import rasterize_gaussians
from studio.render._gaussians_ext import native, native_simd_isa
from test_render_native import TOL, _close, make_scene

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native rasterizer unavailable: {native.load_error()}")

KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats")


@contextmanager
def env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: v for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def render(scene, W, H, backend, *, bg=True, seed=1, **kw):
    inputs = {k: v.clone().requires_grad_(True) for k, v in scene.items() if k != "Ks"}
    C = scene["viewmats"].shape[0]
    D = scene["colors"].shape[-1]
    bgs = torch.rand(C, D, generator=torch.Generator().manual_seed(7), dtype=scene["means"].dtype)
    bgs = bgs.requires_grad_(True) if bg else None
    r, a, meta = rasterize_gaussians(inputs["means"], inputs["quats"], inputs["scales"], inputs["opacities"],
                                     inputs["colors"], inputs["viewmats"], scene["Ks"], W, H, backgrounds=bgs,
                                     backend=backend, **kw)
    if meta["means2d"].requires_grad:
        meta["means2d"].retain_grad()
    g = torch.Generator().manual_seed(seed)
    loss = (r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum() + \
        (a * torch.randn(a.shape, generator=g, dtype=a.dtype)).sum()
    loss.backward()
    grads = {k: inputs[k].grad for k in KEYS}
    grads["backgrounds"] = bgs.grad if bg else None
    grads["means2d"] = meta["means2d"].grad
    return r.detach(), a.detach(), meta, grads


def assert_same(x, y, dtype, *, fwd=None, grad=None):
    tol = TOL[dtype]
    _close(x[0], y[0], fwd or tol["fwd"], what="render")
    _close(x[1], y[1], fwd or tol["fwd"], what="alphas")
    for k, b in y[3].items():
        a = x[3][k]
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        _close(a, b, grad or tol["grad"], atol=1e-10, what=f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sh_degree,render_mode,per_camera", [
    (None, "RGB", False), (None, "RGB", True), (0, "RGB", False), (1, "RGB", False), (3, "RGB", False),
    (2, "RGB+D", False), (None, "D", False),
])
def test_fused_matches_torch_and_reference_path(dtype, sh_degree, render_mode, per_camera):
    W, H = 37, 29
    scene = make_scene(250, W, H, C=2, seed=11, dtype=dtype, sh_degree=sh_degree, per_camera_colors=per_camera)
    kw = dict(sh_degree=sh_degree, render_mode=render_mode)
    fused = render(scene, W, H, "native", **kw)
    assert fused[2]["backend"] == "native"
    ref = render(scene, W, H, "torch", **kw)
    assert_same(fused, ref, dtype)
    with env(STUDIO_NATIVE_FUSED="0"):
        old = render(scene, W, H, "native", **kw)
    assert_same(fused, old, dtype)
    if dtype == torch.float64:  # float32 radii may differ by one where ceil() meets a rounding difference
        assert torch.equal(fused[2]["radii"], ref[2]["radii"])


def test_expected_depth_mode():
    """ED divides by alpha: where alpha is small the division amplifies float32 rounding, so compare in float64."""
    W, H = 31, 23
    scene = make_scene(200, W, H, C=1, seed=12, dtype=torch.float64)
    assert_same(render(scene, W, H, "native", render_mode="RGB+ED"), render(scene, W, H, "torch", render_mode="RGB+ED"),
                torch.float64)


@pytest.mark.parametrize("simd", ["generic", "scalar"])
def test_simd_builds_agree(simd):
    """The default blend (AVX2 build where the CPU has it), the baseline build of the vector kernels and the
    reference scalar kernels give the same image and gradients (to float32 rounding: the vector exp and the
    summation order differ)."""
    W, H = 45, 38
    scene = make_scene(600, W, H, C=2, seed=13, sh_degree=1)
    a = render(scene, W, H, "native", sh_degree=1)
    with env(STUDIO_NATIVE_SIMD=simd):
        assert native_simd_isa() == simd
        b = render(scene, W, H, "native", sh_degree=1)
    assert_same(a, b, torch.float32)


def test_means2d_tap_receives_the_screen_space_gradient():
    W, H = 33, 27
    scene = make_scene(150, W, H, C=2, seed=14, dtype=torch.float64)
    fused, ref = render(scene, W, H, "native"), render(scene, W, H, "torch")
    assert fused[3]["means2d"] is not None and fused[3]["means2d"].abs().max() > 0
    _close(fused[3]["means2d"], ref[3]["means2d"], 1e-9, what="means2d grad")
    _close(fused[2]["means2d"].detach(), ref[2]["means2d"].detach(), 1e-12, what="means2d values")


def test_no_grad_forward_and_tile_size_invariance():
    W, H = 41, 30
    scene = make_scene(300, W, H, C=1, seed=15)
    with torch.no_grad():
        outs = [rasterize_gaussians(**{k: v for k, v in scene.items()}, width=W, height=H, backend="native",
                                    tile_size=ts)[:2] for ts in (8, 16, 32)]
    for r, a in outs[1:]:
        assert torch.equal(r, outs[0][0]) and torch.equal(a, outs[0][1])


def test_gradcheck_fused_pipeline_float64():
    """Gradients of the whole fused path (projection, SH degree 2, blend) w.r.t. every input, viewmats included."""
    W, H = 10, 8
    scene = make_scene(6, W, H, C=2, seed=16, dtype=torch.float64, sh_degree=2, scale=(0.15, 0.3),
                       opacity=(0.3, 0.8), radius=2.5)
    bgs = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(means, quats, scales, opacities, colors, viewmats, bg):
        r, a, _ = rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, scene["Ks"], W, H,
                                      sh_degree=2, backgrounds=bg, backend="native", tile_size=4)
        return r, a

    leaves = [scene[k].clone().requires_grad_(True) for k in KEYS] + [bgs.clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_deterministic_backward():
    W, H = 40, 31
    scene = make_scene(500, W, H, C=2, seed=17)
    a, b = render(scene, W, H, "native"), render(scene, W, H, "native")
    for k in KEYS:
        assert torch.equal(a[3][k], b[3][k]), k


def test_results_do_not_depend_on_the_thread_count():
    W, H = 48, 40
    scene = make_scene(800, W, H, C=2, seed=18, sh_degree=2)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(render(scene, W, H, "native", sh_degree=2))
    finally:
        torch.set_num_threads(before)
    (r1, a1, _, g1), (r2, a2, _, g2) = outs
    assert torch.equal(r1, r2) and torch.equal(a1, a2)
    for k in KEYS + ("backgrounds", "means2d"):
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "backgrounds"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fused_path_rejects_non_finite_inputs_as_the_python_check_does(dtype, name, bad):
    """The fused path checks finiteness inside its projection loop (the Python pass is skipped there); the error
    names the input exactly as the other backends do, whichever element (here the last: the last chunk, and an
    SH coefficient beyond what sh_degree 1 reads) and camera holds it."""
    scene = make_scene(300, 24, 20, C=2, dtype=dtype, sh_degree=None)
    scene["colors"] = torch.rand(300, 9, 3, dtype=dtype)  # 9 SH coefficients, sh_degree 1 reads the first 4
    scene["backgrounds"] = torch.rand(2, 3, dtype=dtype)
    scene[name] = scene[name].clone()
    scene[name].view(-1)[-1] = bad
    args = dict(scene)
    bgs = args.pop("backgrounds")
    for fused in ("1", "0"):
        for backend in ("native", "torch"):
            with env(STUDIO_NATIVE_FUSED=fused), pytest.raises(ValueError, match=f"^{name} contains NaN or Inf values"):
                rasterize_gaussians(**args, width=24, height=20, sh_degree=1, backgrounds=bgs, backend=backend)
    clean = make_scene(300, 24, 20, C=2, dtype=dtype)  # and a clean scene still renders
    r, a, _ = rasterize_gaussians(**clean, width=24, height=20, backend="native")
    assert torch.isfinite(r).all() and torch.isfinite(a).all()
