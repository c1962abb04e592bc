"""The CUDA rasterizer (cuda_ext/cuda, studio.render._gaussians_ext.cuda) without and with a GPU.

Without a GPU:
* the kernels compile standalone with nvcc for sm_80 (skipped without nvcc) and include no torch /
  ATen / pybind headers;
* binding.cpp compiles against torch's headers and every launcher it calls is defined, with the same
  signature, by the nvcc-compiled kernel objects (symbol check);
* the kernel source itself runs on the CPU through cuda_ext/cuda/host_emulation.h (one fiber per CUDA
  thread: real barriers, warp shuffles, shared memory) and matches the dense torch twin, forward and
  gradients, with early termination, several batches per tile, generic channel counts and float64;
* ``studio.render._gaussians_ext.cuda`` reports itself unavailable without raising.

With a GPU (skipped otherwise): backend="cuda" against backend="torch" through rasterize_gaussians,
forward and gradients including viewmats.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_ext import SOURCE_DIR
from studio import ext
from studio.render._gaussians_ext import cuda as _cuda
from studio.render._common import covariance_3d, project_gaussians
from studio.render._gaussians_torch import rasterize_to_pixels_torch

CUDA_DIR = SOURCE_DIR / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
HAS_GPU = torch.cuda.is_available()


def _nvcc() -> str | None:
    return ext.nvcc_path() or (shutil.which("/usr/local/cuda/bin/nvcc"))


def _cuda_include() -> Path | None:
    """CUDA toolkit include dir (cuda_runtime_api.h) for host-only compiles."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    nv = _nvcc()
    if nv:
        cands.append(Path(nv).resolve().parent.parent / "include")
        try:  # wrapper scripts (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc)
            out = subprocess.run([nv, "--dryrun", "--version"], capture_output=True, text=True, timeout=30)
            for m in re.finditer(r"TOP=(\S+)", out.stdout + out.stderr):
                cands.append(Path(m.group(1).strip('"')) / "include")
        except Exception:
            pass
    cands += [Path("/usr/local/cuda/include")]
    for c in cands:
        if (c / "cuda_runtime_api.h").exists():
            return c
    return None


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++") or shutil.which("c++")


# ------------------------------------------------------------------------------------------- static


def test_sources_present():
    names = {p.name for p in KERNEL_SOURCES}
    assert {"binning.cu", "raster_fwd.cu", "raster_bwd.cu"} <= names
    assert (CUDA_DIR / "binding.cpp").exists() and (CUDA_DIR / "raster.h").exists()
    for s in _cuda.sources:
        assert (SOURCE_DIR / s).exists(), s


def test_kernels_include_no_torch_headers():
    bad = re.compile(r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/|pybind11/|Python\.h|caffe2/)', re.M)
    checked = [p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    assert len(checked) >= 5
    for p in checked:
        hits = bad.findall(p.read_text())
        assert not hits, f"{p.name} includes {hits}: kernels must compile without torch"
    # and the binding is the one place that does
    assert "torch/extension.h" in (CUDA_DIR / "binding.cpp").read_text()


def test_module_unavailable_without_gpu_does_not_raise():
    ok = _cuda.available()
    assert isinstance(ok, bool)
    if not HAS_GPU:
        assert ok is False
        assert isinstance(_cuda.load_error(), str) and _cuda.load_error()
        assert _cuda.available() is False  # cached, still no raise


def test_bad_tile_size_rejected():
    x = torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="tile_size"):
        _cuda.rasterize_to_pixels(x, torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.zeros(1, 1),
                                  torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1), 8, 8, tile_size=12)


# ------------------------------------------------------------------------------- nvcc + symbol check


def _torch_include_dirs() -> list[Path]:
    root = Path(torch.__file__).resolve().parent / "include"
    return [root, root / "torch" / "csrc" / "api" / "include"]


class _Job:
    """A compiler run started in the background; result() waits once and caches."""

    def __init__(self, cmd: list[str], output: Path):
        self.output = output
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._res: tuple[int, str] | None = None

    def result(self) -> tuple[int, str]:
        if self._res is None:
            log, _ = self.proc.communicate(timeout=900)
            self._res = (self.proc.returncode, log)
        return self._res


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_compile")


@pytest.fixture(scope="module")
def compile_jobs(build_dir):
    """Start every compile at once (nvcc per .cu for sm_80, binding.cpp against torch's headers, the
    host emulator): {name: _Job}; a missing tool leaves its jobs out."""
    nvcc, cxx, cuda_inc = _nvcc(), _cxx(), _cuda_include()
    jobs: dict[str, _Job] = {}
    if nvcc is not None:
        for src in KERNEL_SOURCES:
            obj = build_dir / (src.stem + ".o")
            jobs[src.name] = _Job([nvcc, "-c", "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80",
                                   f"-I{CUDA_DIR}", str(src), "-o", str(obj)], obj)
    if cxx is not None and cuda_inc is not None and sys.platform.startswith("linux"):  # ucontext fibers
        main = build_dir / "emu_main.cpp"
        main.write_text('#include "host_emulation.h"\n'
                        "int main(int argc, char** argv) { return studio_cuda_emu::cli_main(argc, argv); }\n")
        exe = build_dir / "emu"
        jobs["emulator"] = _Job([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
                                 f"-I{CUDA_DIR}", f"-I{cuda_inc}", str(main), "-o", str(exe)], exe)
        tinc = _torch_include_dirs()
        if nvcc is not None and (tinc[0] / "c10" / "cuda" / "CUDAStream.h").exists():
            incs = [f"-I{CUDA_DIR}"] + [f"-I{p}" for p in tinc]
            if not (tinc[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
                # CPU wheels lack this generated header: a stand-in is enough to compile.
                stub = build_dir / "stub"
                macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
                macros.parent.mkdir(parents=True, exist_ok=True)
                macros.write_text("#pragma once\n")
                incs.append(f"-I{stub}")
            incs += [f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}"]
            obj = build_dir / "binding.o"
            # recent torch headers need C++20 (older ones compile with it too)
            jobs["binding.cpp"] = _Job([cxx, "-std=c++20", "-O0", "-c", "-fPIC", "-w",
                                        "-DTORCH_EXTENSION_NAME=studio_cuda_raster", "-DTORCH_API_INCLUDE_EXTENSION_H",
                                        *incs, str(CUDA_DIR / "binding.cpp"), "-o", str(obj)], obj)
    yield jobs
    for j in jobs.values():
        if j.proc.poll() is None:
            j.proc.kill()


@pytest.fixture(scope="module")
def kernel_objects(compile_jobs):
    """{name.cu: (returncode, log, object path)} of the sm_80 compiles."""
    if not any(k.endswith(".cu") for k in compile_jobs):
        pytest.skip("nvcc not found")
    return {k: (*j.result(), j.output) for k, j in compile_jobs.items() if k.endswith(".cu")}


def test_nvcc_compiles_kernels_sm80(kernel_objects):
    assert set(kernel_objects) == {p.name for p in KERNEL_SOURCES}
    for name, (rc, log, obj) in kernel_objects.items():
        assert rc == 0, f"nvcc failed on {name}:\n{log}"
        assert obj.exists() and obj.stat().st_size > 0


def test_binding_calls_match_kernel_definitions(kernel_objects, compile_jobs):
    """binding.cpp compiles against torch's headers, and each studio_cuda:: launcher it references is
    defined by the kernel objects with the same (mangled) signature."""
    nm = shutil.which("nm")
    if nm is None or "binding.cpp" not in compile_jobs:
        pytest.skip("needs nm, a C++ compiler, the CUDA headers and torch's c10/cuda headers")
    rc, log = compile_jobs["binding.cpp"].result()
    assert rc == 0, f"binding.cpp does not compile:\n{log[-4000:]}"

    def symbols(path: Path, *flags: str) -> set[str]:
        res = subprocess.run([nm, "-C", *flags, str(path)], capture_output=True, text=True, check=True)
        return {ln[ln.index("studio_cuda::"):] for ln in res.stdout.splitlines() if "studio_cuda::" in ln}

    needed = symbols(compile_jobs["binding.cpp"].output, "-u")
    assert len(needed) >= 12, needed
    defined: set[str] = set()
    for _name, (krc, _log, o) in kernel_objects.items():
        assert krc == 0
        defined |= symbols(o, "--defined-only")
    missing = sorted(needed - defined)
    assert not missing, f"launchers referenced by binding.cpp but not defined by the .cu files: {missing}"


# --------------------------------------------------------------------- kernels emulated on the CPU


@pytest.fixture(scope="module")
def emulator(compile_jobs):
    if "emulator" not in compile_jobs:
        pytest.skip("needs Linux, a C++ compiler and the CUDA toolkit headers")
    rc, log = compile_jobs["emulator"].result()
    assert rc == 0, f"host emulation does not compile:\n{log[-4000:]}"
    return compile_jobs["emulator"].output


def _projected_scene(C, N, D, W, H, dtype, seed, dense):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(N, 3, generator=g) - 0.5) * torch.tensor([2.0, 1.2, 1.0])
    quats = torch.randn(N, 4, generator=g)
    scales = torch.exp(torch.rand(N, 3, generator=g) * 1.5 - (2.0 if dense else 3.0))
    opac = torch.rand(N, generator=g)
    opac = opac.clamp(0.5, 1.0) if dense else opac * 0.98
    colors = torch.rand(C, N, D, generator=g)
    vm = torch.eye(4).repeat(C, 1, 1)
    for c in range(C):
        vm[c, 0, 3] = 0.15 * c
        vm[c, 2, 3] = 3.0
    K = torch.tensor([[W * 1.2, 0, W / 2], [0, W * 1.2, H / 2], [0, 0, 1.0]]).repeat(C, 1, 1)
    op_c = opac.to(dtype)[None].expand(C, N).contiguous()
    proj = project_gaussians(means.to(dtype), covariance_3d(quats, scales).to(dtype), op_c, vm.to(dtype),
                             K.to(dtype), W, H, near_plane=0.01, far_plane=1e10, eps2d=0.3)
    return (proj["means2d"].detach(), proj["conics"].detach(), colors.to(dtype), op_c, proj["radii"],
            proj["depths"].detach())


def _run_emulator(exe, d: Path, m, q, col, op, radii, dep, W, H, bg, v_render, v_alphas, ts):
    C, N, D = col.shape
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.txt").write_text(
        f"{C} {N} {D} {W} {H} {ts} {int(bg is not None)} {int(v_alphas is not None)} {m.element_size()}\n")
    inputs = dict(means2d=m, conics=q, colors=col, opacities=op, radii=radii.to(torch.int32), depths=dep,
                  backgrounds=bg, v_render=v_render, v_alphas=v_alphas)
    for name, t in inputs.items():
        if t is not None:
            t.detach().contiguous().numpy().tofile(d / f"{name}.bin")
    r = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"emulator failed ({r.returncode}):\n{r.stderr[-4000:]}"
    fdt = np.float64 if m.dtype == torch.float64 else np.float32

    def rd(name, dt=fdt):
        return torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=dt))

    return dict(
        render=rd("render").reshape(C, H, W, D), alphas=rd("alphas").reshape(C, H, W, 1),
        final_T=rd("final_T").reshape(C, H, W), last_idx=rd("last_idx", np.int32).reshape(C, H, W),
        v_means2d=rd("v_means2d").reshape(C, N, 2), v_conics=rd("v_conics").reshape(C, N, 3),
        v_colors=rd("v_colors").reshape(C, N, D), v_opacities=rd("v_opacities").reshape(C, N),
        tile_ranges=rd("tile_ranges", np.int32).reshape(-1, 2), gauss_ids=rd("gauss_ids", np.int32),
        n_isects=int(r.stdout.split()[-1]),
    )


EMU_CASES = {
    # name: C, N, D, W, H, tile, dtype, background, v_alphas, dense
    "rgb_bg_tile16": (2, 50, 3, 40, 24, 16, torch.float32, True, True, False),
    "one_channel_no_bg": (1, 40, 1, 24, 16, 8, torch.float32, False, False, False),
    "generic_d5_tile8": (1, 40, 5, 24, 16, 8, torch.float32, True, True, False),
    "dense_early_termination": (1, 150, 3, 24, 16, 8, torch.float32, True, True, True),
    "float64_d4": (2, 40, 4, 24, 16, 8, torch.float64, True, True, False),
    "float64_dense_generic_d6": (1, 120, 6, 16, 16, 8, torch.float64, True, False, True),
}


@pytest.mark.parametrize("case", sorted(EMU_CASES))
def test_emulated_kernels_match_torch_twin(emulator, tmp_path, case):
    C, N, D, W, H, ts, dtype, has_bg, has_va, dense = EMU_CASES[case]
    m, q, col, op, radii, dep = _projected_scene(C, N, D, W, H, dtype, seed=len(case), dense=dense)
    assert int((radii > 0).all(-1).sum()) > N // 2  # most Gaussians visible
    g = torch.Generator().manual_seed(7)
    bg = torch.rand(C, D, generator=g).to(dtype) if has_bg else None
    v_render = torch.randn(C, H, W, D, generator=g).to(dtype)
    v_alphas = torch.randn(C, H, W, 1, generator=g).to(dtype) if has_va else None
    out = _run_emulator(emulator, tmp_path / case, m, q, col, op, radii, dep, W, H, bg, v_render, v_alphas, ts)

    leaves = [t.clone().requires_grad_(True) for t in (m, q, col, op)]
    bg_leaf = bg.clone().requires_grad_(True) if has_bg else None
    ref_r, ref_a = rasterize_to_pixels_torch(*leaves, radii, dep, W, H, bg_leaf)
    loss = (ref_r * v_render).sum() + ((ref_a * v_alphas).sum() if has_va else 0)
    grads = torch.autograd.grad(loss, leaves + ([bg_leaf] if has_bg else []))

    f32 = dtype == torch.float32
    atol = 2e-5 if f32 else 1e-12
    rtol = 2e-4 if f32 else 1e-10
    torch.testing.assert_close(out["render"], ref_r.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(out["alphas"], ref_a.detach(), atol=atol, rtol=0)
    names = ["means2d", "conics", "colors", "opacities"]
    for name, ref in zip(names, grads[:4]):
        got = out[f"v_{name}"]
        rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel < rtol, f"{case}: grad {name} rel err {rel:.3g}"
    if has_bg:  # the extension forms v_bg = sum_pixels T_final * v_render in torch from the kernel's T_final
        v_bg = (v_render * out["final_T"][..., None]).sum((1, 2))
        rel = ((v_bg - grads[4]).norm() / grads[4].norm()).item()
        assert rel < rtol, f"{case}: grad backgrounds rel err {rel:.3g}"

    # binning: every tile range lies in the list and holds only that camera's Gaussians, depth-sorted
    n = out["n_isects"]
    assert n == out["gauss_ids"].numel() and n > 0
    rng = out["tile_ranges"]
    assert int(rng.min()) >= 0 and int(rng.max()) <= n and bool((rng[:, 1] >= rng[:, 0]).all())
    tiles_per_cam = ((W + ts - 1) // ts) * ((H + ts - 1) // ts)
    flat_depth = dep.reshape(-1)
    for t in range(rng.shape[0]):
        ids = out["gauss_ids"][rng[t, 0]: rng[t, 1]].long()
        if ids.numel():
            assert bool((ids // N == t // tiles_per_cam).all())
            dd = flat_depth[ids]
            assert bool((dd[1:] >= dd[:-1]).all())
    if dense:
        assert float(out["final_T"].min()) < 2e-4  # early termination was exercised
        assert n > (ts * ts) * rng.shape[0] // 2  # several shared-memory batches per tile on average


# --------------------------------------------------------------------------------------- with a GPU

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def _gpu_scene(n, D, dtype, seed=0, sh_degree=None):
    g = torch.Generator().manual_seed(seed)
    s = dict(
        means=(torch.randn(n, 3, generator=g) * 0.4),
        quats=torch.randn(n, 4, generator=g),
        scales=(torch.rand(n, 3, generator=g) * 0.12 + 0.02),
        opacities=(torch.rand(n, generator=g) * 0.9 + 0.05),
    )
    if sh_degree is None:
        s["colors"] = torch.rand(n, D, generator=g)
    else:
        s["colors"] = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    return {k: v.to("cuda", dtype) for k, v in s.items()}


def _gpu_cams(C, w, h, dtype):
    from studio.cameras import orbit_cameras

    c = orbit_cameras(torch.linspace(0, 30, C), torch.linspace(0, 120, C), 2.5, 50.0, w, h)
    return c.viewmats.to("cuda", dtype), c.Ks.to("cuda", dtype)


GPU_CASES = {
    # name: N, D, C, W, H, dtype, sh_degree, background, render_mode, tile
    "rgb_bg": (300, 3, 2, 64, 48, torch.float32, None, True, "RGB", 16),
    "sh2": (300, 3, 2, 50, 40, torch.float32, 2, False, "RGB", 16),
    "rgbd_generic": (250, 4, 1, 40, 40, torch.float32, None, True, "RGB+D", 16),  # 5 channels -> generic
    "latent8_tile8": (200, 8, 2, 48, 32, torch.float32, None, True, "RGB", 8),
    "float64": (200, 3, 2, 40, 32, torch.float64, None, True, "RGB", 16),
}


@gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_cuda_matches_torch_backend(case):
    from studio.render import rasterize_gaussians

    assert _cuda.available(), f"CUDA extension failed to build/load: {_cuda.load_error()}"
    N, D, C, W, H, dtype, sh, has_bg, mode, ts = GPU_CASES[case]
    s = _gpu_scene(N, D, dtype, sh_degree=sh)
    V, K = _gpu_cams(C, W, H, dtype)
    Dc = 3 if sh is not None else D
    bg = torch.rand(C, Dc, device="cuda", dtype=dtype) if has_bg else None

    def run(backend):
        leaves = {k: v.clone().requires_grad_(True) for k, v in s.items()}
        vm = V.clone().requires_grad_(True)
        bgl = bg.clone().requires_grad_(True) if bg is not None else None
        r, a, meta = rasterize_gaussians(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                         leaves["colors"], vm, K, W, H, sh_degree=sh, backgrounds=bgl,
                                         render_mode=mode, backend=backend, tile_size=ts)
        g = torch.Generator(device="cuda").manual_seed(3)
        wr = torch.randn(r.shape, generator=g, device="cuda", dtype=dtype)
        wa = torch.randn(a.shape, generator=g, device="cuda", dtype=dtype)
        ((r * wr).sum() + (a * wa).sum()).backward()
        grads = {k: v.grad for k, v in leaves.items()}
        grads["viewmats"] = vm.grad
        if bgl is not None:
            grads["backgrounds"] = bgl.grad
        return r.detach(), a.detach(), grads, meta

    r_c, a_c, g_c, meta = run("cuda")
    r_t, a_t, g_t, _ = run("torch")
    assert meta["backend"] == "cuda" and meta["n_isects"] > 0
    f32 = dtype == torch.float32
    atol = 1e-4 if f32 else 1e-10
    torch.testing.assert_close(r_c, r_t, atol=atol, rtol=0)
    torch.testing.assert_close(a_c, a_t, atol=atol, rtol=0)
    tol = 2e-3 if f32 else 1e-8
    for k, ref in g_t.items():
        assert g_c[k] is not None, k
        rel = ((g_c[k] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel < tol, f"{case}: grad {k} rel err {rel:.3g}"


@gpu
def test_cuda_direct_call_no_grad_and_empty():
    assert _cuda.available(), _cuda.load_error()
    C, N, D, W, H = 1, 5, 3, 20, 12
    m = torch.full((C, N, 2), -100.0, device="cuda")
    radii = torch.zeros(C, N, 2, dtype=torch.int32, device="cuda")  # everything culled
    bg = torch.tensor([[0.2, 0.4, 0.6]], device="cuda")
    with torch.no_grad():
        r, a, extra = _cuda.rasterize_to_pixels(m, torch.ones(C, N, 3, device="cuda"), torch.rand(C, N, D, device="cuda"),
                                                torch.rand(C, N, device="cuda"), radii, torch.ones(C, N, device="cuda"),
                                                W, H, bg)
    assert extra["n_isects"] == 0
    torch.testing.assert_close(r, bg[:, None, None, :].expand(C, H, W, D))
    assert float(a.abs().max()) == 0.0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
