"""Issue 16 diagnostic: does the trained video teacher read the motion word? Samples every static-camera prompt
``--per`` times (50 flow-Euler steps, CFG ``--cfg``) and prints the confusion of prompted vs classified motion
(rows: prompted; columns: what studio.world.video_metrics.classify_videos reads; 'none' = no single object / no
motion read). A teacher that ignores the motion word has near-identical rows; one that reads it, a diagonal.

    python docs/notes/issue16_readouts/confusion.py MODEL_DIR [--cfg 4] [--per 4]
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, "scripts")
from diffusers import UNetMotionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from train_shapeworld_video_unet import encode_text, prompt_set, sample  # noqa: E402
from studio.world.video_metrics import classify_videos  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--cfg", type=float, default=4.0)
ap.add_argument("--per", type=int, default=4)
ap.add_argument("--steps", type=int, default=50)
ap.add_argument("--seed", type=int, default=777)
args = ap.parse_args()
torch.set_num_threads(1)
d = Path(args.model)
net = UNetMotionModel.from_pretrained(str(d / "unet")).eval()
te = CLIPTextModel.from_pretrained(str(d / "text_encoder"))
tok = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
P = [p for p in prompt_set("static") for _ in range(args.per)]
x = sample(net, lambda t: encode_text(te, tok, t), P, (3, 8, 16, 16), args.steps, args.cfg, args.seed, video=True)
cl = classify_videos(x.permute(0, 2, 1, 3, 4).contiguous())
motions = ["moving left", "moving right", "moving up", "moving down", "bouncing", "rotating", "speeding up"]
conf = {m: Counter() for m in motions}
for p, c in zip(P, cl):
    want = next(m for m in motions if p.endswith(m))
    conf[want][c[2] or "none"] += 1
cols = motions + ["none"]
print(f"model {d}  cfg {args.cfg}  steps {args.steps}  {args.per} per prompt")
print(f"{'prompted':14s}" + "".join(f"{c[:9]:>10s}" for c in cols))
for m in motions:
    print(f"{m:14s}" + "".join(f"{conf[m][c]:>10d}" for c in cols))
diag = sum(conf[m][m] for m in motions) / len(P)
print(json.dumps({"model": str(d), "cfg": args.cfg, "steps": args.steps, "per": args.per,
                  "motion_class_diag": round(diag, 3), "confusion": {m: dict(conf[m]) for m in motions}}))
