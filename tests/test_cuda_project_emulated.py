"""The CUDA projection + SH kernels (cuda_ext/cuda/project_kernels.cuh) without a GPU.

The kernel source runs on the CPU through cuda_ext/cuda/project_emulation.h (host_emulation.h: the launch shapes
of project.cu, one fiber per thread with real barriers for the camera reduction), compiled with g++, and is
compared with the torch reference (studio.render._common.project_gaussians, covariance_3d, eval_sh, the feature
assembly of studio/render/gaussians.py) with autograd, in float64, on random scenes: every forward output
(means2d, conics, depths, radii, feats with the depth channel per depth_mode, per-camera opacities) and every
gradient (means, quats, scales, opacities, colors, viewmats) for SH degrees -1..3, depth modes 0/1/2, shared and
per-camera colours, float32 and float64 kernels.

Tolerance: the kernel computes the same formulas as the reference in the kernel's precision, so its error is
rounding along a chain of a few dozen operations (the longest: the viewmat gradient through the conic
backward, ~60), amplified a little by cancellation (det = ac - b^2 with eps2d = 0.3 keeps it mild). We allow
128 units in the last place of the kernel's float type, relative to each output's largest entry:
2^-16 (1.5e-5) for float32, 2^-45 (2.8e-14) for float64. Upstream gradients are zero where the reference culls
(radii 0), as the blend gives them, except the depths output's (any pair); the kernel skips culled pairs but for
their depth gradient.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.render._common import camera_centers, covariance_3d, eval_sh, project_gaussians

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_compile import CUDA_DIR, _cuda_include, _cxx  # noqa: E402

EPS2D, NEAR, FAR = 0.3, 0.01, 1e10


@pytest.fixture(scope="module")
def project_emulator(tmp_path_factory):
    cxx, cuda_inc = _cxx(), _cuda_include()
    if cxx is None or cuda_inc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux (ucontext), a C++ compiler and the CUDA toolkit headers")
    d = tmp_path_factory.mktemp("cuda_project_emu")
    main = d / "main.cpp"
    main.write_text('#include "project_emulation.h"\n'
                    "int main(int argc, char** argv) { return studio_cuda_emu::project_cli_main(argc, argv); }\n")
    exe = d / "emu"
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
                        f"-I{CUDA_DIR}", f"-I{cuda_inc}", str(main), "-o", str(exe)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"projection emulation does not compile:\n{r.stdout[-4000:]}{r.stderr[-4000:]}"
    return exe


def _scene(C, N, D, sh, per_cam, Kp, W, H, seed):
    """float64 tensors whose values are float32-representable (both kernel precisions see the same inputs)."""
    from studio.cameras import orbit_cameras

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N, 3, generator=g) * 0.5
    quats = torch.randn(N, 4, generator=g)
    quats[0] = 0.0  # zero quaternion: the clamped normalisation
    scales = torch.rand(N, 3, generator=g) * 0.15 + 0.01
    opac = torch.rand(N, generator=g)
    opac[1] = 0.002  # below 1/255: culled
    means[2] = torch.tensor([0.0, 0.0, 40.0])  # far behind / beyond: culled in some cameras
    means[3] = torch.tensor([3.0, -2.5, 0.5])  # off-screen or clamped Jacobian
    cshape = ([C] if per_cam else []) + [N] + ([Kp] if sh >= 0 else []) + [D]
    colors = torch.randn(*cshape, generator=g) * (0.4 if sh >= 0 else 1.0)
    cams = orbit_cameras(torch.linspace(-10, 35, C), torch.linspace(0, 140, C), 2.6, 45.0, W, H)
    f64 = lambda t: t.to(torch.float32).to(torch.float64)  # noqa: E731
    return dict(means=f64(means), quats=f64(quats), scales=f64(scales), opacities=f64(opac), colors=f64(colors),
                viewmats=f64(cams.viewmats), Ks=f64(cams.Ks))


def _reference(s, W, H, sh, depth_mode):
    """Forward outputs of the torch path (gaussians.py's feature assembly) and its leaves."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in s.items() if k != "Ks"}
    means, colors, vm = leaves["means"], leaves["colors"], leaves["viewmats"]
    C, N = vm.shape[0], means.shape[0]
    opac_c = leaves["opacities"][None].expand(C, N)
    proj = project_gaussians(means, covariance_3d(leaves["quats"], leaves["scales"]), opac_c, vm, s["Ks"], W, H,
                             near_plane=NEAR, far_plane=FAR, eps2d=EPS2D)
    D = colors.shape[-1]
    if sh >= 0:
        K = (sh + 1) ** 2
        coeffs = colors[..., :K, :]
        dirs = means[None] - camera_centers(vm)[:, None]
        feats = torch.clamp_min(eval_sh(sh, dirs, coeffs if coeffs.dim() == 4 else coeffs[None]) + 0.5, 0.0)
        feats = feats.expand(C, N, D)
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(C, N, D)
    depth = proj["depths"][..., None]
    if depth_mode == 1:
        feats = torch.cat([feats, depth], -1)
    elif depth_mode == 2:
        feats = depth
    out = dict(means2d=proj["means2d"], conics=proj["conics"], depths=proj["depths"], feats=feats, opac=opac_c)
    return out, proj["radii"], leaves


def _run(exe, d: Path, s, ups, C, N, D, Kp, sh, depth_mode, per_cam, W, H, dtype):
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.txt").write_text(f"{C} {N} {D} {Kp} {sh} {depth_mode} {int(per_cam)} {W} {H} "
                                f"{torch.finfo(dtype).bits // 8} {EPS2D!r} {NEAR!r} {FAR!r}\n")
    for name, t in list(s.items()) + list(ups.items()):
        t.detach().to(dtype).contiguous().numpy().tofile(d / f"{name}.bin")
    r = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"emulator failed ({r.returncode}):\n{r.stderr[-4000:]}"
    fdt = np.float64 if dtype == torch.float64 else np.float32
    Dt = 1 if depth_mode == 2 else D + (depth_mode == 1)

    def rd(name, shape, dt=fdt):
        return torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=dt)).reshape(shape).to(
            torch.int32 if dt == np.int32 else torch.float64)

    return dict(means2d=rd("means2d", (C, N, 2)), conics=rd("conics", (C, N, 3)), depths=rd("depths", (C, N)),
                radii=rd("radii", (C, N, 2), np.int32), feats=rd("feats", (C, N, Dt)), opac=rd("opac", (C, N)),
                means=rd("v_means", (N, 3)), quats=rd("v_quats", (N, 4)), scales=rd("v_scales", (N, 3)),
                opacities=rd("v_opacities", (N,)), colors=rd("v_colors", tuple(s["colors"].shape)),
                viewmats=rd("v_viewmats", (C, 4, 4)))


CASES = {
    # name: C, N, D, sh, per_cam, Kp, depth_mode, W, H
    "features_rgb": (2, 60, 3, -1, False, 1, 0, 48, 40),
    "features_percam_depth": (3, 50, 4, -1, True, 1, 1, 40, 32),
    "depth_only": (2, 40, 3, -1, False, 1, 2, 32, 32),
    "sh0_depth": (2, 50, 3, 0, False, 1, 1, 40, 36),
    "sh1_extra_coeffs": (2, 60, 3, 1, False, 16, 0, 48, 40),
    "sh2_percam": (2, 50, 2, 2, True, 9, 0, 40, 40),
    "sh3_depth": (3, 70, 3, 3, False, 16, 1, 56, 40),
}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_projection_matches_torch(project_emulator, tmp_path, case, dt):
    C, N, D, sh, per_cam, Kp, depth_mode, W, H = CASES[case]
    dtype = DTYPES[dt]
    s = _scene(C, N, D, sh, per_cam, Kp, W, H, seed=len(case))
    ref, ref_radii, leaves = _reference(s, W, H, sh, depth_mode)
    kept = (ref_radii > 0).all(-1)  # [C,N]
    assert N // 3 < int(kept.sum()) < C * N  # most visible, some culled
    g = torch.Generator().manual_seed(11)
    ups = {}
    for name, out in (("v_means2d", "means2d"), ("v_conics", "conics"), ("v_feats", "feats"), ("v_opac", "opac"),
                      ("v_depths", "depths")):
        u = torch.randn(ref[out].shape, generator=g, dtype=torch.float64).to(torch.float32).to(torch.float64)
        # the blend gives culled pairs nothing; the depths output (sorting, meta) may carry a gradient anywhere
        ups[name] = u if name == "v_depths" else u * (kept[..., None] if u.dim() == 3 else kept)
    loss = sum((ref[o] * ups[u]).sum() for u, o in (("v_means2d", "means2d"), ("v_conics", "conics"),
                                                    ("v_feats", "feats"), ("v_opac", "opac"),
                                                    ("v_depths", "depths")))
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    if depth_mode == 2:  # depth only: the colours are not used
        assert grads.pop("colors") is None

    got = _run(project_emulator, tmp_path / case, s, ups, C, N, D, Kp, sh, depth_mode, per_cam, W, H, dtype)
    tol = 128 * torch.finfo(dtype).eps / 2  # 128 ulps (eps is 2 ulps of 1/2..1): 2^-16 float32, 2^-45 float64

    # radii: integers from ceil(sqrt(.)) and culling tests; identical except where the float64 reference's
    # pre-ceil value lies within the kernel's rounding of an integer (reported, then at most 1 apart)
    diff = (got["radii"] != ref_radii).any(-1)
    if dtype == torch.float64:
        assert not bool(diff.any()), f"{case}: radii differ at {diff.nonzero().tolist()}"
    else:
        assert int(diff.sum()) <= max(1, C * N // 200), f"{case}: radii differ at {diff.nonzero().tolist()}"
        assert int((got["radii"] - ref_radii).abs().max()) <= 1 or int(diff.sum()) == 0

    for name in ("means2d", "conics", "depths", "feats", "opac"):
        r = ref[name].detach()
        err = float((got[name] - r).abs().max() / r.abs().max().clamp_min(1e-300))
        assert err <= tol, f"{case}/{dt}: {name} max error {err:.3g} of its largest entry (tol {tol:.3g})"
    for name, r in grads.items():
        assert float(r.abs().max()) > 0, f"{case}: reference gradient of {name} is zero (test does not test)"
        err = float((got[name] - r).abs().max() / r.abs().max())
        assert err <= tol, f"{case}/{dt}: grad {name} max error {err:.3g} of its largest entry (tol {tol:.3g})"
    assert bool((got["viewmats"][:, 3] == 0).all())
    if depth_mode == 2:
        assert float(got["colors"].abs().max()) == 0.0


def test_project_sources_compile_standalone_text():
    """project.cu / project_kernels.cuh use only the CUDA runtime and the shared CPU maths (no torch)."""
    for name in ("project.cu", "project_kernels.cuh", "project_args.h", "project_emulation.h"):
        text = (CUDA_DIR / name).read_text()
        for bad in ("torch/", "ATen/", "pybind11", "c10/"):
            assert bad not in text, f"{name} mentions {bad}"
    assert '#include "../cpu/project.h"' in (CUDA_DIR / "project_kernels.cuh").read_text()


# --------------------------------------------------------------------------------------- with a GPU

GPU_CASES = {
    # name: N, D, C, W, H, dtype, sh_degree, per_cam, background, render_mode
    "rgb_bg": (300, 3, 2, 64, 48, torch.float32, None, False, True, "RGB"),
    "sh3": (300, 3, 2, 50, 40, torch.float32, 3, False, False, "RGB"),
    "sh2_percam_rgbd": (250, 3, 2, 48, 40, torch.float32, 2, True, True, "RGB+D"),
    "depth_only": (200, 3, 1, 40, 32, torch.float32, None, False, False, "ED"),
    "float64_sh1": (200, 3, 2, 40, 32, torch.float64, 1, False, True, "RGB"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_cuda_fused_projection_matches_torch_projection(case, monkeypatch):
    """backend="cuda" with $STUDIO_CUDA_FUSED_PROJECTION=1 (CUDA projection + SH) against =0 (torch projection),
    same CUDA blend: forward and every gradient, viewmats included."""
    from studio.render import rasterize_gaussians
    from studio.render._gaussians_ext import cuda as _cuda

    assert _cuda.available(), f"CUDA extension failed to build/load: {_cuda.load_error()}"
    N, D, C, W, H, dtype, sh, per_cam, has_bg, mode = GPU_CASES[case]
    from studio.cameras import orbit_cameras

    g = torch.Generator().manual_seed(5)
    s = dict(means=torch.randn(N, 3, generator=g) * 0.4, quats=torch.randn(N, 4, generator=g),
             scales=torch.rand(N, 3, generator=g) * 0.12 + 0.02, opacities=torch.rand(N, generator=g) * 0.9 + 0.05)
    lead = [C] if per_cam else []
    s["colors"] = (torch.randn(*lead, N, (sh + 1) ** 2, D, generator=g) * 0.3 if sh is not None
                   else torch.rand(*lead, N, D, generator=g))
    s = {k: v.to("cuda", dtype) for k, v in s.items()}
    cams = orbit_cameras(torch.linspace(0, 30, C), torch.linspace(0, 120, C), 2.5, 50.0, W, H)
    V, K = cams.viewmats.to("cuda", dtype), cams.Ks.to("cuda", dtype)
    bg = torch.rand(C, D, device="cuda", dtype=dtype) if has_bg else None

    def run(flag):
        monkeypatch.setenv("STUDIO_CUDA_FUSED_PROJECTION", flag)
        leaves = {k: v.clone().requires_grad_(True) for k, v in s.items()}
        vm = V.clone().requires_grad_(True)
        r, a, meta = rasterize_gaussians(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                         leaves["colors"], vm, K, W, H, sh_degree=sh, backgrounds=bg,
                                         render_mode=mode, backend="cuda")
        gen = torch.Generator(device="cuda").manual_seed(3)
        loss = (r * torch.randn(r.shape, generator=gen, device="cuda", dtype=dtype)).sum()
        loss = loss + (a * torch.randn(a.shape, generator=gen, device="cuda", dtype=dtype)).sum()
        loss.backward()
        grads = {k: v.grad for k, v in leaves.items()}
        grads["viewmats"] = vm.grad
        return r.detach(), a.detach(), grads, meta

    r_f, a_f, g_f, meta_f = run("1")
    r_t, a_t, g_t, meta_t = run("0")
    assert meta_f["backend"] == "cuda" and meta_f["n_isects"] > 0
    assert int((meta_f["radii"] != meta_t["radii"]).any(-1).sum()) <= 2  # ceil() at an integer: rare, +-1
    f32 = dtype == torch.float32
    atol = 1e-4 if f32 else 1e-10
    torch.testing.assert_close(r_f, r_t, atol=atol, rtol=0)
    torch.testing.assert_close(a_f, a_t, atol=atol, rtol=0)
    tol = 2e-3 if f32 else 1e-8  # the blend's atomics reorder sums; as in test_cuda_compile's GPU test
    for k, ref in g_t.items():
        assert g_f[k] is not None, k
        rel = ((g_f[k] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel < tol, f"{case}: grad {k} rel err {rel:.3g}"


def test_cuda_fused_projection_flag_off_by_default(monkeypatch):
    from studio.render._gaussians_ext import CUDA_SOURCES, cuda_fused_projection_enabled

    monkeypatch.delenv("STUDIO_CUDA_FUSED_PROJECTION", raising=False)
    assert cuda_fused_projection_enabled() is False
    monkeypatch.setenv("STUDIO_CUDA_FUSED_PROJECTION", "1")
    assert cuda_fused_projection_enabled() is True
    assert "cuda/project.cu" in CUDA_SOURCES


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
