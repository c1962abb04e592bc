"""Text-to-3D quality and speed on ShapeWorld, against ground truth, fixed seeds. Prints one JSON object.

Every run keeps its training cameras out of the held-out azimuth sector (``TextTo3DConfig.heldout_azimuth``,
60-120 deg by default) and is scored at 8 views inside it. Runs, per prompt (64x64 renders):
  * ``sds_unet@CFG``   SDS with the tiny trained ``shapeworld-unet`` teacher (view prompts, no camera), per CFG
  * ``vsd_unet@CFG``   VSD (LoRA variational score on ``shapeworld-unet``), per CFG
  * ``sds_exact_nocam`` the exact ShapeWorld teacher without the camera (a ring-of-views prior: Janus-prone)
  * ``sds_exact_reconstruction`` the exact teacher *with* the camera: its prior is one Gaussian centred on the
    ground-truth render of each training view, so SDS is almost noise-free L2 fitting to those renders. A
    **reconstruction upper bound**, never a generation result.
The headline is generation: ``sds_unet_psnr_heldout`` and ``vsd_unet_psnr_heldout`` at each method's best CFG of
the sweep. Each row reports PSNR / SSIM / IoU / Chamfer / saturation gap / Janus, wall seconds and it/s.

    python benchmarks/text_to_3d.py            # 6 prompts, CFG sweeps of 3
    python benchmarks/text_to_3d.py --quick    # one prompt, 200 steps, CFG sweeps of 2 (~15 min on a busy CPU)
    python benchmarks/text_to_3d.py --profile  # per-step profile of SDS (shapeworld-exact, shapeworld-unet)
    python benchmarks/text_to_3d.py --contention  # one short prompt alone vs beside a competing busy process

``--profile`` runs SDS on the first prompt for ``--profile-steps`` steps (default 40) with each teacher at its
default settings (shapeworld-exact with the camera, shapeworld-unet at its default CFG) under
``studio.train.profile.StepProfiler`` and prints the mean milliseconds per step of teacher forward, render
forward, render backward, loss/SDS, cameras, optimizer step, densification, previews and the rest, in wall time
and in CPU time (``time.process_time``; steadier on a busy machine), the first 2 steps left out.
``--contention`` runs SDS with shapeworld-exact on the first prompt (``--contention-steps``, default 60) in a fresh
process, 2 threads, alone and beside one competing CPU-bound torch job (2 threads, as ``benchmarks/render.py
--contention``), alternating, ``--contention-rounds`` rounds (default 2); the headline is the median training
seconds beside the job / alone. The load average is reported with each run: on a shared machine "alone" is not
quiet.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROMPTS = ["a red cube", "a blue ball", "a green torus", "a snowman with an orange carrot nose",
           "a black penguin with a white belly and an orange beak", "a white box with a red front and a blue back"]


def run(method: str, prompt: str, teacher: str, steps: int, out: Path, camera: bool = True, seed: int = 0,
        guidance: float | None = None) -> dict:
    from methods.registry import get_method
    from methods import run as run_method

    cls = get_method(method)
    cfg = cls.Config(prompt=prompt, teacher=teacher, steps=steps, seed=seed, turntable_frames=8, turntable_size=64,
                     guidance_scale=guidance)
    cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, camera_conditioning=camera))
    t0 = time.perf_counter()
    m = run_method(cfg, method, out, progress=False)
    wall = time.perf_counter() - t0
    gt = m.get("ground_truth") or {}
    return {"prompt": prompt, "wall_seconds": round(wall, 1), "train_seconds": m["train_seconds"], "it_s": m["it_s"],
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in gt.items()
               if k in ("psnr", "ssim", "iou", "chamfer", "saturation_gap", "janus")}}


def profile_runs(steps: int, prompt: str, out: Path) -> dict:
    """Per-step profile (``StepProfiler``) of SDS with each ShapeWorld teacher at its defaults, wall and CPU clock."""
    from studio.train.profile import StepProfiler, profiling

    res = {}
    for name, teacher, cam in (("sds_exact_reconstruction", "shapeworld-exact", True),
                               ("sds_unet", "shapeworld-unet", True)):
        res[name] = {}
        for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
            prof = StepProfiler(clock=clock)
            load0 = os.getloadavg()[0]
            with profiling(prof):
                row = run("sds", prompt, teacher, steps, out / f"{name}_{clock_name}", camera=cam)
            res[name][clock_name] = {**prof.summary(skip=2), "train_seconds": row["train_seconds"],
                                     "load_average_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    return res


def contention_case(steps: int, prompt: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        c = time.process_time()
        row = run("sds", prompt, "shapeworld-exact", steps, Path(tmp) / "run", camera=True)
        return {**row, "cpu_seconds": round(time.process_time() - c, 2)}


COMPETITOR = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\n"
              "print('ready', flush=True)\nwhile True:\n    a = torch.tanh(a @ a)\n")


def contention(steps: int, prompt: str, rounds: int) -> dict:
    """Seconds per prompt alone vs beside one competing torch job, ``rounds`` alternating rounds, fresh processes."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="2")

    def measure() -> dict:
        load0 = os.getloadavg()[0]
        r = subprocess.run([sys.executable, __file__, "--contention-case", str(steps), prompt], capture_output=True,
                           text=True, timeout=1800, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"contention case failed: {r.stderr.strip()[-2000:]}")
        return {**json.loads(r.stdout.strip().splitlines()[-1]),
                "load_average_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}

    alone, beside = [], []
    for _ in range(rounds):
        alone.append(measure())
        print(f"# alone: {alone[-1]}", file=sys.stderr, flush=True)
        comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.PIPE, text=True, env=env)
        try:
            if comp.stdout.readline().strip() != "ready":
                raise RuntimeError("competitor did not start")
            time.sleep(0.5)
            beside.append(measure())
            print(f"# beside a torch job: {beside[-1]}", file=sys.stderr, flush=True)
        finally:
            comp.kill()
            comp.wait()
            comp.stdout.close()

    def med(rows, k):
        return round(statistics.median(r[k] for r in rows), 2)

    ratio = med(beside, "train_seconds") / med(alone, "train_seconds")
    return {"text_to_3d_contention_slowdown": round(ratio, 2),
            "text_to_3d_contention_slowdown_wall": round(med(beside, "wall_seconds") / med(alone, "wall_seconds"), 2),
            "text_to_3d_contention_goal_2_5_met": ratio <= 2.5,
            # CPU seconds of the measured process beside / alone: > 1 would mean threads burning CPU while they wait
            "text_to_3d_contention_cpu_ratio": round(med(beside, "cpu_seconds") / med(alone, "cpu_seconds"), 2),
            "alone_train_seconds": med(alone, "train_seconds"), "beside_train_seconds": med(beside, "train_seconds"),
            "alone": alone, "beside": beside,
            "settings": {"method": "sds", "teacher": "shapeworld-exact (camera)", "prompt": prompt, "steps": steps,
                         "rounds": rounds, "threads": 2, "resolution": 64,
                         "competitor": "torch 384x384 matmul + tanh loop, 2 threads",
                         "ratio": "median train_seconds beside the competitor / median alone",
                         "machine": f"{platform.machine()} {os.cpu_count()} cpus"}}


def mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.fmean(vals), 4) if vals else None


SWEEP = {"sds_unet": (10.0, 20.0, 40.0), "vsd_unet": (2.0, 4.0, 7.5)}
SWEEP_QUICK = {"sds_unet": (10.0, 20.0), "vsd_unet": (2.0, 4.0)}
KEYS = ("psnr", "ssim", "iou", "chamfer", "saturation_gap", "janus", "wall_seconds", "it_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one prompt, 200 steps, two CFGs per sweep")
    ap.add_argument("--steps", type=int, default=None, help="default 400 (quick: 200)")
    ap.add_argument("--vsd-steps", type=int, default=None, help="default --steps")
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of runs: sds_unet vsd_unet sds_exact_nocam sds_exact_reconstruction")
    ap.add_argument("--profile", action="store_true", help="only the per-step profile of SDS (both teachers)")
    ap.add_argument("--profile-steps", type=int, default=40)
    ap.add_argument("--contention", action="store_true",
                    help="only seconds per prompt alone vs beside one competing busy process")
    ap.add_argument("--contention-steps", type=int, default=60)
    ap.add_argument("--contention-rounds", type=int, default=2)
    ap.add_argument("--contention-case", nargs=2, metavar=("STEPS", "PROMPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contention_case:
        print(json.dumps(contention_case(int(args.contention_case[0]), args.contention_case[1])))
        return
    if args.profile or args.contention:
        out = {"benchmark": "text_to_3d", "headline": {}}
        if args.profile:
            with tempfile.TemporaryDirectory() as tmp:
                prof = profile_runs(args.profile_steps, PROMPTS[0], Path(tmp))
            out["profile"] = prof
            for name, p in prof.items():
                out["headline"][f"profile_{name}_step_ms_cpu"] = p["cpu"].get("step_ms")
        if args.contention:
            c = contention(args.contention_steps, PROMPTS[0], args.contention_rounds)
            out["contention"] = c
            out["headline"].update({k: v for k, v in c.items() if k.startswith("text_to_3d_contention")})
        out["settings"] = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, threads "
                                      f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
                           "load_average_end": round(os.getloadavg()[0], 2)}
        print(json.dumps(out, indent=2))
        return
    steps = args.steps or (200 if args.quick else 400)
    vsd_steps = args.vsd_steps or steps
    prompts = PROMPTS[:1] if args.quick else PROMPTS
    sweep = SWEEP_QUICK if args.quick else SWEEP
    runs = {}
    for name, (method, teacher, st) in {"sds_unet": ("sds", "shapeworld-unet", steps),
                                         "vsd_unet": ("vsd", "shapeworld-unet", vsd_steps)}.items():
        for g in sweep[name]:
            runs[f"{name}@{g:g}"] = (method, teacher, True, st, g)
    runs["sds_exact_nocam"] = ("sds", "shapeworld-exact", False, steps, None)
    runs["sds_exact_reconstruction"] = ("sds", "shapeworld-exact", True, steps, None)
    if args.only:
        runs = {k: v for k, v in runs.items() if k.split("@")[0] in args.only}
    results: dict[str, list] = {}
    errors: dict[str, str] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, teacher, cam, st, g) in runs.items():
            rows = []
            for p in prompts:
                try:
                    rows.append(run(method, p, teacher, st, Path(tmp) / name.replace("@", "_"), camera=cam,
                                    guidance=g))
                    print(f"# {name} {p}: {rows[-1]}", file=sys.stderr, flush=True)
                except Exception as e:  # keep the other runs
                    errors[f"{name}:{p}"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
            results[name] = rows
    summary = {name: {k: mean(rows, k) for k in KEYS} for name, rows in results.items()}

    def best(prefix: str) -> tuple:
        cands = {n: v for n, v in summary.items() if n.startswith(prefix + "@") and v.get("psnr") is not None}
        if not cands:
            return None, {}
        n = max(cands, key=lambda k: cands[k]["psnr"])
        return float(n.split("@")[1]), cands[n]

    g_sds, b_sds = best("sds_unet")
    g_vsd, b_vsd = best("vsd_unet")
    rec = summary.get("sds_exact_reconstruction", {})
    nocam = summary.get("sds_exact_nocam", {})
    out = {
        "benchmark": "text_to_3d",
        "headline": {
            "sds_unet_psnr_heldout": b_sds.get("psnr"), "sds_unet_best_cfg": g_sds,
            "sds_unet_iou_heldout": b_sds.get("iou"),
            "vsd_unet_psnr_heldout": b_vsd.get("psnr"), "vsd_unet_best_cfg": g_vsd,
            "vsd_unet_iou_heldout": b_vsd.get("iou"),
            "sds_exact_nocam_psnr_heldout": nocam.get("psnr"), "sds_exact_nocam_iou_heldout": nocam.get("iou"),
            "sds_exact_nocam_janus": nocam.get("janus"),
            "sds_exact_reconstruction_psnr": rec.get("psnr"), "sds_exact_reconstruction_iou": rec.get("iou"),
            "sds_exact_reconstruction_seconds_per_prompt": rec.get("wall_seconds"),
            "sds_exact_reconstruction_janus": rec.get("janus"),
            "reconstruction_goal_iou_0.85_psnr_22_3min_met": bool(
                rec.get("iou") and rec["iou"] >= 0.85 and rec.get("psnr") and rec["psnr"] >= 22
                and rec.get("wall_seconds", 1e9) <= 180),
        },
        "summary": summary,
        "runs": results,
        "errors": errors,
        "settings": {"prompts": prompts, "steps": steps, "vsd_steps": vsd_steps, "resolution": 64, "sweep": sweep,
                     "eval": "8 views at 64x64 inside the held-out azimuth sector 60-120 deg (no training camera "
                             "there) vs ground-truth renders",
                     "reconstruction": "sds_exact_reconstruction: exact teacher with the camera = fitting the "
                                       "ground-truth renders of the training views (upper bound, not generation)",
                     "total_seconds": round(time.perf_counter() - t_all, 1),
                     "machine": f"{platform.machine()} {os.cpu_count()} cpus, threads "
                                f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
                     "load_average_end": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
