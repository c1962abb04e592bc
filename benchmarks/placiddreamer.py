"""PlacidDreamer on ShapeWorld against ground truth, fixed seeds, held-out views and objects. Prints one JSON object.

Prompts: objects the Latent-Plane never saw (its ``held_out`` objects in ``assets/latent-plane/training.json``).
Per prompt the steps before the 3DGS stage (reference image, 8 novel views, Latent-Plane init,
DreamBooth-LoRA on the ring views outside the held-out azimuth sector) run once, with the first seed; every
distillation variant and every seed then starts from the same artefacts (the seeds vary the 3DGS stage):
  * ``bsd_lam{L}``  Balanced Score Distillation with lambda = L (the saturation knob), standard form
  * ``sds``         SDS with the same stage, init and personalised teacher, CFG ``--sds-guidance``
Reports per variant PSNR / SSIM / IoU / Chamfer / saturation gap / Janus vs ground truth at 8 views inside the
held-out azimuth sector (no training camera there) and seconds; the Latent-Plane init alone (IoU / Chamfer of the
initial Gaussians, same views); BSD's and SDS's saturation gaps over prompts x seeds with their spread (std,
min, max) and the paired differences. The paper's claim in miniature: BSD is less over-saturated than SDS
without losing PSNR; ``headline.claims`` says whether that held here, beyond the spread.

The novel-view teacher is ``shapeworld-nv-exact`` (the method default): its 8 ring views are true renders of the
posterior object, so the Latent-Plane init measures the plane on true views of an unseen object.

    python benchmarks/placiddreamer.py            # 3 held-out prompts x 2 seeds, lambdas 5/15/50 + SDS, 500 steps
    python benchmarks/placiddreamer.py --quick    # 3 prompts x 2 seeds, BSD (lambda 15) vs SDS, short (~15 min)
    python benchmarks/placiddreamer.py --views-only --view-objects green_torus   # enhanced vs plain views only

View consistency (issue 17 part 3): per held-out object the 8 ring views from ``--view-teacher`` (default
``shapeworld-nv-unet``: a learnt, imperfect model; the exact teacher's views are true renders already) with and
without the Latent-Plane inside the sampling; ``enhanced_view_consistency`` / ``plain_view_consistency`` are the
mean silhouette-hull IoU of the 8 views (1 = the silhouettes agree with one shape), ``*_view_gt_psnr`` their PSNR
against true renders at the ring cameras.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def heldout_prompts() -> list[str]:
    """Prompts of the objects the shipped Latent-Plane never saw (``held_out`` in its training.json)."""
    from studio.world.objects import get_object

    info = json.loads((REPO / "assets" / "latent-plane" / "training.json").read_text())
    return [get_object(name).prompt for name in info["held_out"]]


def latent_plane_objects() -> dict:
    info = json.loads((REPO / "assets" / "latent-plane" / "training.json").read_text())
    return {"held_out": list(info.get("held_out", {})), "train_subset_evaluated": list(info.get("train_subset", {}))}
SHARED = ("reference.png", "views.safetensors", "views.png", "init.ply", "init.json", "init_mesh.ply", "lora")
KEYS = ("psnr", "ssim", "iou", "chamfer", "saturation_gap", "janus")


def _gt(m: dict) -> dict:
    gt = m.get("ground_truth") or {}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in gt.items() if k in KEYS}


def run_prompt(prompt: str, variants: dict, args, tmp: Path, seed: int, first=None) -> tuple[dict, Path]:
    from methods.placiddreamer import PlacidDreamerConfig
    from studio.students.gaussians import GaussianModel
    from methods import run
    from studio.runs import slugify
    from studio.world.metrics import evaluate_gaussians
    from studio.world.objects import find_object_for_prompt

    base = PlacidDreamerConfig(prompt=prompt, teacher=args.teacher, steps=args.steps, seed=seed,
                               dreambooth_steps=args.dreambooth_steps, init_points=args.init_points,
                               nv_steps=args.nv_steps, turntable_frames=8, turntable_size=64)
    rows: dict = {}
    for name, overrides in variants.items():
        out = tmp / name
        if first is not None:  # reuse the prepared steps of the first variant
            dst = out / slugify(prompt)
            dst.mkdir(parents=True, exist_ok=True)
            for f in SHARED:
                src = first / f
                if src.is_dir():
                    shutil.copytree(src, dst / f, dirs_exist_ok=True)
                elif src.is_file():
                    shutil.copy2(src, dst / f)
        cfg = dataclasses.replace(base, **overrides)
        t0 = time.perf_counter()
        m = run(cfg, "placiddreamer", out, progress=False, resume=first is not None)
        rows[name] = {**_gt(m), "wall_seconds": round(time.perf_counter() - t0, 1), "train_seconds": m["train_seconds"]}
        print(f"# {prompt} {name}: {rows[name]}", file=sys.stderr, flush=True)
        if first is None:
            first = out / slugify(prompt)
            prep = m.get("prepare", {})
            rows["prepare"] = {k: v for k, v in prep.items() if k.endswith("seconds") or k in (
                "personalised", "dreambooth_loss_first_mean", "dreambooth_loss_last_mean", "init_points",
                "posterior_object")}
            obj = find_object_for_prompt(prompt)
            if (first / "init.ply").is_file() and obj is not None:
                init = GaussianModel.from_ply(first / "init.ply")
                ev = evaluate_gaussians(obj, init, size=64, n_views=8, opacity_threshold=0.05,  # init opacity 0.1
                                        azimuth_sector=base.heldout_azimuth)
                rows["latent_plane_init"] = {k: (round(float(v), 4) if isinstance(v, float) else v)
                                             for k, v in ev.items() if k in ("iou", "chamfer", "psnr")}
    return rows, first


def view_consistency_rows(objects: list[str], teacher: str, nv_steps: int, every: int) -> dict:
    """Plain vs Latent-Plane-enhanced ring views (issue 17 part 3) per held-out object, reference = the object's
    true render at the teacher's reference camera: silhouette-hull IoU and ground-truth PSNR at the ring cameras
    (all views, and the views inside the held-out sector)."""
    from methods.placiddreamer.view_eval import compare_enhanced_views

    rows = {}
    for obj in objects:
        try:
            rows[obj] = compare_enhanced_views(obj, teacher, steps=nv_steps, active_steps=round(0.9 * nv_steps),
                                               every=every)
        except Exception as e:  # keep the other objects
            rows[obj] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        print(f"# views {obj} {teacher}: {rows[obj]}", file=sys.stderr, flush=True)
    ok = [r for r in rows.values() if "error" not in r]

    def avg(which, key):
        return mean([r[which].get(key) for r in ok])

    return {"per_object": rows, "teacher": teacher, "nv_steps": nv_steps, "enhance_every": every,
            **{f"{w}_{k}": avg(w, k) for w in ("plain", "enhanced")
               for k in ("silhouette_iou", "gt_psnr", "gt_psnr_sector")}}


def mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return round(statistics.fmean(vals), 4) if vals else None


def spread(vals) -> dict:
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.fmean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
            "min": round(min(vals), 4), "max": round(max(vals), 4), "n": len(vals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 prompts x 2 seeds, BSD lambda 15 vs SDS only, 60 steps, 50 DreamBooth steps, 20 novel-view "
                         "steps, 5000 init points")
    ap.add_argument("--prompts", nargs="*", default=None, help="default: 3 objects held out from the Latent-Plane")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--teacher", default="shapeworld-unet")
    ap.add_argument("--steps", type=int, default=None, help="default 500 (quick 60)")
    ap.add_argument("--dreambooth-steps", type=int, default=None, help="default 400 (quick 50)")
    ap.add_argument("--nv-steps", type=int, default=None, help="default 50 (quick 20)")
    ap.add_argument("--init-points", type=int, default=None, help="default 20000 (quick 5000)")
    ap.add_argument("--lambdas", type=float, nargs="*", default=None, help="default 5 15 50 (quick 15)")
    ap.add_argument("--sds-guidance", type=float, default=None, help="CFG of the SDS baseline (default: method's)")
    ap.add_argument("--views-only", action="store_true",
                    help="only the enhanced-vs-plain view consistency (issue 17 part 3) on the held-out objects")
    ap.add_argument("--view-teacher", default="shapeworld-nv-unet",
                    help="novel-view teacher of the view-consistency rows (shapeworld-nv-unet or shapeworld-nv-exact)")
    ap.add_argument("--view-objects", nargs="*", default=None, help="default: the Latent-Plane's held-out objects")
    ap.add_argument("--enhance-every", type=int, default=15)
    args = ap.parse_args()
    view_objects = args.view_objects or latent_plane_objects()["held_out"]
    if args.views_only:
        t0 = time.perf_counter()
        v = view_consistency_rows(view_objects, args.view_teacher, args.nv_steps or 50, args.enhance_every)
        print(json.dumps({"benchmark": "placiddreamer", "headline": {
            "enhanced_view_consistency": v["enhanced_silhouette_iou"], "plain_view_consistency": v["plain_silhouette_iou"],
            "enhanced_view_gt_psnr": v["enhanced_gt_psnr"], "plain_view_gt_psnr": v["plain_gt_psnr"]},
            "view_consistency": v, "settings": {"total_seconds": round(time.perf_counter() - t0, 1),
                                                "objects": view_objects}}, indent=2))
        return
    q = args.quick
    args.steps = args.steps or (60 if q else 500)
    args.dreambooth_steps = args.dreambooth_steps or (50 if q else 400)
    args.nv_steps = args.nv_steps or (20 if q else 50)
    args.init_points = args.init_points or (5000 if q else 20_000)
    args.lambdas = args.lambdas or ([15.0] if q else [5.0, 15.0, 50.0])
    prompts = args.prompts or heldout_prompts()[:3]
    variants = {f"bsd_lam{lam:g}": {"distillation": "bsd", "bsd_lambda": lam} for lam in args.lambdas}
    variants["sds"] = {"distillation": "sds", "guidance_scale": args.sds_guidance}
    if 15.0 in args.lambdas:  # the default lambda first: its prepared steps are shared
        variants = {"bsd_lam15": variants.pop("bsd_lam15"), **variants}
    results, errors = {}, {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(prompts):
            first = None
            for seed in args.seeds:
                try:
                    rows, first = run_prompt(p, variants, args, Path(tmp) / f"p{i}_s{seed}", seed, first)
                    results[f"{p} | seed {seed}"] = rows
                except Exception as e:  # keep the other prompts
                    errors[f"{p} | seed {seed}"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
    summary = {name: {k: mean([r.get(name, {}).get(k) for r in results.values()]) for k in KEYS + ("wall_seconds",)}
               for name in list(variants) + ["latent_plane_init"]}
    summary["prepare"] = {k: mean([r.get("prepare", {}).get(k) for r in results.values()])
                          for k in ("reference_seconds", "multiview_seconds", "personalise_seconds")}
    default = summary.get("bsd_lam15", {})
    sds = summary["sds"]
    bsd_sat = spread([r.get("bsd_lam15", {}).get("saturation_gap") for r in results.values()])
    sds_sat = spread([r.get("sds", {}).get("saturation_gap") for r in results.values()])
    paired = spread([r["bsd_lam15"]["saturation_gap"] - r["sds"]["saturation_gap"] for r in results.values()
                     if isinstance(r.get("bsd_lam15", {}).get("saturation_gap"), float)
                     and isinstance(r.get("sds", {}).get("saturation_gap"), float)])
    sat = [summary[f"bsd_lam{lam:g}"]["saturation_gap"] for lam in sorted(args.lambdas)]
    beyond = None
    if None not in (bsd_sat["mean"], sds_sat["mean"], paired["mean"]):
        beyond = bool(bsd_sat["mean"] < sds_sat["mean"]
                      and sds_sat["mean"] - bsd_sat["mean"] > max(bsd_sat["std"], sds_sat["std"])
                      and paired["max"] < 0)
    claims = {
        "bsd_less_saturated_than_sds_on_average": None if None in (bsd_sat["mean"], sds_sat["mean"])
        else bsd_sat["mean"] < sds_sat["mean"],
        "bsd_lowers_saturation_beyond_the_spread": beyond,
        "beyond_the_spread_means": "mean gap difference larger than the larger std over prompts x seeds, and BSD lower "
                                   "in every (prompt, seed) pair",
        "bsd_psnr_not_worse_than_sds": None if None in (default.get("psnr"), sds.get("psnr"))
        else default["psnr"] >= sds["psnr"] - 0.5,
        "lambda_moves_saturation_monotonically": None if None in sat or len(sat) < 3 else (
            sat == sorted(sat) or sat == sorted(sat, reverse=True)),
        "saturation_gap_by_lambda": dict(zip([f"{lam:g}" for lam in sorted(args.lambdas)], sat)),
    }
    views = view_consistency_rows(view_objects, args.view_teacher, args.nv_steps, args.enhance_every)
    lp = summary["latent_plane_init"]
    out = {
        "benchmark": "placiddreamer",
        "headline": {
            "bsd_saturation_gap_mean": bsd_sat["mean"], "bsd_saturation_gap_std": bsd_sat["std"],
            "sds_saturation_gap_mean": sds_sat["mean"], "sds_saturation_gap_std": sds_sat["std"],
            "bsd_minus_sds_saturation_gap": paired,
            "bsd_saturation_gap_spread": bsd_sat, "sds_saturation_gap_spread": sds_sat,
            "bsd_psnr_heldout": default.get("psnr"), "sds_psnr_heldout": sds.get("psnr"),
            "bsd_iou_heldout": default.get("iou"), "sds_iou_heldout": sds.get("iou"),
            "latent_plane_init_iou_heldout": lp.get("iou"),
            "latent_plane_init_chamfer_heldout": lp.get("chamfer"),
            "enhanced_view_consistency": views["enhanced_silhouette_iou"],
            "plain_view_consistency": views["plain_silhouette_iou"],
            "enhanced_view_gt_psnr": views["enhanced_gt_psnr"], "plain_view_gt_psnr": views["plain_gt_psnr"],
            "claims": claims,
        },
        "summary": summary,
        "view_consistency": views,
        "runs": results,
        "errors": errors,
        "settings": {"prompts": prompts, "seeds": args.seeds, "teacher": args.teacher, "steps": args.steps,
                     "dreambooth_steps": args.dreambooth_steps, "nv_steps": args.nv_steps,
                     "init_points": args.init_points, "lambdas": args.lambdas, "sds_guidance": args.sds_guidance,
                     "latent_plane_objects": latent_plane_objects(),
                     "eval": "8 views at 64x64 inside the held-out azimuth sector 60-120 deg (no training camera or "
                             "personalisation view there) vs ground-truth renders",
                     "prepare_shared_across_seeds": True,
                     "total_seconds": round(time.perf_counter() - t_all, 1),
                     "machine": f"{platform.machine()} {os.cpu_count()} cpus, threads "
                                f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
                     "load_average_end": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
