"""GPU check of the CUDA rasterizer: build, parity against the torch twin (and gsplat if importable),
timings. Prints ONE JSON object and writes it to ``--out`` (default ``${OUT:-.}/gpu_check.json``).

Every section runs in its own subprocess (``--section NAME``) with a timeout, so a crash, a CUDA
fault that poisons the context, or a hang in one section is recorded as that section's error and
the others still run. Whole run: well under 5 minutes on an H200 once the extension is built.

    python benchmarks/gpu_check.py                 # all sections
    python benchmarks/gpu_check.py --section parity_twin
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ["env", "build", "parity_twin", "parity_gsplat", "timings"]

# --cpu-smoke (for checking this script on a machine without a GPU): CPU tensors, the torch backend in
# place of cuda, tiny sizes. Numbers are meaningless then; only the plumbing is exercised.
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
FAST = "torch" if SMOKE else "cuda"
SECTION_TIMEOUT_S = {"env": 120, "build": 900, "parity_twin": 240, "parity_gsplat": 120, "timings": 240}


# --------------------------------------------------------------------------------------------- scenes


def make_scene(n, *, D=3, sh_degree=None, dtype=None, seed=0, scale_range=(0.02, 0.14), opacity_range=(0.05, 0.95),
               spread=0.4, device=None):
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    s = dict(
        means=torch.randn(n, 3, generator=g) * spread,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.exp(torch.rand(n, 3, generator=g) * (hi - lo) + lo),
        opacities=torch.rand(n, generator=g) * (opacity_range[1] - opacity_range[0]) + opacity_range[0],
    )
    if sh_degree is None:
        s["colors"] = torch.rand(n, D, generator=g)
    else:
        s["colors"] = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    return {k: v.to(device or DEV, dtype) for k, v in s.items()}


def make_cams(C, w, h, dtype=None, device=None, radius=2.5, fov=50.0):
    import torch

    from studio.cameras import orbit_cameras

    c = orbit_cameras(torch.linspace(0, 30, C), torch.linspace(0, 120, C), radius, fov, w, h)
    device = device or DEV
    return c.viewmats.to(device, dtype or torch.float32), c.Ks.to(device, dtype or torch.float32)


def render_with_grads(backend, scene, V, K, W, H, *, sh_degree=None, bg=None, render_mode="RGB", tile_size=16,
                      seed=3):
    """Render and back-propagate a fixed random linear loss; returns (render, alphas, grads, meta)."""
    import torch

    from studio.render import rasterize_gaussians

    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
    vm = V.clone().requires_grad_(True)
    bgl = bg.clone().requires_grad_(True) if bg is not None else None
    r, a, meta = rasterize_gaussians(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                     leaves["colors"], vm, K, W, H, sh_degree=sh_degree, backgrounds=bgl,
                                     render_mode=render_mode, backend=backend, tile_size=tile_size)
    g = torch.Generator(device=r.device.type).manual_seed(seed)
    wr = torch.randn(r.shape, generator=g, device=r.device, dtype=r.dtype)
    wa = torch.randn(a.shape, generator=g, device=r.device, dtype=r.dtype)
    ((r * wr).sum() + (a * wa).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads["viewmats"] = vm.grad
    if bgl is not None:
        grads["backgrounds"] = bgl.grad
    return r.detach(), a.detach(), grads, meta


def rel_err(a, b):
    if a is None or b is None:
        return None
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


# ------------------------------------------------------------------------------------------- sections


def section_env():
    import torch

    from studio import ext

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvcc": ext.nvcc_path(),
        "ext_cache_dir": str(ext.cache_dir()),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    if info["nvcc"]:
        try:
            out = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True, timeout=60).stdout
            info["nvcc_version"] = out.strip().splitlines()[-1]
        except Exception as e:  # noqa: BLE001
            info["nvcc_version"] = f"error: {e}"
    try:
        import gsplat

        info["gsplat"] = getattr(gsplat, "__version__", "importable")
    except Exception as e:  # noqa: BLE001
        info["gsplat"] = f"not importable ({type(e).__name__})"
    return info


def section_build():
    from studio.render._gaussians_ext import cuda as _cuda

    t0 = time.time()
    ok = _cuda.available()
    return {"available": ok, "load_error": _cuda.load_error(), "seconds": round(time.time() - t0, 1)}


TWIN_SCENES = [
    # name, N, C, W, H, kwargs
    ("rgb_bg", 2000, 2, 128, 96, dict(D=3, bg=True)),
    ("sh3", 1500, 2, 96, 96, dict(sh_degree=3)),
    ("rgbd_mode", 1000, 1, 80, 64, dict(D=3, bg=True, render_mode="RGB+D")),
    ("latent16_generic", 1000, 2, 64, 64, dict(D=16, bg=True)),
    ("tile8", 1500, 2, 96, 64, dict(D=3, tile_size=8)),
    ("dense_early_termination", 3000, 1, 96, 96,
     dict(D=3, scale_range=(0.05, 0.25), opacity_range=(0.6, 1.0))),
    ("float64", 800, 2, 64, 48, dict(D=3, bg=True, dtype="float64")),
]


def section_parity_twin():
    import torch

    from studio.render._gaussians_ext import cuda as _cuda

    if not SMOKE and not _cuda.available():
        return {"error": f"cuda backend unavailable: {_cuda.load_error()}"}
    out = {}
    scenes = [(n, max(20, N // 20), C, 24, 16, kw) for n, N, C, W, H, kw in TWIN_SCENES] if SMOKE else TWIN_SCENES
    for name, N, C, W, H, kw in scenes:
        try:
            kw = dict(kw)
            dtype = torch.float64 if kw.pop("dtype", "float32") == "float64" else torch.float32
            sh = kw.pop("sh_degree", None)
            D = kw.pop("D", 3)
            has_bg = kw.pop("bg", False)
            mode = kw.pop("render_mode", "RGB")
            ts = kw.pop("tile_size", 16)
            scene = make_scene(N, D=D, sh_degree=sh, dtype=dtype, **kw)
            V, K = make_cams(C, W, H, dtype)
            Dc = 3 if sh is not None else D
            bg = torch.rand(C, Dc, device=DEV, dtype=dtype) if has_bg else None
            rc, ac, gc, meta = render_with_grads(FAST, scene, V, K, W, H, sh_degree=sh, bg=bg, render_mode=mode,
                                                 tile_size=ts)
            rt, at, gt, _ = render_with_grads("torch", scene, V, K, W, H, sh_degree=sh, bg=bg, render_mode=mode,
                                              tile_size=ts)
            res = {
                "dtype": str(dtype).replace("torch.", ""), "N": N, "C": C, "W": W, "H": H, "tile_size": ts,
                "render_mode": mode, "n_isects": meta.get("n_isects"),
                "fwd_max_abs_err": float((rc - rt).abs().max()),
                "alpha_max_abs_err": float((ac - at).abs().max()),
                "min_final_T": float((1 - at).min()),
                "grad_rel_err": {k: rel_err(gc.get(k), gt[k]) for k in gt},
            }
            f32 = dtype == torch.float32
            fwd_tol, grad_tol = (1e-4, 2e-3) if f32 else (1e-10, 1e-8)
            res["pass"] = bool(res["fwd_max_abs_err"] < fwd_tol and res["alpha_max_abs_err"] < fwd_tol
                               and all(v is not None and v < grad_tol for v in res["grad_rel_err"].values()))
            out[name] = res
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        _empty_cache()
    out["all_pass"] = all(v.get("pass", False) for v in out.values() if isinstance(v, dict))
    return out


def section_parity_gsplat():
    import torch

    try:
        import gsplat  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"gsplat not importable ({type(e).__name__}: {e})"}
    from studio.render._gaussians_ext import cuda as _cuda

    if not SMOKE and not _cuda.available():
        return {"error": f"cuda backend unavailable: {_cuda.load_error()}"}
    out = {"note": "gsplat bins with a 3-sigma box (ours: opacity-aware radii) and differs in small details; "
                   "small differences are expected"}
    for name, N, C, W, H, sh in [("rgb", 5000, 2, 128, 128, None), ("sh3", 5000, 1, 128, 96, 3)]:
        try:
            scene = make_scene(N, sh_degree=sh)
            V, K = make_cams(C, W, H)
            rc, ac, gc, _ = render_with_grads(FAST, scene, V, K, W, H, sh_degree=sh)
            rg, ag, gg, _ = render_with_grads("gsplat", scene, V, K, W, H, sh_degree=sh)
            out[name] = {
                "fwd_max_abs_err": float((rc - rg).abs().max()),
                "fwd_mean_abs_err": float((rc - rg).abs().mean()),
                "alpha_max_abs_err": float((ac - ag).abs().max()),
                "grad_rel_err": {k: rel_err(gc.get(k), gg.get(k)) for k in gc},
            }
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    return out


def _sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache():
    import torch

    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _time_ms(fn, warmup=2, reps=5, budget_s=20.0):
    """Median / min wall time per call in ms, synchronising the GPU around every call."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    t_start = time.time()
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.time() - t_start > budget_s:
            break
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 3), "min_ms": round(times[0], 3), "reps": len(times)}


def section_timings():
    import torch

    from studio.render import rasterize_gaussians
    from studio.render._gaussians_ext import cuda as _cuda
    from studio.render._common import covariance_3d, project_gaussians
    from studio.render._gaussians_torch import rasterize_to_pixels_torch

    if SMOKE:
        def blend(*a, tile_size=16):
            return (*rasterize_to_pixels_torch(*a), {})
    else:
        blend = _cuda.rasterize_to_pixels

    if not SMOKE and not _cuda.available():
        return {"error": f"cuda backend unavailable: {_cuda.load_error()}"}
    out = {"note": "full = projection + SH-free colours + binning + blend (rasterize_gaussians, backend=cuda); "
                   "blend = _cuda.rasterize_to_pixels only (binning + blend) on precomputed projections; "
                   "one camera, float32, D=3, wall time with torch.cuda.synchronize around each call"}
    sizes, resolutions = ((200, 400), (32, 48)) if SMOKE else ((10_000, 100_000, 1_000_000), (256, 512))
    for n in sizes:
        # Smaller splats as N grows keep the coverage (and intersections per pixel) realistic.
        s_hi = 0.05 * (10_000 / n) ** (1 / 3) * 2
        scene = make_scene(n, scale_range=(s_hi / 6, s_hi), spread=0.5, seed=1)
        for res in resolutions:
            key = f"N{n}_{res}px"
            try:
                V, K = make_cams(1, res, res)
                leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}

                def fwd():
                    with torch.no_grad():
                        return rasterize_gaussians(scene["means"], scene["quats"], scene["scales"],
                                                   scene["opacities"], scene["colors"], V, K, res, res,
                                                   backend=FAST)

                def fwd_bwd():
                    r, a, _ = rasterize_gaussians(leaves["means"], leaves["quats"], leaves["scales"],
                                                  leaves["opacities"], leaves["colors"], V, K, res, res,
                                                  backend=FAST)
                    (r.sum() + a.sum()).backward()

                _, _, meta = fwd()
                with torch.no_grad():
                    proj = project_gaussians(scene["means"], covariance_3d(scene["quats"], scene["scales"]),
                                             scene["opacities"][None], V, K, res, res, near_plane=0.01,
                                             far_plane=1e10, eps2d=0.3)
                blend_args = (proj["means2d"], proj["conics"], scene["colors"][None].contiguous(),
                              scene["opacities"][None].contiguous(), proj["radii"], proj["depths"], res, res, None)
                m2 = proj["means2d"].clone().requires_grad_(True)
                cols = scene["colors"][None].contiguous().requires_grad_(True)

                def blend_fwd():
                    with torch.no_grad():
                        return blend(*blend_args)

                def blend_fwd_bwd():
                    r, a, _ = blend(m2, proj["conics"], cols, blend_args[3], proj["radii"], proj["depths"], res, res,
                                    None)
                    (r.sum() + a.sum()).backward()

                out[key] = {
                    "n_visible": int((proj["radii"] > 0).all(-1).sum()),
                    "n_isects": meta.get("n_isects"),
                    "full_fwd": _time_ms(fwd),
                    "full_fwd_bwd": _time_ms(fwd_bwd),
                    "blend_fwd": _time_ms(blend_fwd),
                    "blend_fwd_bwd": _time_ms(blend_fwd_bwd),
                    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else None,
                }
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            _empty_cache()
        del scene
    return out


FUNCS = {
    "env": section_env,
    "build": section_build,
    "parity_twin": section_parity_twin,
    "parity_gsplat": section_parity_gsplat,
    "timings": section_timings,
}


# ---------------------------------------------------------------------------------------------- driver


def run_section_inline(name):
    t0 = time.time()
    try:
        res = FUNCS[name]()
    except Exception as e:  # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(res, dict):
        res.setdefault("seconds", round(time.time() - t0, 1))
    return res


def run_section_subprocess(name, timeout_s):
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"error": f"timed out after {timeout_s}s",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    marker = "@@GPU_CHECK_SECTION@@"
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(marker):
            try:
                return json.loads(line[len(marker):])
            except Exception as e:  # noqa: BLE001
                return {"error": f"bad section output: {e}"}
    return {"error": f"section process exited with {p.returncode} without a result",
            "stderr_tail": p.stderr[-3000:], "seconds": round(time.time() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=SECTIONS, help="run one section in this process (internal)")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--inline", action="store_true", help="run sections in this process (no isolation)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="exercise the script on CPU with the torch backend and tiny sizes (no GPU needed)")
    args = ap.parse_args(argv)
    if args.cpu_smoke and not SMOKE:  # re-exec so that section subprocesses inherit the mode
        env = dict(os.environ, GPU_CHECK_SMOKE="1")
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--cpu-smoke"]
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *rest], env=env)

    if args.section:
        res = run_section_inline(args.section)
        print("@@GPU_CHECK_SECTION@@" + json.dumps(res, default=str), flush=True)
        return 0

    t0 = time.time()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in args.only or SECTIONS:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        if args.inline:
            report[name] = run_section_inline(name)
        else:
            report[name] = run_section_subprocess(name, SECTION_TIMEOUT_S[name])
        print(f"[gpu_check] {name} done ({time.time() - t0:.0f}s total)", file=sys.stderr, flush=True)
        # Save after every section so a killed run still leaves what it had.
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        except Exception as e:  # noqa: BLE001
            print(f"[gpu_check] could not write {args.out}: {e}", file=sys.stderr)
    report["total_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(report, default=str)
    try:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    except Exception:  # noqa: BLE001
        pass
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
