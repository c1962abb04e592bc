#!/usr/bin/env python
"""Train ``shapeworld-unet``: a tiny text-to-image diffusion model of ShapeWorld (pixel space, 32x32).

What: the same diffusers / transformers classes as Stable Diffusion (``UNet2DConditionModel``,
``CLIPTextModel`` + ``CLIPTokenizer``, ``DDPMScheduler`` scaled_linear / epsilon), with tiny configs and
no VAE: the UNet denoises ``x = image * 2 - 1`` directly at 32x32 (64x64 costs ~5x more per step,
too slow to train on a 2-core CPU in the time budget). ``DiffusersTeacher.from_pretrained`` loads the
saved folder as a pixel-space teacher (``is_latent=False``, ``vae_scale_factor=1``).

Data: every ShapeWorld object (``studio.world.objects.list_objects()``, ``obj.gaussians(6000)``) rendered
once with the studio rasterizer on white from random orbit cameras (azimuth -180..180, elevation
-10..45 plus 10 % of views at 45..80 so "overhead view" occurs, radius 2.8..3.6, fovy 35..45), at 64x64
and downsampled (antialiased) to 32x32; by default 200 views per object, kept in memory. Captions
are drawn per step: the empty caption with p=0.1 (for classifier-free guidance), the bare object prompt
with p=0.2, otherwise ``"<prompt>, <view>"`` from ``studio.teachers.prompts.view_prompts`` (front / side
/ back / overhead; side views say "left side view" / "right side view" half of the time).

Training: UNet and text encoder jointly, AdamW, epsilon MSE, uniform timesteps, linear warm-up then
cosine decay, EMA of the weights (the EMA weights are saved), seeded. On 2 shared CPU cores one step
(batch 16) takes 0.5-2 s depending on load. The shipped model (``assets/shapeworld-unet``; its
``training.json`` has the exact settings, both loss curves, wall times and the quality check) is two
rounds, 4000 steps, ~89 min on a shared 2-core CPU::

    python scripts/train_shapeworld_unet.py --out /tmp/swrun/model --steps 2400 --seed 0 --threads auto
    python scripts/train_shapeworld_unet.py --out assets/shapeworld-unet --init-from /tmp/swrun/model \
        --steps 1600 --lr 5e-4 --warmup 50 --seed 1 --threads auto

Its check (DDIM 30 + CFG 4 samples of every object x front/side/back prompt, nearest training render):
the right object for 98 % of samples, the right side (front vs back) for 58 % of the objects whose
front and back differ.

The output folder gets ``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
(each written with ``save_pretrained``, weights as safetensors), ``training.json`` and ``samples.png``
(DDIM samples with CFG, one row per prompt). With the same seed and thread count the result is the same
on the same machine (``--threads auto`` re-picks 1 or 2 threads every 100 steps by measured speed, so it is not bit-exact).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.students.ema import EMA
from studio.train.tiny_teacher import save_grid, write_folder_atomically

RESOLUTION = 32
MAX_TOKENS = 32

#: words that get whole-word BPE merges (all words of the ShapeWorld prompts and view phrases, plus some
#: common ones); other words fall back to byte symbols
VOCAB_WORDS = (
    "a an the of and with on in at to is red green blue yellow white black purple orange brown grey gray "
    "cream pink cube ball sphere cone torus cylinder pyramid box snowman carrot nose house front door wall "
    "roof mushroom cap stem tree trunk wooden table back clock face penguin belly beak chair car dog cat "
    "side left right overhead view views top bottom photo picture render high quality blurry low bad "
    "unrealistic object 3d"
).split()


def make_tokenizer(folder: Path, words=VOCAB_WORDS, model_max_length: int = MAX_TOKENS):
    """An offline byte-level BPE ``CLIPTokenizer`` (all 256 byte symbols + whole-word merges for ``words``)."""
    from studio.teachers.offline_tokenizer import make_clip_tokenizer

    return make_clip_tokenizer(folder, words, model_max_length)


# --------------------------------------------------------------------------- model
def build_models(tokenizer, seed: int, beta_schedule: str = "scaled_linear"):
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.train.tiny_teacher import ddpm_scheduler, tiny_unet

    unet = tiny_unet(RESOLUTION, 3, seed)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = ddpm_scheduler(beta_schedule)
    return unet, text_encoder, scheduler


# --------------------------------------------------------------------------- data
def render_dataset(views_per_object: int, seed: int, n_gaussians: int = 6000, render_size: int = 64,
                   overhead_fraction: float = 0.1):
    """Renders ``[N,3,32,32]`` in [0,1], object index ``[N]``, azimuth ``[N]``, elevation ``[N]`` (degrees)."""
    from studio.cameras import OrbitSampler
    from studio.world.objects import list_objects
    from studio.world.references import render_gaussian_views

    objs = list_objects()
    gen = torch.Generator().manual_seed(seed + 12345)
    n_over = int(round(views_per_object * overhead_fraction))
    common = dict(azimuth_range=(-180.0, 180.0), radius_range=(2.8, 3.6), fovy_range=(35.0, 45.0),
                  width=render_size, height=render_size)
    main = OrbitSampler(elevation_range=(-10.0, 45.0), **common)
    over = OrbitSampler(elevation_range=(45.0, 80.0), **common)
    images, labels, azims, elevs = [], [], [], []
    for i, obj in enumerate(objs):
        g = obj.gaussians(n_gaussians, seed=seed + i)
        parts = [main.sample(views_per_object - n_over, gen)] + ([over.sample(n_over, gen)] if n_over else [])
        for s in parts:
            img = render_gaussian_views(g, s.cameras, background=(1.0, 1.0, 1.0))["images"].permute(0, 3, 1, 2)
            img = F.interpolate(img, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                                antialias=True).clamp(0, 1)
            images.append(img)
            labels.append(torch.full((len(img),), i, dtype=torch.long))
            azims.append(s.azimuth.float())
            elevs.append(s.elevation.float())
        print(f"  rendered {obj.name}: {views_per_object} views", flush=True)
    return torch.cat(images), torch.cat(labels), torch.cat(azims), torch.cat(elevs)


def caption_table(objs, azims: torch.Tensor, elevs: torch.Tensor, labels: torch.Tensor):
    """Per image: (bare prompt, discrete view prompt, left/right view prompt)."""
    from studio.teachers.prompts import view_prompts

    out = []
    for lab, az, el in zip(labels.tolist(), azims.tolist(), elevs.tolist()):
        p = objs[lab].prompt
        out.append((p, view_prompts(p, [az], [el])[0], view_prompts(p, [az], [el], mode="left_right")[0]))
    return out


def pick_captions(rows, gen: torch.Generator, p_empty: float = 0.1, p_bare: float = 0.2) -> list[str]:
    caps = []
    r = torch.rand(len(rows), 2, generator=gen).tolist()
    for (bare, view, lr), (u, v) in zip(rows, r):
        if u < p_empty:
            caps.append("")
        elif u < p_empty + p_bare:
            caps.append(bare)
        else:
            caps.append(lr if v < 0.5 else view)
    return caps


# --------------------------------------------------------------------------- quality check
@torch.no_grad()
def evaluate(out: Path, images: torch.Tensor, labels: torch.Tensor, azims: torch.Tensor, seed: int,
             steps: int = 30, guidance: float = 4.0, per_prompt: int = 4) -> dict:
    """Sample every object x {front, side, back} view prompt (``per_prompt`` seeds each) with DDIM + CFG and
    score the samples against the training renders: nearest render's object (pixel L2), closest object
    mean foreground colour, and for objects whose front and back differ, whether the nearest render of the
    right object shows the asked side. Writes ``samples.png`` (one row per object: front, side, back)."""
    from studio.teachers.diffusers_sd import DiffusersTeacher
    from studio.teachers.shapeworld_unet import ddim_sample, foreground_mean
    from studio.world.objects import list_objects

    objs = list_objects()
    teacher = DiffusersTeacher.from_pretrained(str(out), device="cpu")
    views = ("front view", "side view", "back view")
    prompts, obj_idx, view_idx = [], [], []
    for i, o in enumerate(objs):
        for v, view in enumerate(views):
            prompts += [f"{o.prompt}, {view}"] * per_prompt
            obj_idx += [i] * per_prompt
            view_idx += [v] * per_prompt
    samples = []
    for s in range(0, len(prompts), 48):
        samples.append(ddim_sample(teacher, prompts[s: s + 48], steps=steps, guidance_scale=guidance,
                                   seed=seed + s, prior_mean=1.0))
    samples = torch.cat(samples)
    obj_idx, view_idx = torch.tensor(obj_idx), torch.tensor(view_idx)
    ref_col = torch.stack([foreground_mean(images[labels == i]).mean(0) for i in range(len(objs))])
    col = foreground_mean(samples)
    col_pred = torch.cdist(col, ref_col).argmin(1)
    d = torch.cdist(samples.flatten(1), images.flatten(1))
    nn = d.argmin(1)
    nn_pred = labels[nn]
    # front/back: among the renders of the asked object, is the nearest one seen from the asked side?
    fb_ok, fb_n = 0, 0
    for k in range(len(prompts)):
        o = objs[int(obj_idx[k])]
        if not o.front_back_differ or int(view_idx[k]) == 1:
            continue
        own = (labels == obj_idx[k]).nonzero().squeeze(1)
        j = own[d[k, own].argmin()]
        front = abs(float(azims[j])) < 90
        fb_ok += int(front == (int(view_idx[k]) == 0))
        fb_n += 1
    per_object = {o.name: {"nn_acc": float((nn_pred[obj_idx == i] == i).float().mean()),
                           "color_acc": float((col_pred[obj_idx == i] == i).float().mean()),
                           "color": [round(float(c), 3) for c in col[obj_idx == i].mean(0)],
                           "ref_color": [round(float(c), 3) for c in ref_col[i]]}
                  for i, o in enumerate(objs)}
    grid = samples.reshape(len(objs), len(views), per_prompt, *samples.shape[1:])[:, :, :2]
    save_grid(grid.reshape(-1, *samples.shape[1:]), out / "samples.png", ncol=len(views) * 2)
    return {
        "sampler": f"DDIM {steps} steps, CFG {guidance}, x0 clamped, prior_mean=1 (white), {per_prompt} seeds "
                   "per prompt; foreground = pixels > 0.12 away from the border colour",
        "prompts": "every object x (front, side, back) view",
        "nearest_render_object_acc": round(float((nn_pred == obj_idx).float().mean()), 4),
        "foreground_color_object_acc": round(float((col_pred == obj_idx).float().mean()), 4),
        "front_back_nearest_view_acc": round(fb_ok / max(1, fb_n), 4),
        "mean_color_error": round(float((col - ref_col[obj_idx]).norm(dim=1).mean()), 4),
        "samples_png": "samples.png: rows = objects (list_objects order), columns = front, front, side, side, "
                       "back, back",
        "per_object": per_object,
    }


# --------------------------------------------------------------------------- training
def save_model(out: Path, unet, text_encoder, tokenizer, scheduler, info: dict) -> None:
    """Write the pipeline folder atomically-ish (temp folder, then swap)."""
    import diffusers

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "_studio_note": "pixel-space (no vae): the UNet denoises image*2-1 at sample_size",
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")

    write_folder_atomically(out, write)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/shapeworld-unet")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-empty", type=float, default=0.1, help="probability of the empty caption (CFG)")
    ap.add_argument("--p-bare", type=float, default=0.2, help="probability of the prompt without a view phrase")
    ap.add_argument("--save-every", type=int, default=400,
                    help="also write the EMA weights every N steps to <out>.partial (0: never)")
    ap.add_argument("--init-from", default=None,
                    help="continue training the model saved in this folder (new optimizer and LR schedule)")
    ap.add_argument("--beta-schedule", choices=("linear", "scaled_linear"), default="scaled_linear",
                    help="DDPM betas: SD's 'scaled_linear' (the shipped model) or pixel-DDPM 'linear' 1e-4..0.02 (untested)")
    ap.add_argument("--views-per-object", type=int, default=200)
    ap.add_argument("--n-gaussians", type=int, default=6000)
    ap.add_argument("--threads", default="0", help="torch threads: 0 = torch default, N, or 'auto'")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--eval-only", action="store_true",
                    help="only re-run the quality check of the model in --out (updates training.json, samples.png)")
    args = ap.parse_args(argv)

    from studio.world.objects import list_objects

    auto_threads = args.threads == "auto"
    if auto_threads:
        torch.set_num_threads(1)  # rendering: one thread never oversubscribes a shared CPU
    elif int(args.threads) > 0:
        torch.set_num_threads(int(args.threads))
    torch.manual_seed(args.seed)
    t_start = time.time()
    out = Path(args.out)

    objs = list_objects()
    print(f"rendering {len(objs)} objects x {args.views_per_object} views ...", flush=True)
    images, labels, azims, elevs = render_dataset(args.views_per_object, args.seed, args.n_gaussians)
    rows = caption_table(objs, azims, elevs, labels)
    t_data = time.time() - t_start
    print(f"dataset {tuple(images.shape)} in {t_data:.0f}s", flush=True)
    if args.eval_only:
        info = json.loads((out / "training.json").read_text())
        info["quality"] = evaluate(out, images, labels, azims, args.seed, args.sample_steps, args.guidance)
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        print("quality:", json.dumps({k: v for k, v in info["quality"].items() if k != "per_object"}), flush=True)
        return 0

    tok_dir = Path(tempfile.mkdtemp(prefix="sw_tok_"))
    tokenizer = make_tokenizer(tok_dir)
    unet, text_encoder, scheduler = build_models(tokenizer, args.seed, args.beta_schedule)
    previous = None
    if args.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        src = Path(args.init_from)
        unet = UNet2DConditionModel.from_pretrained(str(src / "unet"))
        text_encoder = CLIPTextModel.from_pretrained(str(src / "text_encoder"))
        previous = json.loads((src / "training.json").read_text()) if (src / "training.json").is_file() else None
        assert tokenizer.get_vocab() == type(tokenizer).from_pretrained(str(src / "tokenizer")).get_vocab()
        print(f"continuing from {src}", flush=True)
    all_caps = sorted({c for r in rows for c in r} | {""})
    lengths = [len(ids) for ids in tokenizer(all_caps)["input_ids"]]
    assert max(lengths) <= MAX_TOKENS, f"caption too long for {MAX_TOKENS} tokens: {max(lengths)}"
    ids_of = {c: tokenizer(c, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
              for c in all_caps}
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, {len(all_caps)} captions, "
          f"longest {max(lengths)} tokens", flush=True)

    abar = scheduler.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-2)
    ema = EMA([unet, text_encoder], args.ema)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x_data = images * 2 - 1
    N = len(x_data)
    unet.train()
    text_encoder.train()
    losses, curve = [], []
    thread_choice, t_train = None, time.time()
    step_times: dict[int, list[float]] = {1: [], 2: []}
    for step in range(args.steps):
        if auto_threads:  # re-measure 1 vs 2 threads every 100 steps (the CPU may be shared)
            phase = step % 100
            if phase < 8:
                thread_choice = 1 if phase < 4 else 2
                if phase == 0:
                    step_times = {1: [], 2: []}
            elif phase == 8:
                thread_choice = min(step_times, key=lambda k: sorted(step_times[k])[len(step_times[k]) // 2])
            torch.set_num_threads(thread_choice)
        t0 = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, args.steps))))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        idx = torch.randint(0, N, (args.batch_size,), generator=gen)
        x0 = x_data[idx]
        caps = pick_captions([rows[i] for i in idx.tolist()], gen, args.p_empty, args.p_bare)
        ids = torch.stack([ids_of[c] for c in caps])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(ids)[0]
        pred = unet(x_t, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.item())
        if auto_threads and step % 100 < 8:
            step_times[thread_choice].append(time.time() - t0)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            ema.swap()
            save_model(out.parent / f"{out.name}.partial", unet, text_encoder, tokenizer, scheduler,
                       {"partial": True, "step": step + 1, "command": " ".join(sys.argv)})
            ema.swap()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            m = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            curve.append([step + 1, round(m, 5)])
            el = time.time() - t_train
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} loss {m:.4f} lr {lr:.2e} {el / (step + 1):.2f}s/step "
                  f"elapsed {el / 60:.1f}min eta {eta / 60:.1f}min"
                  + (f" threads {thread_choice}" if auto_threads else ""), flush=True)
    train_time = time.time() - t_train
    ema.copy_to()
    unet.eval()
    text_encoder.eval()
    final_loss = sum(losses[-200:]) / len(losses[-200:])

    stage = {
        "command": "python scripts/train_shapeworld_unet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "seed": args.seed, "threads": args.threads, "p_empty": args.p_empty, "p_bare": args.p_bare,
        "beta_schedule": args.beta_schedule, "init_from": args.init_from,
        "final_loss_last200": round(final_loss, 5),
        "loss_curve": curve, "train_seconds": round(train_time, 1),
    }
    stages = ((previous or {}).get("stages") or ([] if previous is None else [
        {k: previous[k] for k in ("command", "steps", "batch_size", "lr", "warmup", "ema", "seed", "threads",
                                  "final_loss_last200", "loss_curve", "train_seconds") if k in previous}]))
    stages = stages + [stage]
    info = {
        "what": "shapeworld-unet: tiny pixel-space text-to-image diffusion model of ShapeWorld",
        "script": "scripts/train_shapeworld_unet.py",
        "command": "python scripts/train_shapeworld_unet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "resolution": RESOLUTION, "pixel_space": True, "max_tokens": MAX_TOKENS,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "lr_schedule": "linear warm-up, cosine to 0.1x", "optimizer": "AdamW(betas=(0.9,0.99), wd=0.01), clip 1.0",
        "ema": args.ema, "seed": args.seed, "threads": args.threads, "beta_schedule": args.beta_schedule,
        "data": {"objects": [o.name for o in objs], "views_per_object": args.views_per_object,
                 "n_gaussians": args.n_gaussians, "render_size": 64, "elevation": [-10, 45],
                 "overhead_elevation": [45, 80], "overhead_fraction": 0.1, "radius": [2.8, 3.6],
                 "fovy": [35, 45], "background": "white",
                 "captions": f"p={args.p_empty} empty, p={args.p_bare} bare prompt, else '<prompt>, <view>' "
                             "(side: 50% left/right)"},
        "final_loss_last200": round(final_loss, 5), "loss_curve": curve,
        "data_seconds": round(t_data, 1), "train_seconds": round(train_time, 1),
        "total_steps": sum(st["steps"] for st in stages),
        "total_train_seconds": round(sum(st["train_seconds"] for st in stages), 1),
        "stages": stages,
        "torch": torch.__version__,
    }
    save_model(out, unet, text_encoder, tokenizer, scheduler, info)
    shutil.rmtree(out.parent / f"{out.name}.partial", ignore_errors=True)
    shutil.rmtree(tok_dir, ignore_errors=True)
    print(f"saved to {out} (train {train_time / 60:.1f} min, final loss {final_loss:.4f})", flush=True)

    quality = evaluate(out, images, labels, azims, args.seed, args.sample_steps, args.guidance)
    info["quality"] = quality
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print("quality:", json.dumps({k: v for k, v in quality.items() if k != "per_object"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
