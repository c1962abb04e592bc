#!/usr/bin/env python
"""Train ``shapeworld-nv-unet``: a tiny novel-view diffusion model of ShapeWorld (Zero-1-to-3 layout, pixel space).

What: the classes of Zero123-XL's diffusers port (``UNet2DConditionModel``, ``CLIPVisionModelWithProjection``
+ ``CLIPImageProcessor``, the :class:`~studio.teachers.novel_view.CLIPCameraProjection` of
``[CLIP image embedding, pose] -> context``) with tiny configs and no VAE: the UNet denoises the target view
``x = image * 2 - 1`` at 32x32 with the reference image ``* 2 - 1`` concatenated on channels (6 input
channels), the cross-attention context is one token ``proj([CLIP(reference), d_polar, sin d_az, cos d_az,
d_radius])``. ``DDPMScheduler`` scaled_linear / epsilon as ``shapeworld-unet``. The saved folder loads with
``Zero123Teacher.from_pretrained`` / ``load_teacher("shapeworld-nv-unet")`` as a pixel-space Zero123 teacher.

Data: every ShapeWorld object (``obj.gaussians(6000)``) rendered once with the studio rasterizer on white at
64x64, downsampled (antialiased) to 32x32: ``--ref-views`` reference views at the reference camera of
``shapeworld-nv-exact`` (elevation 15, azimuth 0, radius 3.2, fovy 40; the first exact, the others with a
small jitter: elevation +-3, azimuth +-6 deg, radius +-0.1) and ``--target-views`` targets (azimuth
-180..180, elevation -10..45, radius 2.9..3.9 (PlacidDreamer's ring emulation uses 3.77), fovy 40). A training pair is (a reference view, a target
view) of the same object drawn per step; its relative pose is computed from the two actual cameras
(``d_polar = ref_elev - tgt_elev``, ``d_azimuth = tgt_az - ref_az`` wrapped to [-180, 180),
``d_radius = tgt_radius - ref_radius``).

Training: UNet + image encoder + camera projection jointly, AdamW, epsilon MSE, uniform timesteps, the
condition dropped (zero context **and** zero reference, Zero123's CFG branch) with p=0.1, linear warm-up then
cosine decay, EMA (saved), seeded. The EMA weights are written to ``--out`` every ``--save-every`` steps
(``training.json`` then says ``"partial": true``), so a run cut short leaves a usable model; continue one
with ``--init-from <folder>``.

Quality check (``--eval-only`` re-runs it): for every object, its exact reference render -> 4 target views
(d_azimuth 0, 90, 180, 270; d_polar 0, d_radius 0) sampled with DDIM + CFG (``sample_novel_views``);
PSNR against the exact target renders, and nearest-render object accuracy (is the sample closest to the
asked object's render among all objects' renders at that target camera). Baseline: the reference image
itself as the prediction ("copy" PSNR). ``samples.png``: one row per object: reference, then per view
sample and exact render.

Example (the shipped model; ``training.json`` has the exact command, settings, loss curve and quality)::

    OMP_NUM_THREADS=1 python scripts/train_shapeworld_nv_unet.py --out assets/shapeworld-nv-unet --steps 2000
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
REF_ELEVATION, REF_AZIMUTH, REF_RADIUS, FOVY = 15.0, 0.0, 3.2, 40.0
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
EVAL_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)


# --------------------------------------------------------------------------- model
def build_models(seed: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from studio.teachers.novel_view import CLIPCameraProjection
    from studio.train.tiny_teacher import ddpm_scheduler, tiny_unet

    unet = tiny_unet(RESOLUTION, 6, seed)
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=RESOLUTION,
        patch_size=8, projection_dim=64,
    ))
    torch.manual_seed(seed + 2)
    projection = CLIPCameraProjection(embedding_dim=64, additional_embeddings=4)
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION},
        do_center_crop=True, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    scheduler = ddpm_scheduler("scaled_linear")
    return unet, image_encoder, projection, feature_extractor, scheduler


def save_model(out: Path, unet, image_encoder, projection, feature_extractor, scheduler, info: dict) -> None:
    """Write the Zero123 pipeline folder (no vae: pixel space) atomically."""
    import diffusers

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
        projection.save_pretrained(tmp / "clip_camera_projection", safe_serialization=True)
        feature_extractor.save_pretrained(tmp / "feature_extractor")
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "Zero123Pipeline",
            "_diffusers_version": diffusers.__version__,
            "_studio_note": "pixel-space (no vae): the UNet denoises image*2-1 at sample_size with the reference "
                            "image*2-1 concatenated (6 input channels)",
            "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")

    write_folder_atomically(out, write)


# --------------------------------------------------------------------------- data
def _render(g, elev, azim, radius) -> torch.Tensor:
    from studio.cameras import orbit_cameras
    from studio.world.references import render_gaussian_views

    cams = orbit_cameras(elev, azim, radius, FOVY, RENDER_SIZE, RENDER_SIZE)
    img = render_gaussian_views(g, cams, background=(1.0, 1.0, 1.0))["images"].permute(0, 3, 1, 2)
    return F.interpolate(img, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def object_gaussians(seed: int, n_gaussians: int = 6000):
    from studio.world.objects import list_objects

    return [obj.gaussians(n_gaussians, seed=seed + i) for i, obj in enumerate(list_objects())]


def render_dataset(gaussians, ref_views: int, target_views: int, seed: int,
                   target_radius: tuple[float, float] = (2.9, 3.9)) -> dict:
    """Per object: reference views ``ref [O,R,3,32,32]`` with cameras ``ref_cam [O,R,3]`` (elevation, azimuth,
    radius; view 0 is the exact reference camera) and target views ``tgt [O,T,3,32,32]``, ``tgt_cam``."""
    gen = torch.Generator().manual_seed(seed + 12345)

    def u(lo, hi, n):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    refs, ref_cams, tgts, tgt_cams = [], [], [], []
    for g in gaussians:
        rc = torch.stack([REF_ELEVATION + u(-3, 3, ref_views), REF_AZIMUTH + u(-6, 6, ref_views),
                          REF_RADIUS + u(-0.1, 0.1, ref_views)], -1)
        rc[0] = torch.tensor([REF_ELEVATION, REF_AZIMUTH, REF_RADIUS])
        tc = torch.stack([u(-10, 45, target_views), u(-180, 180, target_views), u(*target_radius, target_views)], -1)
        refs.append(_render(g, rc[:, 0], rc[:, 1], rc[:, 2]))
        tgts.append(_render(g, tc[:, 0], tc[:, 1], tc[:, 2]))
        ref_cams.append(rc)
        tgt_cams.append(tc)
    return {"ref": torch.stack(refs), "ref_cam": torch.stack(ref_cams), "tgt": torch.stack(tgts),
            "tgt_cam": torch.stack(tgt_cams)}


def relative_pose(ref_cam: torch.Tensor, tgt_cam: torch.Tensor) -> torch.Tensor:
    """``[N,3]`` (d_polar_deg, d_azimuth_deg in [-180, 180), d_radius) from (elevation, azimuth, radius)."""
    d_polar = ref_cam[:, 0] - tgt_cam[:, 0]
    d_az = torch.remainder(tgt_cam[:, 1] - ref_cam[:, 1] + 180.0, 360.0) - 180.0
    return torch.stack([d_polar, d_az, tgt_cam[:, 2] - ref_cam[:, 2]], -1)


# --------------------------------------------------------------------------- quality check
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def evaluate(out: Path, gaussians, seed: int, steps: int = 30, guidances=(2.0,), seeds: int = 2) -> dict:
    from studio.teachers.novel_view import Zero123Teacher, sample_novel_views
    from studio.world.objects import list_objects

    objs = list_objects()
    teacher = Zero123Teacher.from_pretrained(str(out), device="cpu")
    O, V = len(objs), len(EVAL_AZIMUTHS)
    ref = torch.cat([_render(g, REF_ELEVATION, REF_AZIMUTH, REF_RADIUS) for g in gaussians])  # [O,3,32,32]
    exact = torch.stack([_render(g, REF_ELEVATION, torch.tensor(EVAL_AZIMUTHS) + REF_AZIMUTH, REF_RADIUS)
                         for g in gaussians])  # [O,V,3,32,32]
    result = {"sampler": f"DDIM {steps} steps (sample_novel_views: x0 clamped, white prior mean), {seeds} seeds",
              "views": "reference camera (elev 15, az 0, r 3.2) -> d_azimuth 0/90/180/270, d_polar 0, d_radius 0",
              "copy_baseline_psnr_by_view": {  # the reference image itself as the prediction (0: identical)
                  str(int(a)): round(float(psnr(ref, exact[:, v]).mean()), 3)
                  for v, a in enumerate(EVAL_AZIMUTHS) if a != 0},
              "by_guidance": {}}
    grid_samples = None
    for gs in guidances:
        samples = torch.empty(seeds, O, V, 3, RESOLUTION, RESOLUTION)
        for s in range(seeds):
            cond = teacher.encode_view(ref.repeat_interleave(V, 0), 0.0, torch.tensor(EVAL_AZIMUTHS).repeat(O), 0.0)
            samples[s] = sample_novel_views(teacher, cond, steps=steps, guidance_scale=gs,
                                            seed=seed + 1000 * s).reshape(O, V, 3, RESOLUTION, RESOLUTION)
        p = psnr(samples.flatten(0, 2), exact[None].expand_as(samples).flatten(0, 2)).reshape(seeds, O, V)
        d = (samples[:, :, :, None] - exact.transpose(0, 1)[None, None]).flatten(4).pow(2).sum(-1)  # [S,O,V,O']
        correct = (d.argmin(-1) == torch.arange(O)[None, :, None]).float()
        result["by_guidance"][str(gs)] = {
            "psnr": round(float(p.mean()), 3),
            "psnr_by_view": {str(int(a)): round(float(p[:, :, v].mean()), 3) for v, a in enumerate(EVAL_AZIMUTHS)},
            "nearest_render_object_acc": round(float(correct.mean()), 4),
            "nearest_render_object_acc_by_view": {str(int(a)): round(float(correct[:, :, v].mean()), 4)
                                                  for v, a in enumerate(EVAL_AZIMUTHS)},
            "per_object": {o.name: {"psnr": round(float(p[:, i].mean()), 3),
                                    "acc": round(float(correct[:, i].mean()), 3)} for i, o in enumerate(objs)},
        }
        if grid_samples is None:
            grid_samples = samples[0]
    rows = []
    for i in range(O):
        rows.append(ref[i:i + 1])
        for v in range(V):
            rows += [grid_samples[i, v:v + 1], exact[i, v:v + 1]]
    save_grid(torch.cat(rows), out / "samples.png", ncol=1 + 2 * V)
    result["samples_png"] = (f"samples.png: rows = objects (list_objects order); columns = reference, then per "
                             f"d_azimuth {list(EVAL_AZIMUTHS)}: sample (CFG {guidances[0]}, seed {seed}), exact render")
    return result


# --------------------------------------------------------------------------- training
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/shapeworld-nv-unet")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the condition (CFG)")
    ap.add_argument("--ref-views", type=int, default=24)
    ap.add_argument("--target-views", type=int, default=300)
    ap.add_argument("--target-radius", type=float, nargs=2, default=(2.9, 3.9),
                    help="radius range of the target views (3.9 covers PlacidDreamer's ring at 3.77)")
    ap.add_argument("--n-gaussians", type=int, default=6000)
    ap.add_argument("--save-every", type=int, default=200, help="write the EMA weights to --out every N steps")
    ap.add_argument("--init-from", default=None, help="continue training this folder (new optimizer / LR schedule)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--guidance", default="2.0,4.0", help="CFG scales of the quality check (comma-separated)")
    ap.add_argument("--eval-only", action="store_true", help="only re-run the quality check of --out")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args(argv)
    guidances = tuple(float(g) for g in args.guidance.split(","))

    from studio.teachers.novel_view import Zero123Teacher, zero123_pose
    from studio.teachers.schedule import NoiseSchedule
    from studio.world.objects import list_objects

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    command = "python scripts/train_shapeworld_nv_unet.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    gaussians = object_gaussians(args.seed, args.n_gaussians)
    if args.eval_only:
        info = json.loads((out / "training.json").read_text())
        info["quality"] = evaluate(out, gaussians, args.seed, args.sample_steps, guidances)
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        print("quality:", json.dumps({k: v for k, v in info["quality"].items()}), flush=True)
        return 0

    objs = list_objects()
    print(f"rendering {len(objs)} objects x ({args.ref_views} reference + {args.target_views} target) views",
          flush=True)
    data = render_dataset(gaussians, args.ref_views, args.target_views, args.seed, tuple(args.target_radius))
    t_data = time.time() - t_start
    print(f"dataset ref {tuple(data['ref'].shape)} tgt {tuple(data['tgt'].shape)} in {t_data:.0f}s", flush=True)

    unet, image_encoder, projection, feature_extractor, scheduler = build_models(args.seed)
    previous = None
    if args.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        from studio.teachers.novel_view import CLIPCameraProjection

        src = Path(args.init_from)
        unet = UNet2DConditionModel.from_pretrained(str(src / "unet"))
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(src / "image_encoder"))
        projection = CLIPCameraProjection.from_pretrained(str(src / "clip_camera_projection"))
        if (src / "training.json").is_file():
            previous = json.loads((src / "training.json").read_text())
        print(f"continuing from {src}", flush=True)
    modules = [unet, image_encoder, projection]
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in zip(("unet", "image_encoder", "projection"),
                                                                           modules)}
    print("params:", {k: f"{v / 1e6:.2f}M" for k, v in n_params.items()}, flush=True)
    # the teacher's own CLIP preprocessing (so training and inference see the same pixels)
    helper = Zero123Teacher(unet, None, image_encoder, projection, NoiseSchedule.from_diffusers(scheduler.config),
                            clip_size=RESOLUTION, clip_crop=RESOLUTION, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    for m in modules:
        m.requires_grad_(True)
        m.train()
    O, R = data["ref"].shape[:2]
    T = data["tgt"].shape[1]
    clip_px = helper.clip_pixels(data["ref"].flatten(0, 1)).reshape(O, R, 3, RESOLUTION, RESOLUTION)
    ref_x = data["ref"] * 2 - 1
    tgt_x = data["tgt"] * 2 - 1

    abar = scheduler.alphas_cumprod.float()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-2)
    ema = EMA(modules, args.ema)
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses, curve = [], []
    B = args.batch_size

    def settings() -> dict:
        return {
            "what": "shapeworld-nv-unet: tiny pixel-space novel-view (Zero-1-to-3 layout) diffusion model of "
                    "ShapeWorld",
            "script": "scripts/train_shapeworld_nv_unet.py", "command": command,
            "resolution": RESOLUTION, "pixel_space": True,
            "reference_camera": {"elevation": REF_ELEVATION, "azimuth": REF_AZIMUTH, "radius": REF_RADIUS,
                                 "fovy": FOVY},
            "steps": args.steps, "batch_size": B, "lr": args.lr, "warmup": args.warmup,
            "lr_schedule": "linear warm-up, cosine to 0.1x", "optimizer": "AdamW(betas=(0.9,0.99), wd=0.01), clip 1.0",
            "ema": args.ema, "seed": args.seed, "threads": args.threads, "p_uncond": args.p_uncond,
            "cfg_uncond": "zero context and zero reference image (model space)",
            "beta_schedule": "scaled_linear 0.00085..0.012, epsilon, 1000 steps",
            "params": n_params, "init_from": args.init_from,
            "data": {"objects": [o.name for o in objs], "ref_views": args.ref_views, "target_views": args.target_views,
                     "n_gaussians": args.n_gaussians, "render_size": RENDER_SIZE, "background": "white",
                     "reference_jitter": {"elevation": 3, "azimuth": 6, "radius": 0.1, "first_view_exact": True},
                     "target": {"elevation": [-10, 45], "azimuth": [-180, 180], "radius": list(args.target_radius),
                                "fovy": FOVY}},
            "data_seconds": round(t_data, 1), "torch": torch.__version__,
            "previous": previous,
        }

    t_train = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, args.steps))))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        o = torch.randint(0, O, (B,), generator=gen)
        r = torch.randint(0, R, (B,), generator=gen)
        k = torch.randint(0, T, (B,), generator=gen)
        pose = relative_pose(data["ref_cam"][o, r], data["tgt_cam"][o, k])
        x0, ref = tgt_x[o, k], ref_x[o, r]
        keep = (torch.rand(B, generator=gen) >= args.p_uncond).float()
        t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = image_encoder(pixel_values=clip_px[o, r]).image_embeds
        ctx = projection(torch.cat([emb, zero123_pose(pose[:, 0], pose[:, 1], pose[:, 2])], -1)[:, None])
        ctx = ctx * keep.view(-1, 1, 1)
        ref = ref * keep.view(-1, 1, 1, 1)
        pred = unet(torch.cat([x_t, ref], 1), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            print(f"step {step + 1}: non-finite loss, skipped", flush=True)
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            m = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            curve.append([step + 1, round(m, 5)])
            el = time.time() - t_train
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} loss {m:.4f} lr {lr:.2e} {el / (step + 1):.2f}s/step "
                  f"elapsed {el / 60:.1f}min eta {eta / 60:.1f}min", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            ema.swap()
            info = settings() | {"partial": True, "steps_done": step + 1, "loss_curve": curve,
                                 "train_seconds": round(time.time() - t_train, 1),
                                 "continue": f"python scripts/train_shapeworld_nv_unet.py --init-from {out} --out "
                                             f"{out} --steps N --warmup 20"}
            save_model(out, unet, image_encoder, projection, feature_extractor, scheduler, info)
            ema.swap()
    train_time = time.time() - t_train
    ema.copy_to()
    for m in modules:
        m.eval()
    final = sum(losses[-200:]) / max(1, len(losses[-200:]))
    info = settings() | {"partial": False, "steps_done": args.steps, "final_loss_last200": round(final, 5),
                         "loss_curve": curve, "train_seconds": round(train_time, 1)}
    save_model(out, unet, image_encoder, projection, feature_extractor, scheduler, info)
    print(f"saved to {out} (train {train_time / 60:.1f} min, final loss {final:.4f})", flush=True)
    if not args.no_eval:
        info["quality"] = evaluate(out, gaussians, args.seed, args.sample_steps, guidances)
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        print("quality:", json.dumps(info["quality"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
