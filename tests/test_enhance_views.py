"""PlacidDreamer's enhanced multi-view images (issue 17 part 3): the Latent-Plane inside the novel-view sampling
changes the samples (and only while active), and the consistency measure ranks a consistent view set above an
inconsistent one."""
from __future__ import annotations

import pytest
import torch

from methods.placiddreamer.enhance import (PlaneEnhancedTeacher, enhanced_sample, ring_view_cameras,
                                           silhouette_iou, view_consistency)
from methods.placiddreamer.latent_plane.weights import load_latent_plane
from methods.placiddreamer.prepare import ring_poses
from studio.cameras import orbit_cameras
from studio.runs.text_to_3d import load_teacher_cached
from studio.teachers.novel_view import sample_novel_views
from studio.world.references import render_reference


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_SHAPEWORLD_CACHE", str(tmp_path / "cache"))


def _ring(obj: str, cams):
    return render_reference(obj, cams, cache=False)["images"].permute(0, 3, 1, 2)


def test_silhouette_consistency_ranks_consistent_above_inconsistent():
    cams = orbit_cameras(30.0, torch.arange(8) * 45.0, 3.2, 40.0, 32, 32)
    torus, cube = _ring("green_torus", cams), _ring("red_cube", cams)
    good = silhouette_iou(torus, cams)
    assert float(good.min()) > 0.97  # true renders of one object at the stated cameras agree
    mixed = torus.clone()
    mixed[::2] = cube[::2]  # half the views show another object
    assert float(silhouette_iou(mixed, cams).mean()) < float(good.mean()) - 0.05
    off_centre = torch.roll(torus, shifts=4, dims=-1)  # every view's object moved 4 px: the hull shrinks
    assert float(silhouette_iou(off_centre, cams).mean()) < float(good.mean()) - 0.05
    m = view_consistency(torus, cams, torus, azimuths=torch.arange(8) * 45.0, sector=(60.0, 120.0))
    assert m["gt_psnr"] > 60 and "gt_psnr_sector" in m and "gt_psnr_outside" in m
    assert view_consistency(mixed, cams, torus)["gt_psnr"] < m["gt_psnr"] - 20


def test_plane_inside_sampling_changes_the_samples_only_while_active():
    nv = load_teacher_cached("shapeworld-nv-unet")
    plane, feats, lp = load_latent_plane("latent-plane")
    R = nv.native_resolution
    ref = _ring("green_torus", orbit_cameras(nv.reference_elevation, 0.0, nv.reference_radius, nv.fovy, R, R))
    dp, da, dr = ring_poses(nv)
    cond = nv.encode_view(ref, dp, da, dr)
    plain = sample_novel_views(nv, cond, steps=2, guidance_scale=2.0, seed=0)
    off, calls0 = enhanced_sample(nv, cond, plane, feats, lp, steps=2, active_steps=0, n_samples=2)
    assert calls0 == 0
    torch.testing.assert_close(off, plain)  # the wrapper alone changes nothing
    on, calls = enhanced_sample(nv, cond, plane, feats, lp, steps=2, active_steps=2, every=2, n_samples=2)
    assert calls == 1  # the last step of the window only
    assert float((on - plain).abs().mean()) > 1e-4  # off: exactly equal; float32 noise would be ~1e-7
    assert plane.coarse.n_samples == 32 and plane.fine.n_samples == 32  # restored after the call
    # the rewrite is the fine plane's composite: with no coarse density (occupancy 0) it is the identity
    w = PlaneEnhancedTeacher(nv, plane, feats, lp.resolution)
    img = _ring("green_torus", ring_view_cameras(nv, dp, da, dr, R))
    with torch.no_grad():
        saved = {k: v.clone() for k, v in plane.coarse.sigma_head.state_dict().items()}
        plane.coarse.sigma_head.weight.zero_()
        plane.coarse.sigma_head.bias.fill_(-30.0)  # no density anywhere: occupancy 0
        plane.coarse.n_samples = plane.fine.n_samples = 2
        try:
            same = w.enhance_images(img)
        finally:
            plane.coarse.sigma_head.load_state_dict(saved)
            plane.coarse.n_samples = plane.fine.n_samples = 32
    torch.testing.assert_close(same, img, atol=2e-3, rtol=0)
