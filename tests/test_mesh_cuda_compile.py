"""The CUDA mesh rasterizer (cuda_ext/cuda/mesh_*, studio.render._mesh_ext "cuda") without and with a GPU.

Without a GPU:
* mesh_raster.cu compiles standalone with nvcc for sm_80 (skipped without nvcc) and includes no torch
  headers;
* mesh_binding.cpp compiles against torch's headers and every launcher it calls is defined, with the
  same signature, by the nvcc-compiled object (symbol check);
* the kernel source itself runs on the CPU through cuda_ext/cuda/mesh_emulation.h and reproduces the
  dense torch twin: face ids exactly, barycentrics/depth and vertex gradients to rounding;
* the "cuda" backend reports itself unavailable without raising.

With a GPU (skipped otherwise): backend="cuda" against backend="torch" through rasterize_mesh,
interpolate and antialias, forward and gradients.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cuda_compile import _cuda_include, _cxx, _Job, _nvcc, _torch_include_dirs

from cuda_ext import SOURCE_DIR
from studio.cameras import orbit_cameras
from studio.render import _mesh_ext
from studio.render._mesh_torch import rasterize_screen_torch
from studio.render.mesh import project_vertices

CUDA_DIR = SOURCE_DIR / "cuda"
MESH_FILES = ["mesh_math.h", "mesh_raster.h", "mesh_raster_kernels.cuh", "mesh_raster.cu", "mesh_emulation.h", "emulation_io.h"]
HAS_GPU = torch.cuda.is_available()


def test_sources_present_and_torch_free():
    for s in _mesh_ext.CUDA_SOURCES + _mesh_ext.NATIVE_SOURCES:
        assert (SOURCE_DIR / s).exists(), s
    bad = re.compile(r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/|pybind11/|Python\.h)', re.MULTILINE)
    for name in MESH_FILES:
        hits = bad.findall((CUDA_DIR / name).read_text())
        assert not hits, f"{name} includes {hits}: kernels must compile without torch"
    assert "PYBIND11_MODULE" in (CUDA_DIR / "mesh_binding.cpp").read_text()


def test_cuda_backend_unavailable_without_gpu_does_not_raise():
    ok = _mesh_ext.available("cuda")
    assert isinstance(ok, bool)
    if not HAS_GPU:
        assert ok is False and _mesh_ext.load_error("cuda")
        with pytest.raises(ValueError, match="CUDA tensors"):
            from studio.render import resolve_mesh_backend

            resolve_mesh_backend("cuda", torch.device("cpu"))


# ------------------------------------------------------------------------------- nvcc + symbol check


@pytest.fixture(scope="module")
def compile_jobs(tmp_path_factory):
    """Start every compile at once: {name: _Job}; a missing tool leaves its jobs out."""
    build_dir = tmp_path_factory.mktemp("mesh_cuda_compile")
    nvcc, cxx, cuda_inc = _nvcc(), _cxx(), _cuda_include()
    jobs: dict[str, _Job] = {}
    if nvcc is not None:
        obj = build_dir / "mesh_raster.o"
        jobs["mesh_raster.cu"] = _Job([nvcc, "-c", "-std=c++17", "-O3", "--fmad=false", "-gencode",
                                       "arch=compute_80,code=sm_80", f"-I{CUDA_DIR}", str(CUDA_DIR / "mesh_raster.cu"),
                                       "-o", str(obj)], obj)
    if cxx is not None and cuda_inc is not None:
        main = build_dir / "emu_main.cpp"
        main.write_text('#include "mesh_emulation.h"\n'
                        "int main(int argc, char** argv) { return studio_mesh_emu::cli_main(argc, argv); }\n")
        exe = build_dir / "mesh_emu"
        jobs["emulator"] = _Job([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
                                 f"-I{CUDA_DIR}", f"-I{cuda_inc}", str(main), "-o", str(exe)], exe)
        tinc = _torch_include_dirs()
        if nvcc is not None and (tinc[0] / "c10" / "cuda" / "CUDAStream.h").exists():
            incs = [f"-I{CUDA_DIR}"] + [f"-I{p}" for p in tinc]
            if not (tinc[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
                stub = build_dir / "stub"  # CPU wheels lack this generated header
                macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
                macros.parent.mkdir(parents=True, exist_ok=True)
                macros.write_text("#pragma once\n")
                incs.append(f"-I{stub}")
            incs += [f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}"]
            obj = build_dir / "mesh_binding.o"
            jobs["mesh_binding.cpp"] = _Job([cxx, "-std=c++20", "-O0", "-c", "-fPIC", "-w",
                                             "-DTORCH_EXTENSION_NAME=studio_cuda_mesh",
                                             "-DTORCH_API_INCLUDE_EXTENSION_H", *incs,
                                             str(CUDA_DIR / "mesh_binding.cpp"), "-o", str(obj)], obj)
    yield jobs
    for j in jobs.values():
        if j.proc.poll() is None:
            j.proc.kill()


def test_nvcc_compiles_mesh_kernels_sm80(compile_jobs):
    if "mesh_raster.cu" not in compile_jobs:
        pytest.skip("nvcc not found")
    rc, log = compile_jobs["mesh_raster.cu"].result()
    assert rc == 0, f"nvcc failed on mesh_raster.cu:\n{log[-4000:]}"
    assert compile_jobs["mesh_raster.cu"].output.stat().st_size > 0


def test_mesh_binding_calls_match_kernel_definitions(compile_jobs):
    nm = shutil.which("nm")
    if nm is None or "mesh_binding.cpp" not in compile_jobs:
        pytest.skip("needs nm, nvcc, a C++ compiler, the CUDA headers and torch's c10/cuda headers")
    rc, log = compile_jobs["mesh_binding.cpp"].result()
    assert rc == 0, f"mesh_binding.cpp does not compile:\n{log[-4000:]}"
    krc, klog = compile_jobs["mesh_raster.cu"].result()
    assert krc == 0, klog[-4000:]

    def symbols(path: Path, *flags: str) -> set[str]:
        res = subprocess.run([nm, "-C", *flags, str(path)], capture_output=True, text=True, check=True)
        return {ln[ln.index("studio_mesh_cuda::"):] for ln in res.stdout.splitlines() if "studio_mesh_cuda::" in ln}

    needed = symbols(compile_jobs["mesh_binding.cpp"].output, "-u")
    assert len(needed) == 10, needed  # 5 launchers x {float, double}
    defined = symbols(compile_jobs["mesh_raster.cu"].output, "--defined-only")
    missing = sorted(needed - defined)
    assert not missing, f"launchers referenced by mesh_binding.cpp but not defined by mesh_raster.cu: {missing}"


# --------------------------------------------------------------------- kernels emulated on the CPU


@pytest.fixture(scope="module")
def emulator(compile_jobs):
    if "emulator" not in compile_jobs:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers")
    rc, log = compile_jobs["emulator"].result()
    assert rc == 0, f"mesh host emulation does not compile:\n{log[-4000:]}"
    return compile_jobs["emulator"].output


def _run_emulator(exe, d: Path, vs, faces, W, H, near, far, g_bary, g_depth):
    C, V, _ = vs.shape
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.txt").write_text(f"{C} {V} {faces.shape[0]} {W} {H} {near!r} {far!r} {vs.element_size()}\n")
    vs.detach().contiguous().numpy().tofile(d / "verts_screen.bin")
    faces.to(torch.int32).contiguous().numpy().tofile(d / "faces.bin")
    g_bary.contiguous().numpy().tofile(d / "g_bary.bin")
    g_depth.contiguous().numpy().tofile(d / "g_depth.bin")
    r = subprocess.run([str(exe), str(d)], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"emulator failed ({r.returncode}):\n{r.stderr[-4000:]}"
    fdt = np.float64 if vs.dtype == torch.float64 else np.float32

    def rd(name, dt=fdt):
        return torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=dt))

    return {"face_id": rd("face_id", np.int32).reshape(C, H, W), "bary": rd("bary").reshape(C, H, W, 3),
            "depth": rd("depth").reshape(C, H, W), "g_verts": rd("g_verts").reshape(C, V, 3),
            "n_pairs": int(r.stdout.split()[-1])}


def _cube_scene(dtype, W, H):
    v = torch.tensor([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)], dtype=dtype)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = torch.tensor([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    cams = orbit_cameras(torch.tensor([25.0, -15.0]), torch.tensor([35.0, 210.0]), 2.6, 45.0, W, H)
    return v, faces, cams.viewmats.to(dtype), cams.Ks.to(dtype)


def _soup_scene(dtype, W, H, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.cat([(torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 1.2,
                        1.5 + torch.rand(n, 1, generator=g, dtype=torch.float64) * 2], -1)
    verts = (centre[:, None, :] + torch.randn(n, 3, 3, generator=g, dtype=torch.float64) * 0.3).reshape(-1, 3)
    verts[:3, 2] = torch.tensor([0.005, 1.0, 1.2], dtype=torch.float64)  # crosses the near plane: dropped
    K = torch.tensor([[[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]]], dtype=torch.float64)
    return verts.to(dtype), torch.arange(3 * n).reshape(n, 3), torch.eye(4, dtype=dtype)[None], K.to(dtype)


EMU_CASES = {
    # name: scene, dtype, W, H, far
    "cube_two_cameras_f32": ("cube", torch.float32, 40, 32, 100.0),
    "cube_two_cameras_f64": ("cube", torch.float64, 37, 29, 100.0),
    "soup_f64_far_plane": ("soup", torch.float64, 33, 27, 3.0),
    "soup_f32": ("soup", torch.float32, 30, 22, 100.0),
}


@pytest.mark.parametrize("case", sorted(EMU_CASES))
def test_emulated_mesh_kernels_match_torch_twin(emulator, tmp_path, case):
    scene, dtype, W, H, far = EMU_CASES[case]
    verts, faces, Vm, K = (_cube_scene if scene == "cube" else _soup_scene)(dtype, W, H)
    near = 0.01
    vs = project_vertices(verts, Vm, K, near).detach()
    C = vs.shape[0]
    g = torch.Generator().manual_seed(4)
    g_bary = torch.randn(C, H, W, 3, generator=g, dtype=dtype)
    g_depth = torch.randn(C, H, W, generator=g, dtype=dtype)
    out = _run_emulator(emulator, tmp_path / case, vs, faces, W, H, near, far, g_bary, g_depth)

    leaf = vs.clone().requires_grad_(True)
    fid, bary, depth = rasterize_screen_torch(leaf, faces, W, H, near, far)
    (g_ref,) = torch.autograd.grad((bary * g_bary).sum() + (depth * g_depth).sum(), leaf)
    assert torch.equal(out["face_id"].long(), fid)  # same rule, same rounding: identical visibility
    assert int((fid >= 0).sum()) > W * H * C // 8 and out["n_pairs"] > 0
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out["bary"], bary.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(out["depth"], depth.detach(), atol=atol, rtol=0)
    rel = ((out["g_verts"] - g_ref).norm() / g_ref.norm()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 1e-10), f"{case}: grad rel err {rel:.3g}"
    if scene == "soup":
        assert not bool((fid == 0).any())  # the face crossing the near plane is dropped


# --------------------------------------------------------------------------------------- with a GPU

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_torch_backend(dtype):
    from studio.render import antialias, interpolate, rasterize_mesh

    assert _mesh_ext.available("cuda"), f"CUDA mesh extension failed to build/load: {_mesh_ext.load_error('cuda')}"
    W, H = 48, 40
    verts, faces, Vm, K = _cube_scene(dtype, W, H)
    verts, faces, Vm, K = verts.cuda(), faces.cuda(), Vm.cuda(), K.cuda()
    attrs = torch.rand(verts.shape[0], 3, device="cuda", dtype=dtype)

    def run(backend):
        v = verts.clone().requires_grad_(True)
        a = attrs.clone().requires_grad_(True)
        r = rasterize_mesh(v, faces, Vm, K, W, H, backend=backend)
        img = antialias(interpolate(a, r, faces), r, faces)
        gen = torch.Generator(device="cuda").manual_seed(3)
        w = torch.randn(img.shape, generator=gen, device="cuda", dtype=dtype)
        ((img * w).sum() + r["depth"].sum()).backward()
        return r, img.detach(), v.grad, a.grad

    rc, ic, gvc, gac = run("cuda")
    rt, it, gvt, gat = run("torch")
    assert rc["backend"] == "cuda"
    assert torch.equal(rc["face_id"], rt["face_id"])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(rc["bary"], rt["bary"], atol=tol, rtol=0)
    torch.testing.assert_close(ic, it, atol=tol, rtol=0)
    for got, ref in ((gvc, gvt), (gac, gat)):
        assert ((got - ref).norm() / ref.norm()).item() < (1e-4 if dtype == torch.float32 else 1e-10)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
