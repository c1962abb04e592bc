"""``ns-train studio-sds`` against ``studio generate --method sds`` with the same settings: ground-truth PSNR at the
held-out views (the same ``evaluate_gaussians`` call), wall time. Prints one JSON object. Needs nerfstudio (run it
with the nerfstudio venv's python, ``-P``; see docs/notes/issue23.md). Goal (issue 23): within 1 dB.

    $NS_VENV/bin/python -P benchmarks/nerfstudio_plugin.py --steps 400 --teacher shapeworld-exact
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_studio(args, out: Path) -> dict:
    from methods.registry import get_method

    method = get_method("sds")()
    cfg = method.resolve(method.Config(prompt=args.prompt, teacher=args.teacher, steps=args.steps, seed=args.seed,
                                       turntable_frames=4, turntable_size=64))
    t = time.perf_counter()
    m = method.run(cfg, out, progress=False)
    return {"psnr": m["ground_truth"]["psnr"], "iou": m["ground_truth"]["iou"], "ssim": m["ground_truth"]["ssim"],
            "n_gaussians": m["n_gaussians"], "train_seconds": m["train_seconds"],
            "wall_seconds": round(time.perf_counter() - t, 1), "guidance_scale": cfg.guidance_scale}


def run_nerfstudio(args, out: Path) -> dict:
    from nerfstudio.engine.trainer import Trainer

    from studio.nerfstudio_plugin.method_configs import studio_sds

    cfg = dataclasses.replace(studio_sds.config, output_dir=out, vis="tensorboard", max_num_iterations=args.steps,
                              steps_per_save=args.steps, steps_per_eval_batch=10**9, steps_per_eval_image=10**9,
                              steps_per_eval_all_images=10**9)
    cfg.machine.device_type = "cpu"
    cfg.pipeline = dataclasses.replace(cfg.pipeline)
    cfg.pipeline.model = dataclasses.replace(cfg.pipeline.model, prompt=args.prompt, teacher=args.teacher,
                                             steps=args.steps, seed=args.seed)
    cfg.set_timestamp()
    t = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    train_s = time.perf_counter() - t
    gt = trainer.pipeline.get_average_eval_image_metrics()
    return {"psnr": gt["psnr"], "iou": gt["iou"], "ssim": gt["ssim"], "n_gaussians": int(gt["n_gaussians"]),
            "wall_seconds": round(train_s, 1), "guidance_scale": trainer.pipeline.model.studio_cfg.guidance_scale}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="a red cube")
    ap.add_argument("--teacher", default="shapeworld-exact")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    # nerfstudio's trainer prints its progress to stdout: keep stdout for the one JSON object
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(sys.stderr):
        studio = run_studio(args, Path(d) / "studio")
        ns = run_nerfstudio(args, Path(d) / "ns")
    print(json.dumps({"benchmark": "nerfstudio_plugin", "prompt": args.prompt, "teacher": args.teacher,
                      "steps": args.steps, "seed": args.seed, "studio_generate": studio, "ns_train": ns,
                      "psnr_gap_db": round(ns["psnr"] - studio["psnr"], 3),
                      "within_1db": abs(ns["psnr"] - studio["psnr"]) <= 1.0,
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}, indent=1))


if __name__ == "__main__":
    main()
