"""Train a small Latent-Plane (coarse + fine) on ShapeWorld and ship it to ``assets/latent-plane``.

The official PlacidDreamer release has no Latent-Plane training code (spec 2.3 and 2.7). Everything
here is our reconstruction:

* **Host features.** ShapeWorld has no multi-view UNet, so the "UNet features" are the 8 ring views
  rendered at 32x32 on white. The feature map is RGB plus 5 fixed random-conv channels
  (``methods.placiddreamer.latent_plane.networks.ShapeWorldFeatures``, ``feat_dim = 8``). As
  augmentation, Gaussian noise of std ``0.25 t`` is added with ``t ~ U(0, 1)``, and ``t * 1000`` is
  passed as the plane's scalar time input (sinusoidal embedding, ``time_embed_dim = 32``). This mirrors
  the noisy UNet features the official plane reads.
* **Scale.** Objects go into the unit cube with ``p_cube = 0.5 * p_world`` (``SHAPEWORLD_CUBE_SCALE``).
  Every ShapeWorld object lies within 0.9 world units of the origin, so within 0.45 in the cube. Each
  training scene is additionally rotated about +y by a random angle and scaled by ``U(0.85, 1.1)``.
* **Ground-truth occupancy** is the visual hull of 26 silhouettes rendered at 48 px from a Fibonacci
  sphere of directions, including views from below. This is tight for ShapeWorld's objects, which have
  no hidden cavities.
* **Losses** (one scene per step):
  1. occupancy BCE of the coarse plane's rendered occupancy against the true alpha, on random
     (foreground-balanced) pixels of the 8 ring views and of 8 held-out random views;
  2. density-grid BCE: ``sigmoid((softplus(sigma) - 15) / 3)`` against the occupancy of uniform and
     near-surface points, which calibrates the official marching-cubes level 15;
  3. fine rendering MSE. At ring pixels ``composite(noisy f, occ, rendered)`` must match the clean
     features. At held-out pixels, the features rendered over the white-background feature must match
     the true features of that view. The coarse sigma is detached for this loss.
* **Speed.** Training renders 16 uniform samples per ray (inference uses the official 32; density is a
  field, so the spacing changes but the occupancy does not). The widths are small: latent 16, 4 PE
  frequencies, and 4 attention heads of 8 channels, still one attention module applied twice.

It trains on 10 objects and holds out ``green_torus``, ``purple_cylinder``, ``mushroom`` and ``penguin``.
It writes ``model.safetensors``, ``config.json`` and ``training.json``: the loss curve, and per held-out
object the 3D IoU of the 64^3 grid against the visual-hull truth, the silhouette IoU at
``studio.world.held_out_cameras`` and the Chamfer distance, in world units, of the marching-cubes mesh
against the true surface (``studio.world.metrics.chamfer_to_surface``). The baseline is the visual hull
of the 8 ring views alone.

Usage: ``OMP_NUM_THREADS=1 python scripts/train_latent_plane.py [--minutes 16] [--seed 0]``
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.cameras import Cameras, orbit_cameras
from methods.placiddreamer.latent_plane.gaussian_init import density_to_mesh
from methods.placiddreamer.latent_plane.networks import (CoarsePlane, FinePlane, LatentPlane, ShapeWorldFeatures,
                                                         composite)
from methods.placiddreamer.latent_plane.ring import SHAPEWORLD_CUBE_SCALE, camera_rays, ring_cameras
from methods.placiddreamer.latent_plane.shapeworld_rings import transform_gaussians
from methods.placiddreamer.latent_plane.weights import LatentPlaneConfig, save_latent_plane
from studio.world import get_object, render_gaussian_views
from studio.world.metrics import chamfer_to_surface
from studio.world.references import held_out_cameras

TRAIN_OBJECTS = ["red_cube", "blue_ball", "yellow_cone", "snowman", "house", "orange_pyramid", "tree", "table",
                 "two_tone_box", "clock"]
HELD_OUT_OBJECTS = ["green_torus", "purple_cylinder", "mushroom", "penguin"]
RES = 32
LEVEL = 15.0
DENSITY_TAU = 3.0

COARSE_CFG = dict(feat_dim=8, time_embed_dim=32, latent_dim=16, time_dim=16, heads=4, dim_head=8, n_freqs=4,
                  n_layers=2, n_samples=32, grid_size=64, chunk=16384)
FINE_CFG = dict(feat_dim=8, heads=4, dim_head=8, n_freqs=4, n_layers=2, n_samples=32, chunk=16384)


def fibonacci_cameras(n: int, size: int, radius: float = 1.5) -> Cameras:
    i = torch.arange(n, dtype=torch.float32) + 0.5
    y = 1 - 2 * i / n
    elev = torch.rad2deg(torch.asin(y.clamp(-0.999, 0.999)))
    az = (i * 180.0 * (3 - math.sqrt(5))) % 360.0
    cams = orbit_cameras(elev, az, radius, 45.0, size, size)
    return Cameras(cams.viewmats, ring_cameras(size, n=n).Ks, size, size)


def hull_occupancy(pts: torch.Tensor, cams: Cameras, alphas: torch.Tensor) -> torch.Tensor:
    """1 where ``pts [P,3]`` fall inside every silhouette ``alphas [V,H,W,1] > 0.5``."""
    pix, z = cams.project(pts)
    W, H = cams.width, cams.height
    u, v = pix[..., 0].floor().long(), pix[..., 1].floor().long()
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H) & (z > 0)
    a = alphas[..., 0] > 0.5
    idx = torch.arange(len(cams))[:, None].expand_as(u)
    hit = torch.zeros_like(inside)
    hit[inside] = a[idx[inside], v[inside], u[inside]]
    return hit.all(0).float()


def random_cameras(n: int, g: torch.Generator, size: int = RES) -> Cameras:
    elev = torch.rand(n, generator=g) * 80 - 20
    az = torch.rand(n, generator=g) * 360
    cams = orbit_cameras(elev, az, 1.5, 45.0, size, size)
    return Cameras(cams.viewmats, ring_cameras(size, n=n).Ks, size, size)


@torch.no_grad()
def make_scene(name: str, rot: float, scale: float, feats_fn: ShapeWorldFeatures, g: torch.Generator,
               n_gauss: int = 8000) -> dict:
    obj = get_object(name)
    gs = transform_gaussians(obj.gaussians(n_gauss, seed=0), SHAPEWORLD_CUBE_SCALE * scale, rot)
    ring = render_gaussian_views(gs, ring_cameras(RES))
    held_cams = random_cameras(8, g)
    held = render_gaussian_views(gs, held_cams)
    hull_cams = fibonacci_cameras(26, 48)
    hull = render_gaussian_views(gs, hull_cams)
    ho, hd = camera_rays(held_cams)
    return {
        "name": name, "feats": feats_fn(ring["images"].permute(0, 3, 1, 2)),  # [8,C,H,W]
        "ring_alpha": ring["alphas"][..., 0].reshape(8, -1),
        "held_feats": feats_fn(held["images"].permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1),  # [8,HW,C]
        "held_alpha": held["alphas"][..., 0].reshape(8, -1), "held_o": ho, "held_d": hd,
        "hull_cams": hull_cams, "hull_alpha": hull["alphas"], "surface": gs["means"],
    }


def balanced_pick(alpha: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (view, pixel) pairs, half on the foreground (alpha > 0.5) when there is one."""
    flat = alpha.reshape(-1)
    fg = torch.nonzero(flat > 0.5)[:, 0]
    k = n // 2 if len(fg) else 0
    a = fg[torch.randint(len(fg), (k,), generator=g)] if k else torch.zeros(0, dtype=torch.long)
    b = torch.randint(flat.numel(), (n - k,), generator=g)
    idx = torch.cat([a, b])
    return idx // alpha.shape[1], idx % alpha.shape[1]


def bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p.clamp(1e-5, 1 - 1e-5), y)


@torch.no_grad()
def evaluate(plane: LatentPlane, feats_fn: ShapeWorldFeatures, names: list[str], grid_res: int = 64) -> dict:
    plane.eval()
    out = {}
    coarse = plane.coarse
    lin = torch.linspace(-0.5, 0.5, grid_res)
    grid_pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    for name in names:
        sc = make_scene(name, 0.0, 1.0, feats_fn, torch.Generator().manual_seed(0), n_gauss=20000)
        f = sc["feats"][None]
        sig = coarse.density_grid(f, t=0.0, res=grid_res)[0]
        occ_pred = (F.softplus(sig) > LEVEL).reshape(-1)
        gt = hull_occupancy(grid_pts, sc["hull_cams"], sc["hull_alpha"]).bool()
        ring8 = hull_occupancy(grid_pts, ring_cameras(RES), sc["ring_alpha"].reshape(8, RES, RES, 1)).bool()
        iou3d = float((occ_pred & gt).sum() / (occ_pred | gt).sum().clamp_min(1))
        iou_hull8 = float((ring8 & gt).sum() / (ring8 | gt).sum().clamp_min(1))
        # silhouettes at the studio held-out views (world radius 3 -> cube 1.5), rendered by the coarse plane
        hv = held_out_cameras(8, RES, seed=0).cameras
        hv = Cameras(hv.viewmats.clone(), hv.Ks, RES, RES)
        hv.viewmats[:, :3, 3] *= SHAPEWORLD_CUBE_SCALE  # same directions, distance scaled into the cube
        obj = get_object(name)
        gs = transform_gaussians(obj.gaussians(20000, seed=0), SHAPEWORLD_CUBE_SCALE, 0.0)
        gt_sil = render_gaussian_views(gs, hv)["alphas"][..., 0].reshape(8, -1)
        ro, rd = camera_rays(hv)
        occ = coarse.render_rays(f, ro.reshape(-1, 3), rd.reshape(-1, 3), t=0.0)["occ"][0].reshape(8, -1)
        p, gsil = occ > 0.5, gt_sil > 0.5
        iou_sil = float((p & gsil).sum() / (p | gsil).sum().clamp_min(1))
        rec = {"iou_3d": iou3d, "iou_3d_ring_visual_hull": iou_hull8, "iou_silhouette_held_out_views": iou_sil}
        try:
            mesh = density_to_mesh(sig, level=LEVEL)
            import trimesh

            pts, _ = trimesh.sample.sample_surface(mesh, 20000, seed=0)
            pts = torch.as_tensor(np.asarray(pts), dtype=torch.float32) / SHAPEWORLD_CUBE_SCALE
            ch = chamfer_to_surface(pts, obj.surface(10000, seed=1).points)
            rec.update(chamfer=float(ch["chamfer"]), chamfer_precision=float(ch["precision"]),
                       chamfer_completeness=float(ch["completeness"]), n_faces=len(mesh.faces))
        except ValueError as e:
            rec.update(chamfer=None, mesh_error=str(e))
        out[name] = rec
        print(name, json.dumps(rec), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "latent-plane"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=16.0, help="wall-clock budget of the training loop")
    ap.add_argument("--n-aug", type=int, default=6, help="rotated/scaled copies of each training object")
    ap.add_argument("--train-samples", type=int, default=16, help="samples per ray while training")
    ap.add_argument("--ring-rays", type=int, default=48)
    ap.add_argument("--held-rays", type=int, default=32)
    ap.add_argument("--grid-points", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-res", type=int, default=64)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    feats_fn = ShapeWorldFeatures(n_random=5, seed=0)
    bg_feat = feats_fn(torch.ones(1, 3, 3, 3))[0, :, 1, 1]  # the white background's feature

    t0 = time.time()
    scenes = []
    for name in TRAIN_OBJECTS:
        for k in range(args.n_aug):
            rot = float(torch.rand(1, generator=g) * 360) if k else 0.0
            scale = float(0.85 + 0.25 * torch.rand(1, generator=g)) if k else 1.0
            scenes.append(make_scene(name, rot, scale, feats_fn, g))
    print(f"{len(scenes)} scenes in {time.time() - t0:.1f}s", flush=True)

    coarse, fine = CoarsePlane(**COARSE_CFG), FinePlane(**FINE_CFG)
    plane = LatentPlane(coarse, fine)
    n_params = sum(p.numel() for p in plane.parameters())
    opt = torch.optim.Adam(plane.parameters(), lr=args.lr)
    ring_o, ring_d = camera_rays(ring_cameras(RES))
    coarse.n_samples = fine.n_samples = args.train_samples
    curve, t_train, step = [], time.time(), 0
    budget = args.minutes * 60
    ema = None
    while step < args.steps and time.time() - t_train < budget:
        frac = min(1.0, (time.time() - t_train) / budget)
        for pg in opt.param_groups:
            pg["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        sc = scenes[int(torch.randint(len(scenes), (1,), generator=g))]
        t = float(torch.rand(1, generator=g))
        clean = sc["feats"][None]
        noisy = clean + 0.25 * t * torch.randn(clean.shape, generator=g)
        # rays
        rv, rp = balanced_pick(sc["ring_alpha"], args.ring_rays, g)
        hv, hp = balanced_pick(sc["held_alpha"], args.held_rays, g)
        ro = torch.cat([ring_o[rv, rp], sc["held_o"][hv, hp]])
        rd = torch.cat([ring_d[rv, rp], sc["held_d"][hv, hp]])
        y_occ = torch.cat([sc["ring_alpha"][rv, rp], sc["held_alpha"][hv, hp]])
        r = coarse.render_rays(noisy, ro, rd, t=t * 1000)
        l_occ = bce(r["occ"][0], y_occ)
        # density grid
        n_u = args.grid_points // 2
        pu = torch.rand(n_u, 3, generator=g) - 0.5
        surf = sc["surface"]
        ps = surf[torch.randint(len(surf), (args.grid_points - n_u,), generator=g)]
        ps = (ps + 0.03 * torch.randn(ps.shape, generator=g)).clamp(-0.5, 0.5)
        pts = torch.cat([pu, ps])
        y_d = hull_occupancy(pts, sc["hull_cams"], sc["hull_alpha"])
        query = coarse._sigma_query(coarse.time_features(1, t=t * 1000))
        sig = coarse.point_sigma(coarse.project(noisy), pts, query)[0]
        l_den = F.binary_cross_entropy_with_logits((F.softplus(sig) - LEVEL) / DENSITY_TAU, y_d)
        # fine rendering
        nr = args.ring_rays
        fr = fine.render_rays(noisy, ro[:nr], rd[:nr], r["sigma"][:, :nr].detach(), views=rv)
        f_in_noisy = noisy[0, rv, :, rp // RES, rp % RES]  # [R,C]
        f_in_clean = clean[0, rv, :, rp // RES, rp % RES]
        l_fine_ring = F.mse_loss(composite(f_in_noisy, fr["occ"][0][:, None], fr["rendered"][0]), f_in_clean)
        fh = fine.render_rays(noisy, ro[nr:], rd[nr:], r["sigma"][:, nr:].detach())
        target = sc["held_feats"][hv, hp]
        l_fine_held = F.mse_loss(composite(bg_feat.expand_as(target), fh["occ"][0][:, None], fh["rendered"][0]),
                                 target)
        loss = l_occ + l_den + l_fine_ring + l_fine_held
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            print(f"step {step}: non-finite loss, skipped", flush=True)
            step += 1
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plane.parameters(), 1.0)
        opt.step()
        vals = {"loss": loss.item(), "occ": l_occ.item(), "density": l_den.item(), "fine_ring": l_fine_ring.item(),
                "fine_held": l_fine_held.item()}
        ema = vals if ema is None else {k: 0.98 * ema[k] + 0.02 * v for k, v in vals.items()}
        if step % 25 == 0:
            curve.append({"step": step, "time_s": round(time.time() - t_train, 1),
                          **{k: round(v, 5) for k, v in ema.items()}})
        if step % 100 == 0:
            print(f"step {step} {time.time() - t_train:.0f}s " + " ".join(f"{k}={v:.4f}" for k, v in ema.items()),
                  flush=True)
        step += 1
    train_time = time.time() - t_train
    coarse.n_samples = fine.n_samples = 32
    print(f"trained {step} steps in {train_time:.0f}s", flush=True)

    cfg = LatentPlaneConfig(coarse=COARSE_CFG, fine=FINE_CFG, features={"n_random": 5, "seed": 0},
                            cube_scale=SHAPEWORLD_CUBE_SCALE, resolution=RES, level=LEVEL,
                            extra={"train_objects": TRAIN_OBJECTS, "held_out_objects": HELD_OUT_OBJECTS,
                                   "seed": args.seed, "density_tau": DENSITY_TAU})
    out = Path(args.out)
    save_latent_plane(plane, out, cfg)

    t_eval = time.time()
    held = evaluate(plane, feats_fn, HELD_OUT_OBJECTS, args.eval_res)
    train_eval = evaluate(plane, feats_fn, TRAIN_OBJECTS[:3], args.eval_res)

    def mean(d, k):
        v = [x[k] for x in d.values() if x.get(k) is not None]
        return float(np.mean(v)) if v else None

    report = {
        "seed": args.seed, "steps": step, "train_time_s": round(train_time, 1), "n_params": n_params,
        "n_scenes": len(scenes), "args": vars(args), "config": cfg.__dict__,
        "final_losses": curve[-1] if curve else None, "curve": curve,
        "held_out": held, "train_subset": train_eval,
        "held_out_mean": {k: mean(held, k) for k in ("iou_3d", "iou_3d_ring_visual_hull",
                                                     "iou_silhouette_held_out_views", "chamfer")},
        "eval_time_s": round(time.time() - t_eval, 1),
        "notes": "Reconstructed training (official code not public); see scripts/train_latent_plane.py docstring.",
    }
    (out / "training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["held_out_mean"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
