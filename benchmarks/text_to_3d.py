"""Text-to-3D quality and speed on ShapeWorld, against ground truth, fixed seeds. Prints one JSON object.

Runs, per prompt (seed 0, 64x64 renders, held-out evaluation views):
  * ``sds_exact``       SDS with the exact ShapeWorld teacher, view-conditioned (camera passed)
  * ``sds_exact_nocam`` the same teacher without the camera (a ring-of-views prior: Janus-prone)
  * ``sds_unet``        SDS with the tiny trained ``shapeworld-unet`` teacher (view prompts)
  * ``vsd_unet``        VSD (LoRA variational score on ``shapeworld-unet``)
Each reports PSNR / SSIM / IoU / Chamfer / saturation gap / Janus, wall seconds and it/s.

    python benchmarks/text_to_3d.py            # 6 prompts
    python benchmarks/text_to_3d.py --quick    # one prompt, exact-teacher SDS and the unet runs
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


def run(method: str, prompt: str, teacher: str, steps: int, out: Path, camera: bool = True, seed: int = 0) -> dict:
    from methods.registry import get_method
    from methods import run as run_method

    cls = get_method(method)
    cfg = cls.Config(prompt=prompt, teacher=teacher, steps=steps, seed=seed, turntable_frames=8, turntable_size=64)
    cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, camera_conditioning=camera))
    t0 = time.perf_counter()
    m = run_method(cfg, method, out, progress=False)
    wall = time.perf_counter() - t0
    gt = m.get("ground_truth") or {}
    return {"prompt": prompt, "wall_seconds": round(wall, 1), "train_seconds": m["train_seconds"], "it_s": m["it_s"],
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in gt.items()
               if k in ("psnr", "ssim", "iou", "chamfer", "saturation_gap", "janus")}}


def mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.fmean(vals), 4) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one prompt")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--vsd-steps", type=int, default=400)
    ap.add_argument("--only", nargs="*", default=None, help="subset of runs: sds_exact sds_exact_nocam sds_unet vsd_unet")
    args = ap.parse_args()
    prompts = PROMPTS[:1] if args.quick else PROMPTS
    runs = {
        "sds_exact": ("sds", "shapeworld-exact", True, args.steps),
        "sds_exact_nocam": ("sds", "shapeworld-exact", False, args.steps),
        "sds_unet": ("sds", "shapeworld-unet", True, args.steps),
        "vsd_unet": ("vsd", "shapeworld-unet", True, args.vsd_steps),
    }
    if args.quick:
        runs.pop("sds_exact_nocam")
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only}
    results: dict[str, list] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, teacher, cam, steps) in runs.items():
            rows = []
            for p in prompts:
                try:
                    rows.append(run(method, p, teacher, steps, Path(tmp) / name, camera=cam))
                    print(f"# {name} {p}: {rows[-1]}", file=sys.stderr)
                except Exception as e:  # keep the other runs
                    errors[f"{name}:{p}"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
            results[name] = rows
    summary = {name: {k: mean(rows, k) for k in ("psnr", "ssim", "iou", "chamfer", "saturation_gap", "janus",
                                                 "wall_seconds", "it_s")} for name, rows in results.items()}
    se = summary.get("sds_exact", {})
    out = {
        "benchmark": "text_to_3d",
        "headline": {
            "sds_exact_iou": se.get("iou"),
            "sds_exact_psnr": se.get("psnr"),
            "sds_exact_seconds_per_prompt": se.get("wall_seconds"),
            "sds_unet_psnr": summary.get("sds_unet", {}).get("psnr"),
            "vsd_psnr": summary.get("vsd_unet", {}).get("psnr"),
            "sds_exact_janus": se.get("janus"),
            "sds_exact_nocam_janus": summary.get("sds_exact_nocam", {}).get("janus"),
            "goal_iou_0.85_psnr_22_3min_met": bool(se.get("iou") and se["iou"] >= 0.85 and se.get("psnr")
                                                    and se["psnr"] >= 22 and se.get("wall_seconds", 1e9) <= 180),
        },
        "summary": summary,
        "runs": results,
        "errors": errors,
        "settings": {"prompts": prompts, "steps": args.steps, "vsd_steps": args.vsd_steps, "resolution": 64,
                     "eval": "8 held-out views at 64x64 vs ground-truth renders",
                     "machine": f"{platform.machine()} {os.cpu_count()} cpus, threads "
                                f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
                     "load_average_end": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
