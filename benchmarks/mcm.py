"""MCM on ShapeWorld video against its teacher and the video-LCM baseline, fixed seeds. Prints one JSON object.

Teacher (``--teacher``): ``shapeworld-video-unet`` by default (the tiny trained AnimateDiff-class model, issue 16:
``UNetMotionModel``, pixel-space flow, CFG 4; ``shapeworld-video-wan``, the Wan-class one, does not move its objects)
with flow Euler + CFG at 4 and 50 steps, measured in the same run. Students (LoRA on the teacher's own network,
trained here; LCM multistep sampling, guidance 1), all on the 21 static-camera prompts:

  * ``lcm``        video LCM (raw consistency, no discriminator, no mixed trajectories)
  * ``mcm``        MCM, distillation-only mode: learned motion head, image discriminator on frames of the training
                   clips, mixed trajectories (p = 0.5)
  * ``lcm_lq``     video LCM trained on the low-quality clip domain (blur / noise / blocks / watermark)
  * ``mcm_lq_hq``  MCM on the low-quality clips with the high-quality image set as the discriminator's real images
                   (the appearance claim: frames move toward the HQ domain while motion holds)

Each student is evaluated at 1 / 2 / 4 steps (+8 without --quick): frame error (lower is better), motion accuracy
([0, 1], higher is better), flicker, text alignment, domain quality (higher = closer to the HQ image domain) and
seconds per clip.

    python benchmarks/mcm.py            # 300 training steps per student, 4 students
    python benchmarks/mcm.py --quick    # 60 steps, lcm and mcm only, 7 prompts, 1 and 4 steps
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

TEACHER = "shapeworld-video-unet"  # issue 16: the trained AnimateDiff-class teacher whose objects move


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None, help="subset of runs: lcm mcm lcm_lq mcm_lq_hq")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default=TEACHER, help="a registered video teacher (shapeworld-video-unet, "
                    "shapeworld-video-wan) or a model folder")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from methods.mcm import MCMConfig, MCMMethod
    from methods.video_lcm import VideoLCMConfig, VideoLCMMethod
    from studio.runs.video_generate import load_video_model
    from studio.teachers.registry import default_guidance
    from studio.runs.video_distill import evaluate_video_model, resolve_prompts

    train_steps = args.train_steps or (60 if args.quick else 300)
    n_eval = 7 if args.quick else 21
    eval_steps = (1, 4) if args.quick else (1, 2, 4, 8)
    prompts = resolve_prompts("static")[:n_eval]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_mcm_"))
    teacher_name = args.teacher
    result: dict = {"benchmark": "mcm", "quick": args.quick, "teacher": teacher_name, "train_steps": train_steps,
                    "batch_size": args.batch_size, "eval_prompts": len(prompts), "threads": args.threads,
                    "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "cpu_count": os.cpu_count()}, "runs": {}}
    teacher, _ = load_video_model(teacher_name)
    g = default_guidance(teacher_name, "sample_video")
    result["teacher_rows"] = evaluate_video_model(teacher, prompts, (4, 50), {"sampler": "flow", "guidance_scale": g})
    print(f"teacher: {result['teacher_rows']}", file=sys.stderr, flush=True)
    common = dict(teacher=teacher_name, prompts="static", steps=train_steps, batch_size=args.batch_size, seed=0,
                  eval_prompts=n_eval, eval_steps=eval_steps, checkpoint_every=10 ** 9)
    runs = {
        "lcm": (VideoLCMMethod, VideoLCMConfig(**common)),
        "mcm": (MCMMethod, MCMConfig(**common)),
        "lcm_lq": (VideoLCMMethod, VideoLCMConfig(**common, data="shapeworld-lq")),
        "mcm_lq_hq": (MCMMethod, MCMConfig(**common, data="shapeworld-lq", real_images="hq")),
    }
    if args.quick:
        runs = {k: runs[k] for k in ("lcm", "mcm")}
    for key, (cls, cfg) in runs.items():
        if args.only and key not in args.only:
            continue
        t0 = time.perf_counter()
        m = cls().run(cfg, out / key, progress=False)
        result["runs"][key] = {"train_seconds": m["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                               "final_loss": m["final_loss"], "rows": m["eval"]["rows"]}
        print(f"{key}: {result['runs'][key]}", file=sys.stderr, flush=True)
    t4, t50 = result["teacher_rows"]["4"], result["teacher_rows"]["50"]
    head = {"teacher_50_frame_error": t50["frame_error"], "teacher_50_motion_accuracy": t50["motion_accuracy"],
            "teacher_4_frame_error": t4["frame_error"], "teacher_4_motion_accuracy": t4["motion_accuracy"],
            "teacher_50_seconds_per_clip": t50["seconds_per_clip"]}
    for key in result["runs"]:
        r4 = result["runs"][key]["rows"].get("4")
        if r4:
            for k in ("frame_error", "motion_accuracy", "seconds_per_clip", "domain_quality"):
                head[f"{key}_4_{k}"] = r4[k]
    if "mcm_4_motion_accuracy" in head:
        head["speedup_vs_teacher_50"] = round(t50["seconds_per_clip"] / max(head["mcm_4_seconds_per_clip"], 1e-9), 2)
        head["goal_mcm_4_within_10pct_motion"] = head["mcm_4_motion_accuracy"] >= 0.9 * t50["motion_accuracy"]
        head["goal_mcm_4_within_10pct_frame_error"] = head["mcm_4_frame_error"] <= 1.1 * t50["frame_error"]
        head["goal_10x_faster"] = head["speedup_vs_teacher_50"] >= 10
    if "mcm_lq_hq_4_domain_quality" in head and "lcm_lq_4_domain_quality" in head:
        # the names for the quality-mode pair (MCM on low-quality clips + HQ images vs LCM on the same clips)
        head["mcm_hq_domain_quality"] = head["mcm_lq_hq_4_domain_quality"]
        head["lcm_hq_domain_quality"] = head["lcm_lq_4_domain_quality"]
        head["claim_hq_appearance"] = head["mcm_lq_hq_4_domain_quality"] > head["lcm_lq_4_domain_quality"]
        head["claim_motion_holds"] = head["mcm_lq_hq_4_motion_accuracy"] >= 0.9 * head["lcm_lq_4_motion_accuracy"]
    result["headline"] = head
    result["out"] = str(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
