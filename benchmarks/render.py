"""Rasterizer speed: ``native`` (our C++/OpenMP kernel) vs the ``torch`` twin, same inputs, same run.

Prints one JSON object. Each case runs in its own subprocess so its peak memory (max RSS above the
process's baseline after setup) is its own. Scene: the ShapeWorld snowman as N surfel Gaussians,
one camera at radius 3.2, 35 deg FoV, RGB, backgrounds on; loss = sum of the image and alphas so
every gradient path runs. Timings are medians over repeats after one warm-up.

The torch twin is the dense reference (``studio.render._gaussians_torch``): every pixel against every
Gaussian, pixels chunked to ~2M pixel-Gaussian pairs, each chunk under ``torch.utils.checkpoint``.

    python benchmarks/render.py               # full grid N in {1k,10k,50k} x {64,128,256}^2
    python benchmarks/render.py --quick       # only the headline case (10k Gaussians, 128^2)
    python benchmarks/render.py --contention  # shared cores: one render alone vs beside a busy process
    python benchmarks/render.py --native-vs-ref  # fused native path vs the reference native path, 1 thread

``--native-vs-ref`` times, in one process on one thread, the native backend as it ships (the fused path: projection,
SH, binning and the SIMD blend in one C++ call each way) against the reference native path it replaced (torch
projection + SH + autograd, then the scalar native blend; ``STUDIO_NATIVE_FUSED=0``), alternating call by call on the
same inputs (10k Gaussians at 128^2 and 50k at 256^2), medians of ``--repeats``; ratios = reference / fused, from CPU
time (``time.process_time``: on a busy machine it is much steadier than wall time) and from wall time. It also
reports Gaussian-pixel pairs per second per core: pairs = the tile-list entries each pixel consumed (its
``last_ids``, what the blend loops iterate over), summed over pixels, divided by the fused forward (backward) CPU
time; and the same with the blend stage alone (the SIMD kernels vs the reference scalar ones, same lists).
Those rates are also given as a fraction of this core's arithmetic limit for the same loop: the blend's float
operations per pair, counted from its source (``BLEND_FLOPS_PER_PAIR``: 41 forward, 77 backward, RGB), into the
core's measured float32 peak (one-thread torch sgemm GFLOP/s, ``core_peak_gflops``); an estimate, not a measured
loop (selects, compares and conversions are not counted, and sgemm uses the widest vectors the CPU has).

``--contention`` times one native render (10k Gaussians, 128^2, 2 threads; forward and forward+backward)
alone and beside one competing CPU-bound process: a pure-Python busy loop (one thread) and a torch job
(matmul loop on 2 threads, like a second studio run). Each measuring process alternates, call by call,
between the kernels' default threads (torch's intra-op OpenMP team) and their own sleeping pool
(``STUDIO_NATIVE_PARALLEL=pool``), so both see the same load; each is run under three wait policies of
torch's OpenMP team (as the environment leaves it, a long spin, passive).
``contention_slowdown`` = forward+backward time beside the torch job / alone, default threads, environment
as given (goal <= 2.5; two equal jobs sharing two cores cost about 2x); the other ratios sit next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(backend: str, n: int, size: int, repeats: int) -> dict:
    import torch

    from studio.cameras import ring_cameras
    from studio.render import rasterize_gaussians, resolve_backend
    from studio.world.objects import get_object

    torch.manual_seed(0)
    g = get_object("snowman").gaussians(n, seed=0)
    cams = ring_cameras(1, elevation_deg=15, radius=3.2, fovy_deg=35, width=size, height=size, start_azimuth_deg=30)
    params = {k: v.clone().requires_grad_(True) for k, v in g.items()}
    V = cams.viewmats.clone().requires_grad_(True)
    bg = torch.ones(1, 3, requires_grad=True)
    used = resolve_backend(backend, torch.device("cpu"))

    def fwd():
        with torch.no_grad():
            return rasterize_gaussians(**params, viewmats=V, Ks=cams.Ks, width=size, height=size, backgrounds=bg,
                                       backend=backend)

    def fwd_bwd():
        img, alpha, _ = rasterize_gaussians(**params, viewmats=V, Ks=cams.Ks, width=size, height=size, backgrounds=bg,
                                            backend=backend)
        (img.sum() + alpha.sum()).backward()

    def timed(fn):
        if backend != "torch":
            fn()  # warm-up (extension load, allocator); the dense twin's minutes-long runs need none
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1000.0

    base = _rss_mb()
    f_ms = timed(fwd)
    fb_ms = timed(fwd_bwd)
    return {"backend": used, "n": n, "size": size, "fwd_ms": round(f_ms, 3), "fwd_bwd_ms": round(fb_ms, 3),
            "peak_rss_above_baseline_mb": round(_rss_mb() - base, 1), "repeats": repeats}


# Floating-point operations per Gaussian-pixel pair of the float32 SIMD blend (cuda_ext/cpu/blend_simd.h), RGB (D=3),
# counted per pixel lane from the source: add / sub / mul / div = 1, a fused multiply-add = 2, compares, selects,
# min / max, int and conversion ops = 0 (approximate counts of those are kept apart, as "other ops"). Forward: dx 1, sigma 7, -sigma 1,
# expf (range reduction 7, degree-7 polynomial 14, scale 1) 22, o*G 1, 1 - alpha 1, T update (double) 1,
# w = alpha*T 1, colour accumulation 3 FMAs 6: 41. Backward: the same conic and expf 32, 1 / (1 - alpha) 2, T / w 2,
# colour dot 6, dL/dalpha 4, suffix sum 2, dL/dsigma 2, the six geometry / opacity terms 15, colour terms 3,
# per-entry accumulation of 9 terms 9: 77.
BLEND_FLOPS_PER_PAIR = {"fwd": 41, "bwd": 77}
BLEND_OTHER_OPS_PER_PAIR = {"fwd": 14, "bwd": 12}


def core_peak_gflops(repeats: int = 5) -> dict:
    """This core's measured float32 arithmetic peak: one-thread torch matmul (oneDNN / MKL sgemm, FMA vectors of the
    widest ISA the CPU has), GFLOP/s = 2 n^3 / CPU time, best of ``repeats`` per size, best size."""
    import torch

    torch.set_num_threads(1)
    best = {}
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        inner = max(1, int(2e9 // (2 * n ** 3)))
        rates = []
        for _ in range(repeats):
            c = time.process_time()
            for _ in range(inner):
                a @ b
            rates.append(2 * n ** 3 * inner / max(time.process_time() - c, 1e-9) / 1e9)
        best[n] = round(max(rates), 2)
    return {"sgemm_gflops_per_core": max(best.values()), "by_size": best}


def run_native_vs_ref(repeats: int) -> dict:
    """Fused native path vs the reference native path, interleaved call by call on one thread (see module doc)."""
    import studio  # noqa: F401
    import torch

    from studio.cameras import ring_cameras
    from studio.render import rasterize_gaussians
    from studio.render._gaussians_ext import _NATIVE, native_simd_isa
    from studio.world.objects import get_object

    torch.set_num_threads(1)
    lib = _NATIVE.load()
    out: dict = {"simd": native_simd_isa(), "threads": torch.get_num_threads(), "repeats": repeats, "cases": {}}
    for n, size in ((10_000, 128), (50_000, 256)):
        torch.manual_seed(0)
        g = get_object("snowman").gaussians(n, seed=0)
        cams = ring_cameras(1, elevation_deg=15, radius=3.2, fovy_deg=35, width=size, height=size,
                            start_azimuth_deg=30)
        params = {k: v.clone().requires_grad_(True) for k, v in g.items()}
        V = cams.viewmats.clone().requires_grad_(True)
        bg = torch.ones(1, 3, requires_grad=True)

        def fwd():
            with torch.no_grad():
                rasterize_gaussians(**params, viewmats=V, Ks=cams.Ks, width=size, height=size, backgrounds=bg,
                                    backend="native")

        def fwd_bwd():
            img, alpha, _ = rasterize_gaussians(**params, viewmats=V, Ks=cams.Ks, width=size, height=size,
                                                backgrounds=bg, backend="native")
            (img.sum() + alpha.sum()).backward()

        # the blend stage alone on the fused path's own lists: SIMD kernels vs the reference scalar kernels
        fargs = (g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], cams.viewmats, cams.Ks,
                 torch.ones(1, 3), size, size, 16, -1, 0, 0.01, 1e10, 0.3)
        keep = True  # keep the forward's tile lists for the backward, as a training step does
        res = lib.render_forward(*fargs, keep)
        render, m2, con, feats, opac, radii, offs, flat, tf, last = (res[0], res[2], res[3], res[6], res[7], res[5],
                                                                      res[8], res[9], res[11], res[12])
        kept = res[13:]
        pairs = int(last.sum())
        g_r, g_a = torch.ones_like(render), torch.ones_like(tf)

        def stage_fwd():
            lib.render_forward(*fargs, keep)

        def stage_bwd():
            lib.render_backward(*fargs[:8], m2, con, feats, opac, radii, offs, flat, tf, last, *kept, g_r, g_a,
                                *fargs[8:])

        cpu: dict[str, list[float]] = {}
        wall: dict[str, list[float]] = {}
        plan = [("ref", {"STUDIO_NATIVE_FUSED": "0"}), ("fused", {"STUDIO_NATIVE_FUSED": "1"})]
        stages = [("simd", {}), ("scalar", {"STUDIO_NATIVE_SIMD": "scalar"})]
        for rep in range(repeats + 1):  # round 0 warms up
            for name, envs in plan:
                os.environ.update(envs)
                for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    c, t = time.process_time(), time.perf_counter()
                    fn()
                    if rep:
                        cpu.setdefault(f"{name}_{kind}", []).append((time.process_time() - c) * 1e3)
                        wall.setdefault(f"{name}_{kind}", []).append((time.perf_counter() - t) * 1e3)
            for name, envs in stages:
                os.environ.update(envs)
                for kind, fn in (("stage_fwd", stage_fwd), ("stage_bwd", stage_bwd)):
                    c = time.process_time()
                    fn()
                    if rep:
                        cpu.setdefault(f"{name}_{kind}", []).append((time.process_time() - c) * 1e3)
                os.environ.pop("STUDIO_NATIVE_SIMD", None)
        os.environ.pop("STUDIO_NATIVE_FUSED", None)
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        mw = {k: statistics.median(v) for k, v in wall.items()}
        fused_bwd = max(mc["fused_fwd_bwd"] - mc["fused_fwd"], 1e-6)
        out["cases"][f"{n // 1000}k_{size}"] = {
            "n": n, "size": size, "pairs": pairs,
            "cpu_ms": {k: round(v, 3) for k, v in mc.items()},
            "wall_ms": {k: round(v, 3) for k, v in mw.items()},
            "ratio_fwd_cpu": round(mc["ref_fwd"] / mc["fused_fwd"], 2),
            "ratio_fwd_bwd_cpu": round(mc["ref_fwd_bwd"] / mc["fused_fwd_bwd"], 2),
            "ratio_fwd_wall": round(mw["ref_fwd"] / mw["fused_fwd"], 2),
            "ratio_fwd_bwd_wall": round(mw["ref_fwd_bwd"] / mw["fused_fwd_bwd"], 2),
            "stage_ratio_fwd_simd_vs_scalar": round(mc["scalar_stage_fwd"] / mc["simd_stage_fwd"], 2),
            "stage_ratio_bwd_simd_vs_scalar": round(mc["scalar_stage_bwd"] / mc["simd_stage_bwd"], 2),
            "pairs_per_s_per_core_fwd": round(pairs / (mc["fused_fwd"] / 1e3)),
            "pairs_per_s_per_core_bwd": round(pairs / (fused_bwd / 1e3)),
        }
    peak = core_peak_gflops()
    g = peak["sgemm_gflops_per_core"] * 1e9
    peak["peak_pairs_per_s_per_core"] = {k: round(g / f) for k, f in BLEND_FLOPS_PER_PAIR.items()}
    peak["blend_flops_per_pair"] = BLEND_FLOPS_PER_PAIR
    peak["blend_other_ops_per_pair"] = BLEND_OTHER_OPS_PER_PAIR
    for case in out["cases"].values():
        pairs, mc = case["pairs"], case["cpu_ms"]
        stage = {"fwd": pairs / (mc["simd_stage_fwd"] / 1e3), "bwd": pairs / (mc["simd_stage_bwd"] / 1e3)}
        case["blend_pairs_per_s_per_core"] = {k: round(v) for k, v in stage.items()}
        case["peak_fraction"] = {
            "fwd": round(case["pairs_per_s_per_core_fwd"] / peak["peak_pairs_per_s_per_core"]["fwd"], 4),
            "bwd": round(case["pairs_per_s_per_core_bwd"] / peak["peak_pairs_per_s_per_core"]["bwd"], 4),
            "blend_fwd": round(stage["fwd"] / peak["peak_pairs_per_s_per_core"]["fwd"], 4),
            "blend_bwd": round(stage["bwd"] / peak["peak_pairs_per_s_per_core"]["bwd"], 4)}
    out["peak"] = peak
    c10, c50 = out["cases"]["10k_128"], out["cases"]["50k_256"]
    out["headline"] = {
        "native_pairs_per_s_per_core_fwd_peak_fraction": c10["peak_fraction"]["fwd"],
        "native_pairs_per_s_per_core_bwd_peak_fraction": c10["peak_fraction"]["bwd"],
        "native_blend_pairs_per_s_per_core_fwd_peak_fraction": c10["peak_fraction"]["blend_fwd"],
        "native_blend_pairs_per_s_per_core_bwd_peak_fraction": c10["peak_fraction"]["blend_bwd"],
        "core_sgemm_gflops": peak["sgemm_gflops_per_core"],
        "native_fwd_bwd_ms_50k_256": c50["cpu_ms"]["fused_fwd_bwd"],
        "native_pairs_per_s_per_core_fwd": c10["pairs_per_s_per_core_fwd"],
        "native_pairs_per_s_per_core_bwd": c10["pairs_per_s_per_core_bwd"],
        "native_vs_ref_fwd_bwd_ratio_10k_128": c10["ratio_fwd_bwd_cpu"],
        "native_vs_ref_fwd_bwd_ratio_50k_256": c50["ratio_fwd_bwd_cpu"],
        "native_vs_ref_fwd_ratio_10k_128": c10["ratio_fwd_cpu"],
        "native_vs_ref_fwd_ratio_50k_256": c50["ratio_fwd_cpu"],
        "native_vs_ref_goal_3x_met": min(c10["ratio_fwd_bwd_cpu"], c50["ratio_fwd_bwd_cpu"]) >= 3.0,
    }
    return out


COMPETITORS = {
    "python_loop": "print('ready', flush=True)\nwhile True:\n    pass\n",
    "torch_job": ("import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\n"
                  "print('ready', flush=True)\nwhile True:\n    a = torch.tanh(a @ a)\n"),
}
MODES = {"omp": None, "pool": "pool"}  # STUDIO_NATIVE_PARALLEL, switched call by call
# how torch's libgomp team waits, per measured process: as this environment (and studio's import) leaves it,
# a long spin (300k iterations, then sleep) and passive (sleep at once)
WAIT_POLICIES = {"as_imported": {}, "spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def run_contention_case(n: int, size: int, repeats: int) -> dict:
    """Median fwd / fwd+bwd ms of one native render per threading mode, the modes alternating call by call."""
    import studio  # noqa: F401  (first: whatever studio sets up before torch loads applies, as for a user)
    import torch

    from studio.cameras import ring_cameras
    from studio.render import rasterize_gaussians
    from studio.world.objects import get_object

    torch.manual_seed(0)
    g = get_object("snowman").gaussians(n, seed=0)
    cams = ring_cameras(1, elevation_deg=15, radius=3.2, fovy_deg=35, width=size, height=size, start_azimuth_deg=30)
    params = {k: v.clone().requires_grad_(True) for k, v in g.items()}
    bg = torch.ones(1, 3, requires_grad=True)

    def fwd():
        with torch.no_grad():
            rasterize_gaussians(**params, viewmats=cams.viewmats, Ks=cams.Ks, width=size, height=size,
                                backgrounds=bg, backend="native")

    def fwd_bwd():
        img, alpha, _ = rasterize_gaussians(**params, viewmats=cams.viewmats, Ks=cams.Ks, width=size, height=size,
                                            backgrounds=bg, backend="native")
        (img.sum() + alpha.sum()).backward()

    times: dict[tuple[str, str], list[float]] = {(m, k): [] for m in MODES for k in ("fwd", "fwd_bwd")}
    cpu: dict[str, float] = {m: 0.0 for m in MODES}
    for rep in range(repeats + 1):  # the first round warms up
        for mode, value in MODES.items():
            if value is None:
                os.environ.pop("STUDIO_NATIVE_PARALLEL", None)
            else:
                os.environ["STUDIO_NATIVE_PARALLEL"] = value
            for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                t, c = time.perf_counter(), time.process_time()
                fn()
                if rep:
                    times[(mode, kind)].append((time.perf_counter() - t) * 1000.0)
                    cpu[mode] += (time.process_time() - c) * 1000.0
    out = {mode: {f"{k}_ms": round(statistics.median(times[(mode, k)]), 3) for k in ("fwd", "fwd_bwd")}
           | {"cpu_ms_per_fwd_plus_fwd_bwd": round(cpu[mode] / repeats, 3)} for mode in MODES}
    return out | {"threads": torch.get_num_threads(), "repeats": repeats}


def contention(n: int = 10_000, size: int = 128, repeats: int = 11, rounds: int = 3) -> dict:
    """One render alone vs beside each competitor, per wait policy of torch's OpenMP runtime; ``rounds`` rounds
    interleaved, medians over rounds."""
    def measure(policy: str) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="2", **WAIT_POLICIES[policy])
        cmd = [sys.executable, __file__, "--contention-case", str(n), str(size), str(repeats)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"contention case failed: {r.stderr.strip()[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    conds = ["alone", *COMPETITORS]
    runs: dict[tuple[str, str], list[dict]] = {(p, c): [] for p in WAIT_POLICIES for c in conds}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for policy in WAIT_POLICIES:
            runs[(policy, "alone")].append(measure(policy))
        for name, code in COMPETITORS.items():
            # the competitor is an ordinary torch / Python process (default OpenMP settings)
            comp = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="2"))
            try:
                if comp.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"competitor {name} did not start")
                time.sleep(0.5)
                for policy in WAIT_POLICIES:
                    runs[(policy, name)].append(measure(policy))
            finally:
                comp.kill()
                comp.wait()
                comp.stdout.close()

    def med(policy: str, cond: str, mode: str, key: str) -> float:
        return round(statistics.median(r[mode][key] for r in runs[(policy, cond)]), 3)

    keys = ("fwd_ms", "fwd_bwd_ms", "cpu_ms_per_fwd_plus_fwd_bwd")
    ms = {p: {c: {m: {k: med(p, c, m, k) for k in keys} for m in MODES} for c in conds} for p in WAIT_POLICIES}
    slow = {p: {c: {m: {k.removesuffix("_ms"): round(ms[p][c][m][k] / ms[p]["alone"][m][k], 2)
                        for k in ("fwd_ms", "fwd_bwd_ms")} for m in MODES} for c in COMPETITORS}
            for p in WAIT_POLICIES}
    head = slow["as_imported"]
    return {
        "contention_slowdown": head["torch_job"]["omp"]["fwd_bwd"],
        # per round (beside the torch job / median alone): with spinning waits the ratio is erratic round to round
        "contention_slowdown_rounds": [round(r["omp"]["fwd_bwd_ms"] / ms["as_imported"]["alone"]["omp"]["fwd_bwd_ms"], 2)
                                       for r in runs[("as_imported", "torch_job")]],
        "contention_slowdown_python_loop": head["python_loop"]["omp"]["fwd_bwd"],
        "contention_slowdown_spin": slow["spin"]["torch_job"]["omp"]["fwd_bwd"],
        "contention_slowdown_passive": slow["passive"]["torch_job"]["omp"]["fwd_bwd"],
        "contention_slowdown_pool": head["torch_job"]["pool"]["fwd_bwd"],
        "contention_goal_2_5_met": max(head[c]["omp"]["fwd_bwd"] for c in COMPETITORS) <= 2.5,
        "alone_fwd_bwd_ms": {p: {m: ms[p]["alone"][m]["fwd_bwd_ms"] for m in MODES} for p in WAIT_POLICIES},
        "ms": ms,
        "slowdown": slow,
        "settings": {
            "n": n, "size": size, "threads": 2, "repeats_per_process": repeats, "rounds": rounds,
            "competitors": {"python_loop": "pure-Python busy loop, 1 thread",
                            "torch_job": "torch 384x384 matmul + tanh loop, 2 threads, default OpenMP settings"},
            "modes": {"omp": "torch's intra-op OpenMP team (default)",
                      "pool": "the kernels' own sleeping pool (STUDIO_NATIVE_PARALLEL=pool)"},
            "wait_policies": {"as_imported": "the environment as given, after `import studio` (headline)",
                              "spin": "GOMP_SPINCOUNT=300000: idle threads spin 300k iterations, then sleep",
                              "passive": "OMP_WAIT_POLICY=PASSIVE: idle threads sleep at once"},
            "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        },
    }


def _native_vs_ref(repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "--native-vs-ref-case", str(repeats)], capture_output=True,
                       text=True, timeout=1800, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"native-vs-ref case failed: {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load_average"] = round(os.getloadavg()[0], 2)
    out["machine"] = f"{platform.machine()} {os.cpu_count()} cpus"
    return out


def _subprocess_case(backend: str, n: int, size: int, repeats: int, timeout: float, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--case", backend, str(n), str(size), str(repeats)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "n": n, "size": size, "error": f"timed out after {timeout:.0f}s"}
    if r.returncode != 0:
        return {"backend": backend, "n": n, "size": size, "error": r.stderr.strip().splitlines()[-1:] or "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the headline case (10k Gaussians, 128^2)")
    ap.add_argument("--case", nargs=4, metavar=("BACKEND", "N", "SIZE", "REPEATS"), help=argparse.SUPPRESS)
    ap.add_argument("--contention", action="store_true",
                    help="only the shared-cores measurement: one render alone vs beside a busy process")
    ap.add_argument("--contention-case", nargs=3, metavar=("N", "SIZE", "REPEATS"), help=argparse.SUPPRESS)
    ap.add_argument("--native-vs-ref", action="store_true",
                    help="only the fused native path vs the reference native path, interleaved on one thread")
    ap.add_argument("--native-vs-ref-case", type=int, metavar="REPEATS", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=9, help="repeats per measurement of --native-vs-ref")
    ap.add_argument("--torch-timeout", type=float, default=900.0, help="seconds before a torch case is abandoned")
    ap.add_argument("--skip-torch-above", type=float, default=2e9,
                    help="skip the dense twin when N*H*W pixel-Gaussian pairs exceed this (it would take an hour)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both backends (default: all cores; use 1 on a shared, busy machine)")
    args = ap.parse_args()
    if args.case:
        b, n, s, r = args.case
        print(json.dumps(run_case(b, int(n), int(s), int(r))))
        return
    if args.contention_case:
        n, s, r = args.contention_case
        print(json.dumps(run_contention_case(int(n), int(s), int(r))))
        return
    if args.native_vs_ref_case:
        print(json.dumps(run_native_vs_ref(args.native_vs_ref_case)))
        return
    if args.native_vs_ref or not args.contention:
        nvr = _native_vs_ref(args.repeats)
        if args.native_vs_ref:
            print(json.dumps({"benchmark": "render", "headline": nvr["headline"], "native_vs_ref": nvr}, indent=2))
            return
    if args.contention:
        c = contention()
        head = {k: v for k, v in c.items() if k.startswith("contention_") or k == "alone_fwd_bwd_ms"}
        print(json.dumps({"benchmark": "render", "headline": head, "contention": c}, indent=2))
        return

    grid = [(10_000, 128)] if args.quick else [(n, s) for n in (1_000, 10_000, 50_000) for s in (64, 128, 256)]
    cases = []
    load_before = os.getloadavg()
    for n, s in grid:
        nat = _subprocess_case("native", n, s, repeats=5, timeout=600, threads=args.threads)
        if n * s * s > args.skip_torch_above:
            ref = {"backend": "torch", "n": n, "size": s,
                   "error": f"skipped: {n * s * s:.1e} pixel-Gaussian pairs > --skip-torch-above {args.skip_torch_above:.0e}"}
        else:
            ref = _subprocess_case("torch", n, s, repeats=1 if n * s * s > 2e8 else 2, timeout=args.torch_timeout,
                                   threads=args.threads)
        row = {"n": n, "size": s, "native": nat, "torch": ref}
        if "error" not in nat and "error" not in ref:
            row["speedup_fwd"] = round(ref["fwd_ms"] / nat["fwd_ms"], 1)
            row["speedup_fwd_bwd"] = round(ref["fwd_bwd_ms"] / nat["fwd_bwd_ms"], 1)
        cases.append(row)
        print("# " + json.dumps(row), file=sys.stderr, flush=True)
    head = next(c for c in cases if c["n"] == 10_000 and c["size"] == 128)
    out = {
        "benchmark": "render",
        "headline": {
            "native_vs_torch_fwd_bwd_speedup_10k_128": head.get("speedup_fwd_bwd"),
            "native_fwd_bwd_ms_10k_128": head["native"].get("fwd_bwd_ms"),
            "torch_fwd_bwd_ms_10k_128": head["torch"].get("fwd_bwd_ms"),
            "native_vs_torch_fwd_speedup_10k_128": head.get("speedup_fwd"),
            "goal_100x_met": (head.get("speedup_fwd_bwd") or 0) >= 100,
            **nvr["headline"],
            # the grid's own (all threads) timing of the 50k / 256^2 case, next to the 1-thread one above
            "native_fwd_bwd_ms_50k_256_grid": next((c["native"].get("fwd_bwd_ms") for c in cases
                                                    if c["n"] == 50_000 and c["size"] == 256), None),
        },
        "native_vs_ref": nvr,
        "cases": cases,
        "settings": {
            "scene": "ShapeWorld snowman surfels, 1 camera, radius 3.2, fovy 35, RGB + backgrounds",
            "torch_twin": "dense, pixel chunks of ~2M pixel-Gaussian pairs under torch.utils.checkpoint",
            "threads": args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
