"""Print issue 16's table: five inputs (a memorised reference, fresh true-world clips, a still clip, a wrong
shape with the right motion, the pixel mean of 16 references) x the headline video metrics, on the 21
static-camera prompts, two clips per prompt (so diversity is defined). About 10 s on one CPU core.

    python scripts/video_metric_table.py [--per-prompt 2] [--json]
"""
import argparse
import json

import torch

from studio.world.clips import video_prompts
from studio.world.video_metrics import GAMING_ROWS, evaluate_videos, gaming_inputs

COLUMNS = ("frame_error", "frame_error_ratio", "frame_error_vs_floor", "memorisation", "motion_accuracy",
           "motion_accuracy_any_object", "object_accuracy", "shape_accuracy", "flicker", "still_fraction",
           "diversity", "diversity_ratio")


def table(per_prompt: int = 2) -> dict[str, dict[str, float]]:
    prompts, inputs = gaming_inputs(video_prompts(cameras=["static"]), per_prompt=per_prompt)
    return {name: evaluate_videos(inputs[name], prompts) for name in GAMING_ROWS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = table(args.per_prompt)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| input | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
