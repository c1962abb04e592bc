"""Euphonium vs DanceGRPO (and Flow-GRPO) on ShapeWorld video: held-out reward against training steps.

Prints one JSON object. Every run improves the shipped ShapeWorld video model (``shapeworld-video-wan``, a LoRA)
with ``studio video rl`` (``methods.euphonium``) on the training prompts of the static-camera set and is evaluated
with the *plain* flow sampler (no reward model) on the held-out prompts (every 4th), fixed seeds:

* ``<method>_curves``: per seed, ``[[step, held-out reward], ...]`` (evaluation every ``eval_every`` steps);
* ``target_reward``: the fixed held-out reward target, the same for every method: the base policy's held-out
  reward plus ``--target-gain`` (in the reward's z-units);
* ``<method>_steps_to_target``: per seed the first evaluated step at or above the target (``null``: not reached),
  and the mean over the seeds that reached it; ``convergence_speedup`` = DanceGRPO's mean / Euphonium's mean
  (``null`` unless both reached the target in every seed; the paper reports 1.66x);
* ``<method>_final_reward`` / ``_motion_accuracy``: mean over seeds after the last step; ``base_*``: the policy
  before training;
* ``speedup_beyond_seed_spread``: every Euphonium seed reached the target before every DanceGRPO seed;
* ``inference_uses_prm``: read back from each student folder (``student.json``); the students sample with the
  plain sampler;
* ``seconds_per_step``: wall time per training step (rollouts with the PRM, GRPO update);
* ``rollout_reward_unguided`` / ``_guided`` and ``rollout_prm_*``: the base policy's rollouts on 16 training
  samples with the same noise, without and with the euphonium preset's PRM drift: whether the guidance raises the
  outcome reward (what Euphonium's speedup rests on) or only the PRM's own value.

``--quick`` (about 10-15 min on 2 busy cores): DanceGRPO and Euphonium, 2 seeds, 8 sampling steps, 2 prompts x
4 rollouts per step, 12 steps, evaluation every 4. The full run adds Flow-GRPO and Euphonium with the explicit distillation loss,
3 seeds, more steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from methods import run  # noqa: E402
from methods.euphonium import EuphoniumConfig, EuphoniumMethod  # noqa: E402


def one_run(name: str, overrides: dict, seed: int, common: dict, out: Path) -> dict:
    cfg = EuphoniumConfig(**{**common, **overrides, "seed": seed})
    t0 = time.perf_counter()
    m = run(cfg, EuphoniumMethod(), out / f"{name}_{seed}", progress=False)
    meta = json.loads((Path(m["student"]) / "student.json").read_text())
    curve = [[0, m["eval_before"]["reward"]]] + [[r["step"], r["reward"]] for r in m["curve"]] + \
        [[cfg.steps, m["eval_after"]["reward"]]]
    return {"curve": curve, "before": m["eval_before"], "after": m["eval_after"],
            "seconds_per_step": m["seconds_per_step"], "wall": round(time.perf_counter() - t0, 1),
            "inference_uses_prm": bool(meta.get("reward_model_at_inference", True))}


@torch.no_grad()
def guidance_effect(common: dict, guidance: float, batch_prompts: int = 8) -> dict:
    """Does the PRM drift raise the *outcome* reward of the rollouts themselves? The base policy's SDE rollouts
    (same noise, same prompts: 2 of each of the first training prompts) without and with the guidance of the
    euphonium preset; outcome reward and the PRM's value of the final samples."""
    from methods.euphonium import EuphoniumConfig, preset_values
    from studio.runs.video_distill import resolve_prompts
    from studio.runs.video_rl import load_outcome_reward, split_prompts
    from studio.teachers.process_reward import load_process_reward
    from studio.teachers.registry import load_video_teacher
    from studio.teachers.sampling import flow_sde_rollout, shifted_sigmas

    policy = load_video_teacher(common["policy"])
    train, _ = split_prompts(resolve_prompts(common["prompts"]), common["held_out_every"])
    prompts = [p for p in train[:batch_prompts] for _ in range(2)]
    cond = policy.encode_prompt(prompts)
    reward = load_outcome_reward(common["reward"])
    cfg = EuphoniumConfig(**{**common, "guidance": guidance})
    form, level, prm_name, _ = preset_values(cfg)
    prm = load_process_reward(prm_name)
    N = int(cfg.sampling_steps)
    sigmas = shifted_sigmas(N, float(policy.schedule.shift))
    window = ((3 * N) // 4, -1, 1)

    def velocity(x, s):
        t = policy.schedule.timestep_from_sigma(torch.full((x.shape[0],), float(s), dtype=torch.float64))
        return policy.predict(x, t, cond, guidance_scale=float(cfg.guidance_scale), output="flow")

    x = policy.noise(len(prompts), seed=4321)
    out = {}
    for name, c_g in (("unguided", 0.0), ("guided", guidance)):
        roll = flow_sde_rollout(velocity, x, sigmas, form=form, noise_level=level,
                                generator=torch.Generator().manual_seed(5), process_reward=prm.bind(prompts),
                                guidance_scale=c_g, window=window)
        final = roll["latents"][:, -1]
        out[f"rollout_reward_{name}"] = round(float(reward(policy.decode(final).float(), prompts).mean()), 5)
        out[f"rollout_prm_{name}"] = round(float(prm.reward(final, float(sigmas[-2]), prompts).mean()), 5)
    return out


def steps_to(curve, target):
    for step, r in curve:
        if r >= target:
            return step
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--target-gain", type=float, default=0.15)
    ap.add_argument("--guidance", type=float, default=None, help="c_g of the PRM gradient (default: the method's)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--explicit", action="store_true", help="with --quick: also Euphonium with the explicit distillation loss")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    seeds = list(range(args.seeds or (2 if quick else 3)))
    common = dict(policy="shapeworld-video-wan", prompts="static", held_out_every=4, reward="shapeworld",
                  steps=args.steps or (12 if quick else 60), sampling_steps=8 if quick else 16, group_size=4,
                  prompts_per_step=2, lr=args.lr, guidance_scale=1.0, eval_every=4 if quick else 10, eval_samples=2,
                  checkpoint_every=1000)
    eu = {"preset": "euphonium", **({"guidance": args.guidance} if args.guidance is not None else {})}
    methods = {"dance_grpo": {"preset": "dance-grpo"}, "euphonium": eu}
    if not quick:
        methods["flow_grpo"] = {"preset": "flow-grpo"}
    if not quick or args.explicit:
        methods["euphonium_explicit"] = {**eu, "distill": "explicit"}
    t0 = time.perf_counter()
    effect = guidance_effect(common, eu.get("guidance", EuphoniumConfig.guidance))
    print(f"guidance effect: {json.dumps(effect)}", file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in methods.items():
            results[name] = [one_run(name, over, s, common, Path(tmp)) for s in seeds]
            print(f"{name}: " + json.dumps([r["curve"] for r in results[name]]), file=sys.stderr, flush=True)
    base = results["dance_grpo"][0]["before"]
    target = round(base["reward"] + args.target_gain, 5)
    out: dict = {"policy": common["policy"], "quick": quick, "seeds": seeds, "steps": common["steps"],
                 "sampling_steps": common["sampling_steps"], "rollouts_per_step": 8,
                 "target_reward": target, "base_reward": base["reward"],
                 "base_motion_accuracy": base.get("motion_accuracy")}
    means = {}
    for name, rs in results.items():
        st = [steps_to(r["curve"], target) for r in rs]
        reached = [s for s in st if s is not None]
        means[name] = statistics.mean(reached) if len(reached) == len(st) else None
        out[f"{name}_steps_to_target_per_seed"] = st
        out[f"{name}_steps_to_target"] = means[name]
        out[f"{name}_final_reward"] = round(statistics.mean(r["after"]["reward"] for r in rs), 5)
        out[f"{name}_final_reward_per_seed"] = [r["after"]["reward"] for r in rs]
        if "motion_accuracy" in rs[0]["after"]:
            out[f"{name}_motion_accuracy"] = round(statistics.mean(r["after"]["motion_accuracy"] for r in rs), 5)
        out[f"{name}_curves"] = [r["curve"] for r in rs]
        out[f"{name}_seconds_per_step"] = round(statistics.mean(r["seconds_per_step"] for r in rs), 3)
    d, e = means.get("dance_grpo"), means.get("euphonium")
    out["convergence_speedup"] = round(d / e, 3) if d and e else None
    de, ee = out["dance_grpo_steps_to_target_per_seed"], out["euphonium_steps_to_target_per_seed"]
    out["speedup_beyond_seed_spread"] = (None not in de + ee) and max(ee) < min(de)
    out.update(effect)
    out["inference_uses_prm"] = any(r["inference_uses_prm"] for rs in results.values() for r in rs)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
