#!/usr/bin/env python
"""Train ``shapeworld-normals``: a tiny monocular normal estimator of ShapeWorld (32x32, camera space).

What: a diffusers ``UNet2DModel`` (``studio.teachers.normals.build_shapeworld_normals_unet``: blocks 32/48/64,
no attention, ~0.9 M parameters, timestep input unused) that maps an RGB render ``image * 2 - 1`` to 4
channels: unnormalised camera-space normals (the studio convention: OpenCV camera frame, outward, a surface
seen head-on is ``(0, 0, -1)``) and a foreground logit. It is the embedded (tier 2) stand-in for Marigold
in DreamPolish's surface polishing (``specs/placiddreamer_dreampolish.md`` 3.3.1).

Data: every ShapeWorld object's reference Gaussian set (``studio.world.references.reference_gaussians``,
``--n-gaussians`` per object) rendered with ``render_gaussian_views`` (premultiplied colour on black, alpha,
world normals -> ``world_to_camera_normals``) at 64x64 from random cameras, downsampled to 32x32 (area
average; normals alpha-weighted and renormalised). Cameras vary the field of view as polishing does: FoV
uniform in ``--fov`` (15-60 degrees), azimuth -180..180, elevation -20..60, and the distance solved so the
object's bounding sphere fills a fraction ``f`` of the frame (its angular radius = ``f * FoV / 2``):
``f ~ U(0.6, 0.9)`` for whole-object views, and for ``--closeup-fraction`` of the views ``f ~ U(1.2, 2.2)``
with the look-at target jittered inside the object (close-ups that cut the silhouette). Augmentations per
step: background composited over the premultiplied colour (white with p = 0.5, else a uniform random
colour), a per-channel gain in [0.85, 1.15] (students' colour fields are not the reference shading), and a
horizontal flip with p = 0.5 (which negates the x component of the camera-space normals).

Loss: ``sum(alpha * (1 - cos(n_pred, n_gt))) / sum(alpha)`` + ``--mask-weight`` x BCE(logit, alpha).
AdamW, linear warm-up then cosine to 0.1x, EMA of the weights (the EMA weights are saved), one thread by
default (``--threads 1``). Training stops at ``--steps`` or after ``--max-minutes`` of wall time, whichever
comes first; the cosine follows whichever fraction is further along, so the learning rate is annealed
either way (so a run on a busy machine is not step-for-step reproducible; ``training.json`` records the
steps done).

Evaluation (held out: other Gaussian samples of every object, other cameras from the same distribution,
rendered at 64x64 and estimated through the user-facing ``estimate()``, which resizes to 32 and back):
the mean angular error in degrees on the foreground (ground-truth alpha > 0.5), against the trivial
baselines "facing the camera" ``(0, 0, -1)`` and "facing the pixel's view ray"; also split into whole-object
views and close-ups.

Output folder (``write_folder_atomically``): ``config.json`` + ``diffusion_pytorch_model.safetensors`` (UNet
``save_pretrained``), ``normal_estimator.json`` (convention, resolution, channels), ``training.json``
(settings, loss curve, wall times, held-out errors) and ``samples.png`` (held-out rows: input, ground
truth, prediction, visualised as ``(x, -y, -z) * 0.5 + 0.5``)::

    python scripts/train_shapeworld_normals.py --out assets/shapeworld-normals
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

from studio.students.ema import EMA
from studio.train.tiny_teacher import save_grid, write_folder_atomically

RESOLUTION = 32
RENDER_SIZE = 64


# --------------------------------------------------------------------------- data
def sample_cameras(n: int, gen: torch.Generator, radius: float, *, fov=(15.0, 60.0), closeup_fraction: float = 0.2,
                   size: int = RENDER_SIZE):
    """``n`` cameras around an object of bounding radius ``radius`` (module doc); returns ``(Cameras,
    closeup [n] bool, fovy [n])``."""
    from studio.cameras import (
        Cameras,
        intrinsics_from_fov,
        look_at,
        spherical_to_position,
    )

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    fovy = u(*fov)
    closeup = torch.rand(n, generator=gen) < closeup_fraction
    fill = torch.where(closeup, u(1.2, 2.2), u(0.6, 0.9))
    half = torch.deg2rad(fovy / 2 * fill).clamp(max=math.radians(75.0))
    dist = (radius / torch.sin(half)).clamp_min(1.1 * radius)
    target = torch.where(closeup[:, None], (torch.rand(n, 3, generator=gen) * 2 - 1) * 0.5 * radius,
                         torch.zeros(n, 3))
    eyes = spherical_to_position(u(-20.0, 60.0), u(-180.0, 180.0), dist) + target
    cams = Cameras(look_at(eyes, target), intrinsics_from_fov(fovy, size, size), size, size)
    return cams, closeup, fovy


def downsample(rgb: torch.Tensor, alpha: torch.Tensor, normals: torch.Tensor, size: int):
    """``[N,H,W,c]`` renders -> ``[N,c,size,size]``: area-averaged premultiplied colour and alpha; normals
    alpha-weighted, averaged and renormalised (zero where nothing was rendered)."""
    def area(x):
        return F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="area")

    a = area(alpha)
    n = area(normals * alpha)
    norm = n.norm(dim=1, keepdim=True)
    n = torch.where(norm > 1e-6, n / norm.clamp_min(1e-6), torch.zeros_like(n))
    return area(rgb).clamp(0, 1), a.clamp(0, 1), n


def render_dataset(views_per_object: int, seed: int, n_gaussians: int, fov, closeup_fraction: float,
                   size: int = RESOLUTION, render_size: int = RENDER_SIZE, log: bool = True, exclude=()):
    """Premultiplied RGB ``[N,3,s,s]``, alpha ``[N,1,s,s]``, camera normals ``[N,3,s,s]``, object index
    ``[N]``, close-up flag ``[N]``, FoV ``[N]`` and the ``Cameras`` of every view (at ``render_size``)."""
    from studio.cameras import Cameras, world_to_camera_normals
    from studio.world.objects import list_objects
    from studio.world.references import reference_gaussians, render_gaussian_views

    gen = torch.Generator().manual_seed(seed + 4242)
    rgbs, alphas, normals, labels, closeups, fovs, cams_all = [], [], [], [], [], [], []
    for i, obj in enumerate(list_objects()):
        if obj.name in exclude:  # objects held out from training (--hold-out)
            continue
        g = reference_gaussians(obj, n_gaussians, seed=seed + i)
        radius = float(g["means"].norm(dim=-1).max()) * 1.02
        cams, closeup, fovy = sample_cameras(views_per_object, gen, radius, fov=fov,
                                             closeup_fraction=closeup_fraction, size=render_size)
        out = render_gaussian_views(g, cams, background=(0.0, 0.0, 0.0), normals=g["normals"])
        n_cam = world_to_camera_normals(out["normals"], cams.viewmats)
        if size == render_size:
            rgb, a, n = (out["images"].permute(0, 3, 1, 2), out["alphas"].permute(0, 3, 1, 2),
                         n_cam.permute(0, 3, 1, 2))
        else:
            rgb, a, n = downsample(out["images"], out["alphas"], n_cam, size)
        rgbs.append(rgb)
        alphas.append(a)
        normals.append(n)
        labels.append(torch.full((views_per_object,), i, dtype=torch.long))
        closeups.append(closeup)
        fovs.append(fovy)
        cams_all.append(cams)
        if log:
            print(f"  rendered {obj.name}: {views_per_object} views", flush=True)
    return (torch.cat(rgbs), torch.cat(alphas), torch.cat(normals), torch.cat(labels), torch.cat(closeups),
            torch.cat(fovs), Cameras.cat(cams_all))


def augment(rgb, alpha, normals, gen: torch.Generator):
    """Background composite, per-channel gain and horizontal flip (module doc)."""
    B = rgb.shape[0]
    white = torch.rand(B, 1, 1, 1, generator=gen) < 0.5
    bg = torch.where(white, torch.ones(B, 3, 1, 1), torch.rand(B, 3, 1, 1, generator=gen))
    gain = 0.85 + 0.3 * torch.rand(B, 3, 1, 1, generator=gen)
    img = ((rgb * gain).clamp(0, 1) + (1 - alpha) * bg).clamp(0, 1)
    flip = (torch.rand(B, generator=gen) < 0.5)[:, None, None, None]
    sign = torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    img = torch.where(flip, img.flip(-1), img)
    alpha = torch.where(flip, alpha.flip(-1), alpha)
    normals = torch.where(flip, normals.flip(-1) * sign, normals)
    return img, alpha, normals


def loss_fn(pred_n, logit, gt_n, alpha, mask_weight: float):
    cos = (pred_n * gt_n).sum(1, keepdim=True)
    normal_loss = (alpha * (1 - cos)).sum() / alpha.sum().clamp_min(1e-6)
    if logit is None or mask_weight <= 0:
        return normal_loss, normal_loss
    return normal_loss + mask_weight * F.binary_cross_entropy_with_logits(logit, alpha), normal_loss


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(est, data, batch: int = 32) -> dict:
    """Held-out angular errors (degrees) of ``est.estimate`` vs the trivial baselines (module doc)."""
    from studio.teachers.normals import (
        facing_camera_normals,
        mean_angular_error_deg,
        view_ray_normals,
    )

    rgb, alpha, normals, _labels, closeup, _fovy, cams = data
    img = (rgb + (1 - alpha)).clamp(0, 1)  # white background, as the reference renders
    preds = torch.cat([est.estimate(img[s: s + batch]) for s in range(0, len(img), batch)])
    fg = alpha > 0.5
    facing = facing_camera_normals(*normals.shape[:1], *normals.shape[2:])
    rays = view_ray_normals(cams)

    def errs(sel):
        m = fg & sel.view(-1, 1, 1, 1)
        return {"model": round(float(mean_angular_error_deg(preds, normals, m)), 2),
                "baseline_facing_camera": round(float(mean_angular_error_deg(facing, normals, m)), 2),
                "baseline_view_ray": round(float(mean_angular_error_deg(rays, normals, m)), 2),
                "views": int(sel.sum()), "foreground_pixels": int(m.sum())}

    everything = torch.ones_like(closeup)
    mask_iou = None
    _, masks = est.estimate_with_mask(img[:batch])
    if masks is not None:
        m_all = torch.cat([est.estimate_with_mask(img[s: s + batch])[1] for s in range(0, len(img), batch)]) > 0.5
        mask_iou = round(float((m_all & fg).sum() / (m_all | fg).sum().clamp_min(1)), 4)
    return {"all": errs(everything), "whole_object": errs(~closeup), "closeup": errs(closeup),
            "foreground_iou": mask_iou, "preds": preds}


def normal_vis(n: torch.Tensor) -> torch.Tensor:
    """Normal maps ``[B,3,H,W]`` as images: ``(x, -y, -z) * 0.5 + 0.5`` (the usual normal-map colours)."""
    return (n * torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1) * 0.5 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/shapeworld-normals")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--max-minutes", type=float, default=14.0, help="stop training after this wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--mask-weight", type=float, default=0.1)
    ap.add_argument("--views-per-object", type=int, default=300)
    ap.add_argument("--held-out-views", type=int, default=12, help="held-out views per object")
    ap.add_argument("--n-gaussians", type=int, default=6000)
    ap.add_argument("--fov", type=float, nargs=2, default=(15.0, 60.0))
    ap.add_argument("--closeup-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--hold-out", nargs="*", default=[],
                    help="object names never rendered for training (evaluation objects of DreamPolish's polishing)")
    args = ap.parse_args(argv)

    from studio.teachers.normals import (
        ShapeWorldNormalEstimator,
        build_shapeworld_normals_unet,
    )
    from studio.world.objects import list_objects

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out = Path(args.out)
    print(f"rendering {len(list_objects())} objects x {args.views_per_object} views ...", flush=True)
    unknown = sorted(set(args.hold_out) - {o.name for o in list_objects()})
    if unknown:
        raise SystemExit(f"--hold-out: unknown objects {unknown}; known: {[o.name for o in list_objects()]}")
    train = render_dataset(args.views_per_object, args.seed, args.n_gaussians, tuple(args.fov), args.closeup_fraction,
                           exclude=set(args.hold_out))
    held = render_dataset(args.held_out_views, args.seed + 1000, args.n_gaussians, tuple(args.fov),
                          args.closeup_fraction, size=RENDER_SIZE, log=False)
    held_obj = None
    if args.hold_out:  # the same evaluation restricted to the objects training never saw
        held_obj = render_dataset(args.held_out_views, args.seed + 1000, args.n_gaussians, tuple(args.fov),
                                  args.closeup_fraction, size=RENDER_SIZE, log=False,
                                  exclude={o.name for o in list_objects()} - set(args.hold_out))
    t_data = time.time() - t_start
    rgb, alpha, normals = train[:3]
    print(f"dataset {tuple(rgb.shape)} (+ {len(held[0])} held-out at {RENDER_SIZE}px) in {t_data:.0f}s", flush=True)

    est = ShapeWorldNormalEstimator(build_shapeworld_normals_unet(RESOLUTION, args.seed))
    unet = est.unet
    for p in unet.parameters():  # the estimator freezes itself; train its UNet here
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet {n_params / 1e6:.2f}M params", flush=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-2)
    ema = EMA(unet, args.ema)
    gen = torch.Generator().manual_seed(args.seed + 1)
    N = len(rgb)
    unet.train()
    losses, normal_losses, curve = [], [], []
    t_train = time.time()
    steps_done, stopped_early = 0, False
    for step in range(args.steps):
        # progress: the larger of the step and the wall-clock fractions, so the cosine decay ends on time
        frac = max(step / max(1, args.steps), (time.time() - t_train) / (args.max_minutes * 60))
        if frac >= 1.0:
            stopped_early = True
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        idx = torch.randint(0, N, (args.batch_size,), generator=gen)
        img, a, n_gt = augment(rgb[idx], alpha[idx], normals[idx], gen)
        pred_n, logit = est.predict_native(img)
        loss, nl = loss_fn(pred_n, logit, n_gt, a, args.mask_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.item())
        normal_losses.append(nl.item())
        steps_done = step + 1
        if steps_done % args.log_every == 0 or steps_done == args.steps:
            m = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            mn = sum(normal_losses[-args.log_every:]) / len(normal_losses[-args.log_every:])
            curve.append([steps_done, round(m, 5), round(mn, 5)])
            el = time.time() - t_train
            print(f"step {steps_done}/{args.steps} loss {m:.4f} (1-cos {mn:.4f}) lr {lr:.2e} "
                  f"{el / steps_done:.2f}s/step elapsed {el / 60:.1f}min", flush=True)
    train_time = time.time() - t_train
    ema.copy_to()
    est.freeze()

    t_eval = time.time()
    res = evaluate(est, held)
    preds = res.pop("preds")
    if held_obj is not None:
        r_obj = evaluate(est, held_obj)
        r_obj.pop("preds")
        res["held_out_objects_only"] = r_obj
    eval_time = time.time() - t_eval
    a = res["all"]
    verdict = ("better than both trivial baselines" if a["model"] < min(a["baseline_facing_camera"],
                                                                         a["baseline_view_ray"]) - 5
               else "NOT clearly better than the trivial baselines")
    print("held-out:", json.dumps(res), verdict, flush=True)

    last = normal_losses[-200:] or [float("nan")]
    info = {
        "what": "shapeworld-normals: tiny monocular camera-space normal estimator of ShapeWorld renders",
        "script": "scripts/train_shapeworld_normals.py",
        "command": "python scripts/train_shapeworld_normals.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "convention": "OpenCV camera frame (x right, y down, z forward), outward unit normals; head-on = (0,0,-1)",
        "resolution": RESOLUTION, "unet_params": n_params,
        "steps_planned": args.steps, "steps": steps_done, "stopped_early_by_time_cap": stopped_early,
        "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "lr_schedule": "linear warm-up, cosine to 0.1x over max(step / steps_planned, wall time / max_minutes)",
        "max_minutes": args.max_minutes,
        "optimizer": "AdamW(betas=(0.9,0.99), wd=0.01), clip 1.0", "ema": args.ema, "seed": args.seed,
        "threads": args.threads, "mask_weight": args.mask_weight,
        "loss": "sum(alpha * (1 - cos)) / sum(alpha) + mask_weight * BCE(foreground logit, alpha)",
        "data": {"objects": [o.name for o in list_objects() if o.name not in args.hold_out],
                 "held_out_objects": list(args.hold_out), "views_per_object": args.views_per_object,
                 "n_gaussians": args.n_gaussians, "render_size": RENDER_SIZE, "fov_deg": list(args.fov),
                 "elevation_deg": [-20, 60], "fill_fraction_whole": [0.6, 0.9], "fill_fraction_closeup": [1.2, 2.2],
                 "closeup_fraction": args.closeup_fraction,
                 "augmentation": "background white (p=0.5) or random colour; per-channel gain 0.85-1.15; "
                                 "horizontal flip (p=0.5, negates n_x)"},
        "final_normal_loss_last200": round(sum(last) / len(last), 5),
        "loss_curve": {"columns": ["step", "loss", "1-cos"], "rows": curve},
        "data_seconds": round(t_data, 1), "train_seconds": round(train_time, 1), "eval_seconds": round(eval_time, 1),
        "held_out": {
            "what": f"{args.held_out_views} views per object, other Gaussian samples (seed + 1000) and cameras, "
                    f"rendered at {RENDER_SIZE}px on white, estimated through estimate() (resize to "
                    f"{RESOLUTION} and back); mean angular error in degrees on ground-truth alpha > 0.5",
            **res, "verdict": verdict},
        "torch": torch.__version__,
    }

    def write(tmp: Path) -> None:
        est.write_files(tmp, {"training": "training.json"})
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        rgb_h, alpha_h, n_h = held[:3]
        k = torch.linspace(0, len(rgb_h) - 1, 8).round().long()
        img = (rgb_h[k] + (1 - alpha_h[k])).clamp(0, 1)
        fgk = alpha_h[k] > 0.5
        rows = [img, torch.where(fgk, normal_vis(n_h[k]), torch.ones_like(img)),
                torch.where(fgk, normal_vis(preds[k]), normal_vis(preds[k]) * 0.6 + 0.4)]
        save_grid(torch.cat(rows), tmp / "samples.png", ncol=8)

    write_folder_atomically(out, write)
    print(f"saved to {out} (train {train_time / 60:.1f} min, {steps_done} steps)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
