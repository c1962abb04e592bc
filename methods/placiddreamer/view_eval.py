"""Plain vs Latent-Plane-enhanced ring views of a ShapeWorld object against ground truth (issue 17 part 3;
``benchmarks/placiddreamer.py``). Kept apart from :mod:`.enhance` and :mod:`.prepare`, which it uses both."""
from __future__ import annotations

import torch

from studio.cameras import orbit_cameras

from .enhance import enhanced_sample, ring_view_cameras, view_consistency
from .latent_plane.weights import load_latent_plane
from .prepare import ring_poses



@torch.no_grad()
def compare_enhanced_views(obj: str, novel_view_teacher: str = "shapeworld-nv-unet", *, steps: int = 50,
                           active_steps: int = 45, every: int = 15, n_samples: int | None = 16, seed: int = 0,
                           guidance_scale: float = 2.0, sector=(60.0, 120.0), latent_plane: str = "latent-plane") -> dict:
    """Plain vs enhanced ring views of the ShapeWorld object ``obj`` (its true render at the teacher's reference
    camera as the reference image) against ground-truth renders at the ring cameras: :func:`view_consistency`
    of each set, seconds and the mean change. Used by ``benchmarks/placiddreamer.py``."""
    import time

    from studio.runs.text_to_3d import load_teacher_cached
    from studio.teachers.novel_view import sample_novel_views
    from studio.world.references import render_reference


    nv = load_teacher_cached(novel_view_teacher)
    R = nv.native_resolution
    ref_cam = orbit_cameras(nv.reference_elevation, nv.reference_azimuth, nv.reference_radius, nv.fovy, R, R)
    ref = render_reference(obj, ref_cam)["images"].permute(0, 3, 1, 2)
    dp, da, dr = ring_poses(nv)
    cond = nv.encode_view(ref, dp, da, dr)
    cams = ring_view_cameras(nv, dp, da, dr, R)
    gt = render_reference(obj, cams)["images"].permute(0, 3, 1, 2)
    plane, features, lp_cfg = load_latent_plane(latent_plane)
    t0 = time.perf_counter()
    plain = sample_novel_views(nv, cond, steps=steps, guidance_scale=guidance_scale, seed=seed)
    t1 = time.perf_counter()
    enh, calls = enhanced_sample(nv, cond, plane, features, lp_cfg, steps=steps, guidance_scale=guidance_scale,
                                 seed=seed, active_steps=active_steps, every=every, n_samples=n_samples)
    t2 = time.perf_counter()
    return {"object": obj, "novel_view_teacher": novel_view_teacher, "steps": steps, "plane_calls": calls,
            "plain": view_consistency(plain, cams, gt, azimuths=da + nv.reference_azimuth, sector=sector),
            "enhanced": view_consistency(enh, cams, gt, azimuths=da + nv.reference_azimuth, sector=sector),
            "mean_abs_change": round(float((enh - plain).abs().mean()), 4),
            "plain_seconds": round(t1 - t0, 1), "enhanced_seconds": round(t2 - t1, 1)}
