#!/usr/bin/env python
"""Read-outs of a trained ShapeWorld video teacher (issue 16): CFG sweep, per-motion accuracy, hybrid test.

* **CFG sweep**: flow-Euler samples at ``--steps`` for each ``--cfg`` on the static-camera prompts (and, with
  ``--all-prompts``, the 63-prompt default set), scored by :func:`studio.world.video_metrics.evaluate_videos`.
* **Per-motion accuracy**: motion accuracy (right object, right motion) per motion word.
* **Hybrid test**: the same Euler path, the exact teacher (``shapeworld-video-exact`` at the model's clip size)
  for noise levels ``s >= s_switch`` and the trained model below, so the noise band where the model loses the
  object / trajectory is located.

    python scripts/shapeworld_video_readouts.py --model shapeworld-video-unet --cfg 1 2 3 4 --hybrid 0.9 0.6 0.3

Prints one JSON object (and appends it to ``--log`` when given).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _sample(models, prompts, steps: int, cfg: float, seed: int, s_switch: float | None = None):
    """Flow Euler; ``models = (trained, exact)``; the exact teacher above ``s_switch`` when given."""
    from studio.teachers.sampling import _as_cond, _initial_noise, _t_tensor, flow_euler_timesteps

    trained, exact = models
    ts, sig = flow_euler_timesteps(trained.schedule, steps, None, None)
    x = _initial_noise(trained, len(prompts), seed, None, None)
    c_tr = _as_cond(trained, prompts, None)
    c_ex = _as_cond(exact, prompts, None) if exact is not None else None
    with torch.no_grad():
        for k in range(len(ts)):
            s, s_next = float(sig[k]), float(sig[k + 1])
            use_exact = s_switch is not None and s >= s_switch
            m, c, g = (exact, c_ex, 1.0) if use_exact else (trained, c_tr, cfg)
            v = m.predict(x, _t_tensor(float(ts[k]), len(prompts), x.device), c, guidance_scale=g, output="flow")
            x = x.float() + (s_next - s) * v.float()
    return trained.decode(x).clamp(0, 1)


def score(videos, prompts) -> dict:
    from studio.world.clips import MOTIONS, parse_video_prompt
    from studio.world.video_metrics import evaluate_videos, motion_accuracy

    m = evaluate_videos(videos, prompts)
    keys = ("motion_accuracy", "object_motion_accuracy", "shape_accuracy", "color_accuracy", "object_accuracy",
            "motion_class_accuracy", "camera_accuracy", "frame_error", "frame_error_vs_floor", "still_fraction",
            "motion_energy_ratio", "diversity", "diversity_ratio", "flicker")
    out = {k: round(float(m[k]), 4) for k in keys if k in m}
    per = motion_accuracy(videos, prompts, per_clip=True)
    motions = [parse_video_prompt(p)[2] for p in prompts]
    out["per_motion"] = {mo: round(float(per[[i for i, x in enumerate(motions) if x == mo]].float().mean()), 3)
                         for mo in MOTIONS if mo in motions}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="registered name or saved folder")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--all-prompts", action="store_true", help="also the 63-prompt default set at --all-cfg")
    ap.add_argument("--all-cfg", type=float, default=None, help="CFG for --all-prompts (default: best static)")
    ap.add_argument("--hybrid", type=float, nargs="*", default=[], help="switch noise levels s of the hybrid test")
    ap.add_argument("--hybrid-cfg", type=float, default=None, help="CFG below the switch (default: best static)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from studio.runs.video_generate import load_video_model
    from studio.world.clips import video_prompts

    model, _ = load_video_model(args.model)
    static = [p for p in video_prompts(cameras=["static"]) for _ in range(args.per_prompt)]
    res = {"tag": args.tag, "model": str(args.model), "steps": args.steps, "per_prompt": args.per_prompt,
           "static": {}, "hybrid": {}}
    t0 = time.time()
    for cfg in args.cfg:
        res["static"][str(cfg)] = score(_sample((model, None), static, args.steps, cfg, args.seed), static)
        print(f"cfg {cfg}: {res['static'][str(cfg)]}", file=sys.stderr, flush=True)
    best = max(args.cfg, key=lambda c: (res["static"][str(c)]["motion_accuracy"], res["static"][str(c)]["shape_accuracy"]))
    res["best_cfg"] = best
    if args.hybrid:
        from studio.teachers.shapeworld_video import make_shapeworld_video_exact

        exact = make_shapeworld_video_exact(num_frames=model.num_frames, resolution=model.native_resolution)
        hc = args.hybrid_cfg if args.hybrid_cfg is not None else best
        for s in args.hybrid:
            res["hybrid"][f"s>={s},cfg{hc}"] = score(_sample((model, exact), static, args.steps, hc, args.seed, s),
                                                     static)
            print(f"hybrid s>={s}: {res['hybrid'][f's>={s},cfg{hc}']}", file=sys.stderr, flush=True)
    if args.all_prompts:
        allp = [p for p in video_prompts() for _ in range(args.per_prompt)]
        c = args.all_cfg if args.all_cfg is not None else best
        res["all_prompts"] = {"cfg": c, **score(_sample((model, None), allp, args.steps, c, args.seed), allp)}
        print(f"all prompts cfg {c}: {res['all_prompts']}", file=sys.stderr, flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
