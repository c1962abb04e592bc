"""Issue 19: locate why GRPO (DanceGRPO / Euphonium) lowers the held-out reward on the ShapeWorld video testbed.

Every probe runs the SAME code path as ``studio video rl`` (``methods.euphonium.EuphoniumStage`` -> flow-SDE
rollouts, ``studio.distill.grpo`` losses, the one Trainer); only the policy / prompts / knobs differ. Prints one
JSON line per run (the numbers go into docs/notes/issue19-locate.md).

    python scripts/euphonium_locate.py toy                 # 1: toy Gaussian flow policy, analytic reward
    python scripts/euphonium_locate.py video --steps 16    # 2: training-prompt reward vs held-out, + control
    python scripts/euphonium_locate.py guidance            # 3: c_g sweep of the PRM drift on rollouts
    python scripts/euphonium_locate.py video --preset euphonium --guidance 0.1

``video`` trains on a few fixed training prompts and measures, before and after, (a) the SDE-rollout outcome
reward on those prompts with fixed noise (what GRPO optimises), (b) the plain-sampler (ODE) reward on them and
(c) the plain-sampler reward on held-out prompts. ``--control shuffle`` permutes the advantages within each group
(same update size, no reward information): if the real run is no better than the control, the update carries no
reward signal at this scale.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402


def toy(args) -> None:
    from toy_flow_policy import train_toy

    from studio.teachers.process_reward import GaussianWorldReward

    runs = [("dance-grpo", {}), ("flow-grpo", {"preset": "flow-grpo"})]
    for cg in args.cg:
        runs.append((f"euphonium c_g={cg}", {"preset": "euphonium", "guidance": cg,
                                             "prm": GaussianWorldReward(0.0, 1.0, args.target, 1.0)}))
        runs.append((f"euphonium c_g={cg} guided-logprob", {"preset": "euphonium", "guidance": cg,
                                                            "logprob_mean": "guided",
                                                            "prm": GaussianWorldReward(0.0, 1.0, args.target, 1.0)}))
    for name, kw in runs:
        res = [train_toy(steps=args.steps, lr=args.lr, seed=s, target=args.target, shift=args.shift, **kw)
               for s in range(args.seeds)]
        first = [round(sum(r["train_reward"][:5]) / 5, 2) for r in res]
        last = [round(sum(r["train_reward"][-5:]) / 5, 2) for r in res]
        print(json.dumps({"probe": "toy", "run": name, "steps": args.steps, "lr": args.lr, "shift": args.shift,
                          "plain_expected_reward_before": round(res[0]["expected_before"], 3),
                          "plain_expected_reward_after": [round(r["expected_after"], 3) for r in res],
                          "rollout_reward_first5": first, "rollout_reward_last5": last,
                          "mean_after": [round(sum(r["mean"]) / len(r["mean"]), 3) for r in res]}), flush=True)


def _video_setup(args, **overrides):
    from methods.euphonium import EuphoniumConfig
    from studio.runs.video_distill import resolve_prompts
    from studio.runs.video_rl import load_outcome_reward, split_prompts
    from studio.students.video_lora import VideoLoRAStudent
    from studio.teachers.registry import load_video_teacher

    ref = load_video_teacher("shapeworld-video-wan")
    policy = VideoLoRAStudent(ref, rank=16, seed=args.seed)
    train, held = split_prompts(resolve_prompts("static"), 4)
    kw = dict(preset=args.preset, steps=args.steps, sampling_steps=8, group_size=args.group_size,
              prompts_per_step=args.prompts_per_step, lr=args.lr, guidance_scale=1.0, seed=args.seed,
              guidance=args.guidance, checkpoint_every=10_000)
    kw.update(overrides)
    return EuphoniumConfig(**kw), ref, policy, load_outcome_reward("shapeworld"), train, held


@torch.no_grad()
def sde_reward(stage, prompts: list[str], per_prompt: int, seed: int = 4321, guided: bool = False) -> float:
    """Mean outcome reward of SDE rollouts (the training sampler, unguided unless ``guided``) of ``stage.policy``
    on ``prompts``, fixed initial and SDE noise."""
    from studio.teachers.sampling import flow_sde_rollout

    plist = [p for p in prompts for _ in range(per_prompt)]
    cond = stage.policy.encode_prompt(plist)
    x = stage.policy.noise(len(plist), seed=seed)
    prm = stage.prm.bind(plist) if (guided and stage.prm is not None) else None
    roll = flow_sde_rollout(lambda z, s: stage.velocity(stage.policy, z, s, cond), x, stage.sigmas, form=stage.form,
                            noise_level=stage.noise_level, generator=torch.Generator().manual_seed(seed + 1),
                            process_reward=prm, guidance_scale=stage.cfg.guidance, window=stage.window)
    return round(float(stage.reward(stage.policy.decode(roll["latents"][:, -1]).float(), plist).mean()), 4)


def video(args) -> None:
    import methods.euphonium as eu
    from methods.euphonium import EuphoniumStage
    from studio.runs.skeleton import train_stages
    from studio.runs.video_rl import evaluate_policy

    cfg, ref, policy, reward, train, held = _video_setup(args)
    trained = train[: args.train_prompts]
    stage = EuphoniumStage(cfg, policy, ref, reward, trained)
    if args.control == "shuffle":  # permute the advantages within each group: same update size, no signal
        real = eu.group_advantages
        gen = torch.Generator().manual_seed(99)

        def shuffled(r, G, *a, **k):
            adv = real(r, G, *a, **k)
            g = adv.reshape(-1, G, *adv.shape[1:])
            perm = torch.stack([torch.randperm(G, generator=gen) for _ in range(g.shape[0])])
            return torch.stack([g[i, perm[i]] for i in range(g.shape[0])]).reshape(adv.shape)

        eu.group_advantages = shuffled

    def measure() -> dict:
        t0 = time.perf_counter()
        out = {"sde_train": sde_reward(stage, trained, args.eval_per_prompt),
               "ode_train": evaluate_policy(policy, trained, reward, steps=8, guidance_scale=1.0,
                                            samples=args.eval_per_prompt, seed=10_000)["reward"],
               "ode_held": evaluate_policy(policy, held, reward, steps=8, guidance_scale=1.0, samples=2,
                                           seed=10_000)["reward"],
               "sde_held": sde_reward(stage, held, 2)}
        if stage.prm is not None:
            out["sde_train_guided"] = sde_reward(stage, trained, args.eval_per_prompt, guided=True)
        out["eval_s"] = round(time.perf_counter() - t0, 1)
        return out

    before = measure()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        hist, _ = train_stages([stage], Path(tmp), seed=args.seed, progress=False, max_grad_norm=cfg.max_grad_norm,
                               checkpoint_every=10_000, preview_every=0)
    train_s = time.perf_counter() - t0
    after = measure()
    rew = [round(h["reward"], 3) for h in hist]
    print(json.dumps({"probe": "video", "preset": args.preset, "guidance": args.guidance, "control": args.control,
                      "lr": args.lr, "steps": args.steps, "seed": args.seed, "train_prompts": trained,
                      "group": [args.prompts_per_step, args.group_size], "before": before, "after": after,
                      "rollout_reward_per_step": rew, "s_per_step": round(train_s / args.steps, 2),
                      "ratio_max_dev": max(h.get("ratio_max_dev", 0.0) for h in hist)}), flush=True)


@torch.no_grad()
def guidance(args) -> None:
    """c_g sweep: the euphonium preset's PRM drift on the base policy's rollouts (same noise) -- outcome reward and
    the PRM's value of the final samples, and the size of the drift against the SDE noise."""
    from methods.euphonium import EuphoniumStage

    for cg in [0.0] + list(args.cg):
        cfg, ref, policy, reward, train, held = _video_setup(args, preset="euphonium", guidance=cg)
        trained = train[: args.train_prompts]
        stage = EuphoniumStage(cfg, policy, ref, reward, trained)
        plist = [p for p in trained for _ in range(args.eval_per_prompt)]
        x = policy.noise(len(plist), seed=4321)
        cond = policy.encode_prompt(plist)
        ratios = []
        prm = stage.prm.bind(plist)

        def probe(z, s):
            r, g = prm(z, s)
            ratios.append(float((cg * (1.0 / cfg.sampling_steps) * g).pow(2).mean().sqrt()) /
                          (stage.noise_level * (1.0 / cfg.sampling_steps) ** 0.5))
            return r, g

        from studio.teachers.sampling import flow_sde_rollout

        roll = flow_sde_rollout(lambda z, s: stage.velocity(policy, z, s, cond), x, stage.sigmas, form=stage.form,
                                noise_level=stage.noise_level, generator=torch.Generator().manual_seed(4322),
                                process_reward=probe, guidance_scale=cg, window=stage.window)
        final = roll["latents"][:, -1]
        r = reward(policy.decode(final).float(), plist)
        print(json.dumps({"probe": "guidance", "c_g": cg, "window": list(stage.window),
                          "rollout_outcome_reward": round(float(r.mean()), 4),
                          "prm_final": round(float(stage.prm.reward(final, float(stage.sigmas[-2]), plist).mean()), 4),
                          "drift_rms_over_noise_std": [round(v, 4) for v in ratios]}), flush=True)


def _pairwise_cos(grads: list) -> dict:
    G = torch.stack(grads)
    G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)
    C = G @ G.T
    off = C[~torch.eye(len(grads), dtype=torch.bool)]
    return {"mean_pairwise_cos": round(float(off.mean()), 4), "sd": round(float(off.std()), 4),
            "cos_of_halves_means": round(float(torch.nn.functional.cosine_similarity(
                G[: len(G) // 2].mean(0), G[len(G) // 2:].mean(0), dim=0)), 4)}


def gradcos(args) -> None:
    """Signal-to-noise of the GRPO gradient at the base policy: the cosine between gradient estimates of
    independent rollout batches (E[cos] = |g|^2 / (|g|^2 + noise^2 / batch): ~0 means the update is noise)."""
    from methods.euphonium import EuphoniumStage

    if args.toy:
        from toy_flow_policy import QuadraticReward, ToyGaussianFlowPolicy

        from methods.euphonium import EuphoniumConfig

        policy = ToyGaussianFlowPolicy(dim=4)
        cfg = EuphoniumConfig(preset=args.preset, steps=1, sampling_steps=8, group_size=args.group_size,
                              prompts_per_step=args.prompts_per_step, lr=0.05, guidance_scale=1.0, shift=5.0,
                              seed=args.seed)
        stage = EuphoniumStage(cfg, policy, policy, QuadraticReward(2.0), ["p0", "p1", "p2"])
    else:
        cfg, ref, policy, reward, train, held = _video_setup(args)
        stage = EuphoniumStage(cfg, policy, ref, reward, train[: args.train_prompts])
    params = policy.trainable_parameters()
    grads, t0 = [], time.perf_counter()
    for k in range(args.batches):
        out = stage.train_step(k, 0.0)
        gs = torch.autograd.grad(out.loss, params, allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in zip(gs, params)]).double())
    print(json.dumps({"probe": "gradcos", "toy": bool(args.toy), "preset": args.preset,
                      "train_prompts": None if args.toy else args.train_prompts,
                      "batch": [args.prompts_per_step, args.group_size], "batches": args.batches,
                      **_pairwise_cos(grads), "s": round(time.perf_counter() - t0, 1)}), flush=True)


@torch.no_grad()
def samplers(args) -> None:
    """The base policy's held-out reward under the evaluation sampler (flow Euler ODE) and the training sampler
    (the DanceGRPO SDE, no PRM), at several step counts, on the same prompts and seeds."""
    from methods.euphonium import EuphoniumStage
    from studio.runs.video_rl import evaluate_policy
    from studio.teachers.sampling import shifted_sigmas

    cfg, ref, policy, reward, train, held = _video_setup(args)
    stage = EuphoniumStage(cfg, policy, ref, reward, train)
    out = {"probe": "samplers", "prompts": "held-out (5 x 2 seeds)"}
    for n in args.sampler_steps:
        out[f"ode_{n}"] = evaluate_policy(ref, held, reward, steps=n, guidance_scale=1.0, samples=2,
                                          seed=10_000)["reward"]
        stage.sigmas = shifted_sigmas(n, float(ref.schedule.shift))
        out[f"sde_{n}"] = sde_reward(stage, held, 2)
    print(json.dumps(out), flush=True)


@torch.no_grad()
def residual_noise(args) -> None:
    """Does the outcome reward respond to the residual noise the SDE's last step leaves (std eta sqrt(Delta_last))?
    The base policy's plain-sampler (ODE, 8 steps) latents on the held-out prompts, scored clean and with Gaussian
    latent noise of the SDE's last-step std added before decoding."""
    from studio.teachers.sampling import flow_euler_sample

    _, ref, _, reward, _, held = _video_setup(args)
    plist = [p for p in held for _ in range(2)]
    lat = torch.cat([flow_euler_sample(ref, [p] * 2, steps=8, guidance_scale=1.0, seed=10_000 + 97 * i,
                                       output="latents") for i, p in enumerate(held)])
    out = {"probe": "residual_noise", "prompts": "held-out (5 x 2 seeds), ODE 8 steps"}
    gen = torch.Generator().manual_seed(7)
    for std in (0.0, 0.0625, 0.0884, 0.125):
        noisy = lat + std * torch.randn(lat.shape, generator=gen).to(lat.dtype)
        out[f"reward_std_{std}"] = round(float(reward(ref.decode(noisy).float(), plist).mean()), 4)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probe", choices=["toy", "video", "guidance", "gradcos", "samplers",
                                          "residual-noise"])
    ap.add_argument("--sampler-steps", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--toy", action="store_true", help="gradcos on the toy Gaussian policy")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--cg", type=float, nargs="*", default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--preset", default="dance-grpo")
    ap.add_argument("--guidance", type=float, default=10.0)
    ap.add_argument("--control", choices=["none", "shuffle"], default="none")
    ap.add_argument("--train-prompts", type=int, default=2)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--eval-per-prompt", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.probe == "toy":
        args.steps, args.lr = args.steps or 30, args.lr or 0.05
        toy(args)
    elif args.probe == "video":
        args.steps, args.lr = args.steps or 16, args.lr or 2e-4
        video(args)
    elif args.probe == "residual-noise":
        residual_noise(args)
    elif args.probe == "samplers":
        args.steps, args.lr = args.steps or 1, args.lr or 2e-4
        samplers(args)
    elif args.probe == "gradcos":
        args.steps, args.lr = args.steps or 1, args.lr or 2e-4
        gradcos(args)
    else:
        args.steps, args.lr = args.steps or 1, args.lr or 2e-4
        guidance(args)


if __name__ == "__main__":
    main()
