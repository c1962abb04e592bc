"""Train the tiny ShapeWorld video process reward model and ship it to ``assets/shapeworld-video-prm``.

Euphonium (spec 4.2) steers its rollouts with a *latent, noise-aware* process reward model ``R(x_sigma, sigma,
prompt)``. On ShapeWorld the exact one is known (:class:`studio.teachers.process_reward.ShapeWorldVideoProcessReward`
with ``support="all"``): the posterior of the exact video teacher's unconditional data (the first 4 reference
clips of each of the 63 default prompts, 252 clips) given ``x_sigma``, each clip scored by the ground-truth check
:func:`studio.world.video_metrics.motion_accuracy` against the asked prompt. This script fits a small network,
:class:`studio.teachers.process_reward.VideoPRMNet`, to that exact value:

* **Samples.** ``x0`` = a reference clip plus the teacher's smoothing noise (std 0.02): the exact teacher's data;
  ``sigma ~ U(0.02, 1)``; ``x_sigma = (1 - sigma) x0 + sigma eps``. The asked prompt is the clip's own prompt
  (1/2), the same object with another motion or camera (1/4: the hard negatives motion accuracy is about), or any
  prompt (1/4).
* **Target.** The exact value, computed in a vectorised form (one GEMM for the distances to the 252 references)
  that is checked against the class at start-up.
* **Loss.** Binary cross-entropy of the network's sigmoid output against the soft target; AdamW, cosine LR.

Held-out check (``training.json``): fresh ShapeWorld clips that are *not* references (``sample_clips``, seed
12345), each asked with its own prompt and with a same-object other-motion prompt, at sigma in {0.2, 0.4, 0.6, 0.8}:
mean absolute error against the exact value and the pairwise accuracy (own prompt scored above the other one).

Usage: ``OMP_NUM_THREADS=1 python scripts/train_shapeworld_prm.py [--minutes 8] [--out assets/shapeworld-video-prm]``
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.teachers.process_reward import ShapeWorldVideoProcessReward, VideoPRMNet  # noqa: E402
from studio.teachers.shapeworld_video import ShapeWorldVideoExactTeacher  # noqa: E402
from studio.world.clips import parse_video_prompt, sample_clips, video_prompt, video_prompts  # noqa: E402
from studio.world.video_metrics import motion_accuracy  # noqa: E402


def score_matrix(refs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``[P, K]``: motion accuracy of every reference clip against every prompt."""
    videos = ((refs.permute(0, 2, 1, 3, 4) + 1) / 2).float().clamp(0, 1)
    return torch.stack([motion_accuracy(videos, [p] * refs.shape[0], per_clip=True).double() for p in prompts])


def exact_values(x: torch.Tensor, sigma: torch.Tensor, pidx: torch.Tensor, refs_flat: torch.Tensor,
                 ref_sq: torch.Tensor, S: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The exact process reward of ``x [B,...]`` at ``sigma [B]`` for prompts ``pidx [B]`` (vectorised)."""
    xf = x.reshape(x.shape[0], -1).double()
    a = (1 - sigma).double()
    d2 = (xf * xf).sum(1, keepdim=True) - 2 * a[:, None] * (xf @ refs_flat.T) + (a * a)[:, None] * ref_sq[None]
    var = a * a * smoothing ** 2 + sigma.double() ** 2
    w = torch.softmax(-d2 / (2 * var[:, None]), dim=1)
    return (w * S[pidx]).sum(1)


def other_prompt(p: str, gen: torch.Generator, prompts: list[str]) -> str:
    """A prompt of the same object with another motion or camera."""
    shape, color, _, _ = parse_video_prompt(p)
    same = [q for q in prompts if parse_video_prompt(q)[:2] == (shape, color) and q != p]
    return same[int(torch.randint(len(same), (1,), generator=gen))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/shapeworld-video-prm")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()

    exact_teacher = ShapeWorldVideoExactTeacher()
    exact = ShapeWorldVideoProcessReward(exact_teacher, support="all")
    prompts = [video_prompt(*parse_video_prompt(p)) for p in exact_teacher.uncond_prompts]
    refs = exact_teacher.references("")  # [252,3,8,32,32] float64
    n_per = exact_teacher.uncond_refs_per_prompt
    ref_prompt = torch.arange(refs.shape[0]) // n_per
    S = score_matrix(refs, prompts)  # [63, 252]
    refs_flat = refs.reshape(refs.shape[0], -1)
    ref_sq = (refs_flat * refs_flat).sum(1)
    s0 = exact_teacher.smoothing
    print(f"references {tuple(refs.shape)}, scores {tuple(S.shape)} (own-prompt mean "
          f"{float(S[ref_prompt, torch.arange(refs.shape[0])].mean()):.3f}, all mean {float(S.mean()):.3f}) "
          f"in {time.time() - t_start:.1f}s", flush=True)

    # the vectorised target equals the class's value
    xs = (0.5 * refs[:3] + 0.5 * torch.randn(refs[:3].shape, generator=gen, dtype=torch.float64))
    chk_p = [prompts[0], prompts[5], prompts[17]]
    ref_v = exact.reward(xs, 0.5, chk_p)
    vec_v = exact_values(xs, torch.full((3,), 0.5, dtype=torch.float64), torch.tensor([0, 5, 17]), refs_flat, ref_sq,
                         S, s0)
    assert torch.allclose(ref_v, vec_v, atol=1e-9), (ref_v, vec_v)

    # held-out set: fresh (non-reference) clips, own prompt and a same-object other prompt, 4 noise levels
    hold_gen = torch.Generator().manual_seed(12345)
    hp = [prompts[int(i)] for i in torch.randint(len(prompts), (48,), generator=hold_gen)]
    hx0 = sample_clips(48, seed=12345, prompts=hp)["video"].permute(0, 2, 1, 3, 4).double() * 2 - 1
    hold = []
    for s in (0.2, 0.4, 0.6, 0.8):
        eps = torch.randn(hx0.shape, generator=hold_gen, dtype=torch.float64)
        x = (1 - s) * hx0 + s * eps
        other = [other_prompt(p, hold_gen, prompts) for p in hp]
        hold.append((s, x, hp, other))

    def held_out(net: VideoPRMNet) -> dict:
        rows = {}
        with torch.no_grad():
            for s, x, own, oth in hold:
                sig = torch.full((x.shape[0],), s, dtype=torch.float64)
                t_own = exact_values(x, sig, torch.tensor([prompts.index(p) for p in own]), refs_flat, ref_sq, S, s0)
                t_oth = exact_values(x, sig, torch.tensor([prompts.index(p) for p in oth]), refs_flat, ref_sq, S, s0)
                r_own = net.reward(x.float(), s, own).double()
                r_oth = net.reward(x.float(), s, oth).double()
                mae = float(torch.cat([(r_own - t_own).abs(), (r_oth - t_oth).abs()]).mean())
                rows[str(s)] = {"mae": round(mae, 4), "pair_accuracy": round(float((r_own > r_oth).double().mean()), 4),
                                "exact_pair_accuracy": round(float((t_own > t_oth).double().mean()), 4),
                                "mean_target_own": round(float(t_own.mean()), 4),
                                "mean_target_other": round(float(t_oth.mean()), 4)}
        return rows

    net = VideoPRMNet(width=args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    budget = args.minutes * 60.0
    t0 = time.time()
    curve, step, ema = [], 0, None
    while time.time() - t0 < budget:
        frac = min(1.0, (time.time() - t0) / budget)
        for grp in opt.param_groups:
            grp["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        B = args.batch
        idx = torch.randint(refs.shape[0], (B,), generator=gen)
        u = torch.rand(B, generator=gen)
        pidx = ref_prompt[idx].clone()
        for b in range(B):
            if u[b] >= 0.75:
                pidx[b] = int(torch.randint(len(prompts), (1,), generator=gen))
            elif u[b] >= 0.5:
                pidx[b] = prompts.index(other_prompt(prompts[int(pidx[b])], gen, prompts))
        sigma = 0.02 + 0.98 * torch.rand(B, generator=gen, dtype=torch.float64)
        x0 = refs[idx] + s0 * torch.randn(refs[idx].shape, generator=gen, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x = (1 - sigma).reshape(-1, 1, 1, 1, 1) * x0 + sigma.reshape(-1, 1, 1, 1, 1) * eps
        target = exact_values(x, sigma, pidx, refs_flat, ref_sq, S, s0).float().clamp(0, 1)
        logits = net.logits(x.float(), sigma.float(), [prompts[int(i)] for i in pidx])
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        mae = float((torch.sigmoid(logits.detach()) - target).abs().mean())
        ema = mae if ema is None else 0.98 * ema + 0.02 * mae
        step += 1
        if step % 50 == 0:
            curve.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": round(float(loss.detach()), 5),
                          "mae_ema": round(ema, 5)})
            print(curve[-1], flush=True)
    net.eval()
    rows = held_out(net)
    print(json.dumps(rows, indent=1), flush=True)
    info = {"model": "shapeworld-video-prm", "target": "exact ShapeWorld process reward (support='all', "
            "motion_accuracy of 252 references)", "steps": step, "batch": args.batch, "lr": args.lr,
            "seconds": round(time.time() - t_start, 1), "seed": args.seed,
            "parameters": sum(p.numel() for p in net.parameters())}
    out = Path(args.out)
    net.freeze().save_pretrained(out, info={"training": info})
    (out / "training.json").write_text(json.dumps({**info, "held_out": rows, "curve": curve,
                                                   "command": " ".join(sys.argv)}, indent=2))
    print(f"wrote {out} ({step} steps, {info['seconds']}s)")


if __name__ == "__main__":
    main()
