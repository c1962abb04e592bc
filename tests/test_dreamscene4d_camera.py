"""DreamScene4D part 6 (issue 20, spec 1.4): the background model and the photometric camera estimation
(``methods.dreamscene4d.background``), their wiring into the run (``--camera`` / ``--background``) and the kind's
composition of the background behind the objects."""
import json
import math

import pytest
import torch

from studio.cameras import Cameras

TINY = dict(size=32, frames=4, steps_static=3, steps_deform=2, steps_translate=2, steps_joint=1, init_points=60,
            crop_size=32, batch_frames=2, sds_views=1, sds_views_dynamic=1, orbit_frames=3, video_size=32,
            rho_search=4, kplanes_resolution=4, kplanes_channels=4, kplanes_multires=(1,))


@pytest.fixture(scope="module")
def orbit():
    from studio.world.scenes4d import make_scene

    return make_scene("trio_orbit", size=32, frames=5, seed=0)


def _psnr(a, b):
    return -10 * math.log10(max(float(((a.detach() - b) ** 2).mean()), 1e-10))


def _rot_trans_error(vm_est, vm_gt):
    a, b = torch.linalg.inv(vm_est), torch.linalg.inv(vm_gt)
    d = a[:3, :3].T @ b[:3, :3]
    ang = math.degrees(math.acos(max(-1.0, min(1.0, (float(d.trace()) - 1) / 2))))
    return ang, float((a[:3, 3] - b[:3, 3]).norm())


def _frame0_background(sc, fit_steps=60):
    from methods.dreamscene4d.background import BackgroundModel

    fill = sc.background_frames[:1]  # frame 0's clean plate (what the exact inpainting teacher returns)
    bg = BackgroundModel()
    H, W = sc.size
    bg.add_from_frame(fill[0], torch.ones(H, W), sc.cameras[0], sc.background_depth[0], only_uncovered=False)
    bg.fit(fill, torch.ones(1, H, W), sc.cameras[0], fit_steps)
    return bg


@pytest.mark.parametrize("solver", ["gauss-newton", "adam"])
def test_pose_refinement_recovers_a_known_perturbation(orbit, solver):
    """A background model of frame 0; the true camera perturbed by ~2.1 deg and 0.07 units; refining against frame 0's
    real pixels (objects masked out) brings it back."""
    from methods.dreamscene4d.background import background_valid, pose_delta, refine_pose

    sc = orbit
    bg = _frame0_background(sc)
    H, W = sc.size
    gt = sc.cameras.viewmats[0]
    init = pose_delta(torch.tensor([0.02, -0.03, 0.01]), torch.tensor([0.05, -0.03, 0.04])) @ gt
    r0, t0 = _rot_trans_error(init, gt)
    assert r0 > 2.0 and t0 > 0.05
    valid = background_valid(sc.masks[:, :1])[0]
    steps = 15 if solver == "gauss-newton" else 80
    vm, loss = refine_pose(bg, sc.frames[0], valid, init, sc.cameras.Ks[0], W, H, steps=steps, solver=solver)
    r1, t1 = _rot_trans_error(vm, gt)
    if solver == "gauss-newton":
        assert r1 < 0.2 and t1 < 0.02, (r1, t1)
    else:  # first order through the rasterizer's viewmat gradients: it crawls along the rotation / translation
        assert r1 < 0.5 * r0 and t1 < 1.2 * t0, (r1, t1)  # valley (measured: 2.1 -> 0.9 deg, 0.071 -> 0.074)
    assert loss < 1e-3


def test_camera_estimation_follows_the_orbit(orbit):
    """``build_background(estimate=True)``: every pose after frame 0 estimated; the orbit turns ~14 deg over these 5
    frames, the estimate stays within a degree (a static camera would be off by the whole motion)."""
    from methods.dreamscene4d.background import build_background, complete_background
    from studio.world.scenes4d import camera_pose_errors

    sc = orbit
    fill = complete_background(sc.frames, sc.masks, scene=sc, steps=6)
    bg, cams, info = build_background(sc.frames, sc.masks, sc.cameras, lambda t: sc.background_depth[t], fill=fill,
                                      estimate=True)
    e = camera_pose_errors(cams.c2w_opencv, sc)
    static = camera_pose_errors(sc.cameras.c2w_opencv[:1].expand(5, 4, 4), sc)
    assert float(static["rot_deg"][-1]) > 10
    # Measured errors on this tiny 5-frame scene: 0.45-1.36 deg / 0.08-0.15 (max over frames), depending on the
    # rasterizer path (fused / previous native / scalar blend): the finite-difference Gauss-Newton step sees the
    # renderers' float32 differences. The bound says "follows the orbit": a fifth of the static camera's error.
    rot_bound, trans_bound = 0.2 * float(static["rot_deg"][-1]), 0.5 * float(static["trans"][-1])
    assert float(e["rot_deg"].max()) < rot_bound and float(e["trans"].max()) < trans_bound, (
        e["rot_deg"], e["trans"], rot_bound, trans_bound)
    assert torch.equal(cams.viewmats[0], sc.cameras.viewmats[0])  # frame 0 fixes the gauge
    assert len(info["pose_losses"]) == 5 and info["background_gaussians"] > 0


def test_background_model_reproduces_a_held_out_frame(orbit):
    """Fitted on frames 0, 1, 3, 4 (ground-truth cameras, the occluded background filled by the exact inpainting
    teacher), rendered at frame 2's camera: the clean background plate of frame 2, far better than the nearest frame."""
    from methods.dreamscene4d.background import build_background, complete_background

    sc = orbit
    keep = [0, 1, 3, 4]
    H, W = sc.size
    fill = complete_background(sc.frames, sc.masks, scene=sc, steps=6)
    assert _psnr(fill, sc.background_frames) > 30  # the exact teacher's fill is the plate
    c = sc.cameras
    cams = Cameras(c.viewmats[keep], c.Ks[keep], W, H)
    bg, _, info = build_background(sc.frames[keep], sc.masks[:, keep], cams, lambda t: sc.background_depth[keep[t]],
                                   fill=fill[keep])
    img, a = bg.render(c[2])
    held = _psnr(img[0], sc.background_frames[2])
    nearest = _psnr(sc.background_frames[1], sc.background_frames[2])
    assert float(a.min()) > 0.8
    assert held > 30 and held > nearest + 8, (held, nearest)


def test_composition_puts_the_background_behind_the_objects(orbit):
    """One depth-sorted render: the objects cover the background where they are, the background shows elsewhere, and
    the draw order of the two sets does not matter (the renderer's depth sort, not painter's order)."""
    from methods.dreamscene4d.background import background_valid
    from studio.runs.video_to_4d import render_gaussians, with_background
    from studio.world.scenes4d import scene_gaussians

    sc = orbit
    bgm = _frame0_background(sc, fit_steps=30)
    bg = bgm.gaussians()
    obj = {k: v for k, v in scene_gaussians(sc, 0).items() if k != "object"}
    cam = sc.cameras[0]
    comp, ca = render_gaussians(with_background(obj, bg), cam, bg=0.0, mode="RGB+ED")
    swapped, _ = render_gaussians(with_background(bg, obj), cam, bg=0.0, mode="RGB+ED")
    assert float((comp - swapped).abs().max()) < 1e-4
    o_img, o_a = render_gaussians(obj, cam, bg=0.0, mode="RGB+ED")
    b_img, b_a = render_gaussians(bg, cam, bg=0.0, mode="RGB+ED")
    on_obj = o_a[0] > 0.99
    assert int(on_obj.sum()) > 20
    assert float((comp[0, ..., :3] - o_img[0, ..., :3])[on_obj].abs().max()) < 0.03  # objects in front
    assert bool((o_img[0, ..., 3][on_obj] < b_img[0, ..., 3][on_obj]).all())  # and nearer than the background
    off = background_valid(sc.masks[:, :1], 1)[0] & (o_a[0] < 0.01)
    assert float((comp[0, ..., :3] - b_img[0, ..., :3])[off].abs().max()) < 0.03
    assert _psnr(comp[0, ..., :3], sc.frames[0]) > 25  # the composite is the frame


def test_estimate_run_writes_the_background_and_camera_errors(tmp_path):
    """``--camera estimate`` end to end on a tiny moving-camera scene: estimated cameras in cameras.json and the
    metrics, the background in every frame's PLY, alone as background.ply and in the 4D file."""
    from safetensors import safe_open

    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from studio.io import read_ply
    from studio.runs.skeleton import execute

    cfg = DreamScene4DConfig(video="trio_orbit", camera="estimate", **TINY)
    m = execute(DreamScene4DMethod(), cfg, out=tmp_path, progress=False)
    run = tmp_path / "trio-orbit"
    assert m["status"] == "done" and m["camera_source"] == "estimated" and m["background"] == "gaussians"
    gt = m["ground_truth"]
    # mean rotation error measured 0.5-1.6 deg over these 4 tiny frames depending on the rasterizer path (fused AVX2
    # / scalar blend: the finite-difference Gauss-Newton step sees their float32 differences); the orbit turns
    # 8.2 deg per frame at these 4 frames, so a camera left static would be off by 16.5 deg on average here
    assert gt["camera_rot_error_deg"] < 3.0 and gt["background_psnr"] > 28, gt
    cams = json.loads((run / "cameras.json").read_text())
    assert cams["source"] == "estimated" and len(cams["frames"]) == 4 and len(cams["frames"][0]["orientation"]) == 4
    nb = m["n_background_gaussians"]
    assert nb > 100
    assert read_ply(run / "background.ply")["means"].shape[0] == nb
    assert read_ply(run / "ply" / "frame_00002.ply")["means"].shape[0] == nb + m["n_gaussians"]
    with safe_open(str(run / "model_4d.safetensors"), framework="pt") as f:
        assert f.get_tensor("background/means").shape[0] == nb


def test_static_camera_ablation_reports_the_camera_motion(tmp_path):
    """``--camera static --background none`` on the orbit (the benchmark's "no background / camera model"
    ablation): frame 0's camera for every frame; its pose error is the orbit's own motion."""
    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from studio.runs.skeleton import execute

    cfg = DreamScene4DConfig(video="trio_orbit", camera="static", background="none",
                             **{**TINY, "steps_deform": 1, "steps_translate": 1, "steps_joint": 0})
    m = execute(DreamScene4DMethod(), cfg, out=tmp_path, progress=False)
    assert m["camera_source"] == "static" and "n_background_gaussians" not in m
    assert m["ground_truth"]["camera_rot_error_deg"] > 5
    assert not (tmp_path / "trio-orbit" / "background.ply").exists()


def test_bad_camera_and_background_options_give_clear_errors(tmp_path, orbit):
    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from methods.dreamscene4d.background import refine_pose, BackgroundModel
    from studio.errors import UserError
    from studio.runs.video_to_4d import VideoInput

    meth = DreamScene4DMethod()
    with pytest.raises(UserError, match=r"--camera 'colmap' is not an option; choose one of auto, gt, estimate, static"):
        meth.validate(DreamScene4DConfig(video="trio_orbit", camera="colmap"))
    with pytest.raises(UserError, match=r"--background 'mesh' is not an option"):
        meth.validate(DreamScene4DConfig(video="trio_orbit", background="mesh"))
    with pytest.raises(UserError, match=r"--background-fill"):
        meth.validate(DreamScene4DConfig(video="trio_orbit", background_fill="exact"))
    with pytest.raises(UserError, match="--camera estimate refines the poses against the background model"):
        meth.validate(DreamScene4DConfig(video="trio_orbit", camera="estimate", background="none"))
    with pytest.raises(UserError, match="--pose-steps"):
        meth.validate(DreamScene4DConfig(video="trio_orbit", pose_steps=0))
    sc = orbit
    user = VideoInput(sc.frames[:2], sc.masks[:, :2], sc.cameras[:2], scene=None)  # a user video: no ground truth
    cfg = DreamScene4DConfig(video="clip.mp4", camera="gt", sds_weight=0.0, **{**TINY, "frames": 2})
    with pytest.raises(UserError, match="--camera gt needs a ShapeWorld scene"):
        meth.reconstruct(cfg, user, tmp_path, progress=False)
    with pytest.raises(UserError, match="pose solver must be"):
        refine_pose(_frame0_background(sc, 1), sc.frames[0], torch.ones(32, 32, dtype=torch.bool),
                    sc.cameras.viewmats[0], sc.cameras.Ks[0], 32, 32, solver="sgd")
    with pytest.raises(UserError, match="needs a background model"):
        refine_pose(BackgroundModel(), sc.frames[0], torch.ones(32, 32, dtype=torch.bool), sc.cameras.viewmats[0],
                    sc.cameras.Ks[0], 32, 32)


def test_estimate_with_a_depth_model_by_path(tmp_path):
    """A relative depth model (tiny random Depth-Anything loaded by path): the background is built in its units and
    scaled by spec 5.3's rho_bg at composition; the run completes and reports finite camera errors."""
    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from studio.runs.skeleton import execute
    from tests.test_dreamscene4d import make_tiny_depth_anything

    path = make_tiny_depth_anything(tmp_path / "depth")
    cfg = DreamScene4DConfig(video="trio_orbit", camera="estimate", depth=str(path), background_steps=10, pose_steps=4,
                             **{**TINY, "frames": 3, "steps_deform": 1, "steps_translate": 1, "steps_joint": 0})
    m = execute(DreamScene4DMethod(), cfg, out=tmp_path / "out", progress=False)
    assert m["camera_source"] == "estimated" and m["depth"] == str(path)
    assert 0.0 < m["rho_background"] < 100.0
    gt = m["ground_truth"]
    assert math.isfinite(gt["camera_rot_error_deg"]) and math.isfinite(gt["background_psnr"])
