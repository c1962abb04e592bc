"""PlacidDreamer end to end on the embedded default (few steps) and on tiny real diffusers classes."""
import dataclasses

import pytest
import torch

from methods.placiddreamer.method import PlacidDreamerConfig, scale_schedules
from studio.errors import UserError
from methods import run


def _cfg(**kw):
    base = PlacidDreamerConfig(prompt="a red cube", steps=6, resolution=32, nv_steps=4, dreambooth_steps=3,
                               init_points=800, turntable_frames=2, turntable_size=32)
    stage = dataclasses.replace(base.stage, batch_size=2)
    return dataclasses.replace(base, stage=stage, **kw)


def test_schedules_scale_to_the_run_length():
    s = scale_schedules(PlacidDreamerConfig().stage, 500)
    assert (s.radius_decay_every, s.fovy_scale_every, s.densify_every, s.opacity_reset_every) == (50, 50, 10, 300)
    assert s.densify_stop_frac == pytest.approx(0.6) and s.t_anneal_end == pytest.approx(0.3)


def test_placiddreamer_runs_every_step_and_resumes(tmp_path):
    m = run(_cfg(), "placiddreamer", tmp_path, progress=False)
    run_dir = tmp_path / "a-red-cube"
    for f in ("reference.png", "views.png", "views.safetensors", "init.ply", "init_mesh.ply", "init.json", "lora",
              "model.ply", "turntable.mp4", "metrics.json"):
        assert (run_dir / f).exists(), f
    prep = m["prepare"]
    assert prep["personalised"] is True and prep["posterior_object"] == "red_cube"
    assert prep["init_points"] == 800
    assert m["ground_truth"]["iou"] > 0.2
    # resume: the prepared steps are reused (no new DreamBooth run, same init)
    before = (run_dir / "init.ply").read_bytes()
    m2 = run(_cfg(), "placiddreamer", tmp_path, progress=False, resume=True)
    assert m2["prepare"].get("resumed") is True and (run_dir / "init.ply").read_bytes() == before


def test_sds_ablation_and_random_init_without_personalisation(tmp_path):
    m = run(_cfg(distillation="sds", init="random", personalize=False), "placiddreamer", tmp_path, progress=False)
    assert m["prepare"]["personalised"] is False
    assert not (tmp_path / "a-red-cube" / "init.ply").exists()


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="image"):
        run(_cfg(image=str(tmp_path / "missing.png")), "placiddreamer", tmp_path, progress=False)
    with pytest.raises(UserError, match="bsd-lambda"):
        run(_cfg(bsd_lambda=0.0), "placiddreamer", tmp_path, progress=False)
    with pytest.raises(UserError, match="novel-view"):
        run(_cfg(novel_view_teacher="shapeworld-exact"), "placiddreamer", tmp_path, progress=False)


@pytest.fixture(scope="module")
def tiny_real(tmp_path_factory):
    from tiny_models import make_tiny_sd, make_tiny_zero123

    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_sd(root / "sd"), make_tiny_zero123(root / "zero123")


def test_tiny_real_classes_run_every_step(tmp_path, tiny_real):
    """Tier 1: a tiny SD pipeline as the text-to-image teacher and a tiny Zero123 layout as the novel-view
    teacher, both loaded by path: reference sample, 8 ring views, Latent-Plane init, DreamBooth-LoRA, BSD."""
    sd, z123 = tiny_real
    cfg = _cfg(prompt="a red cube", teacher=str(sd), novel_view_teacher=str(z123), guidance_scale=None)
    m = run(cfg, "placiddreamer", tmp_path, progress=False)
    prep = m["prepare"]
    assert prep["personalised"] is True and prep["novel_view_teacher"] == str(z123)
    run_dir = tmp_path / "a-red-cube"
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run_dir / "model.ply").is_file()


def test_hooked_latent_plane_runs_inside_zero123_sampling(tmp_path, tiny_real, monkeypatch):
    """The official stage 1: a plane that reads UNet features (saved with host="unet") is hooked into the
    tiny Zero123 UNet for the first latent_plane_steps denoising steps; its density grid gives the mesh.
    (A random plane has no trained level, so the mesh is taken at the grid's median.)"""
    import torch.nn.functional as F

    import methods.placiddreamer.prepare as prepare
    from methods.placiddreamer.latent_plane.networks import CoarsePlane, FinePlane, LatentPlane
    from methods.placiddreamer.latent_plane.weights import LatentPlaneConfig, save_latent_plane

    sd, z123 = tiny_real
    torch.manual_seed(0)
    coarse = CoarsePlane(32, 128, latent_dim=8, time_dim=8, heads=2, dim_head=4, n_freqs=2, grid_size=8)
    fine = FinePlane(32, heads=2, dim_head=4, n_freqs=2)
    plane_dir = save_latent_plane(LatentPlane(coarse, fine), tmp_path / "plane", LatentPlaneConfig(
        coarse=dict(feat_dim=32, time_embed_dim=128, latent_dim=8, time_dim=8, heads=2, dim_head=4, n_freqs=2,
                    grid_size=8),
        fine=dict(feat_dim=32, heads=2, dim_head=4, n_freqs=2), host="unet", block_index=1, cube_scale=1.0))
    calls, original = [], prepare.density_to_mesh

    def median_level(grid, level=15.0, **kw):
        calls.append(grid.shape)
        return original(grid, level=float(F.softplus(grid.float()).median()), **kw)

    monkeypatch.setattr(prepare, "density_to_mesh", median_level)
    hook_calls = []
    monkeypatch.setattr(LatentPlane, "forward", lambda self, *a, _f=LatentPlane.forward, **k: (
        hook_calls.append(1), _f(self, *a, **k))[1])
    cfg = _cfg(prompt="a red cube", teacher=str(sd), novel_view_teacher=str(z123), latent_plane=str(plane_dir),
               latent_plane_steps=3, personalize=False)
    m = run(cfg, "placiddreamer", tmp_path / "out", progress=False)
    assert m["prepare"]["latent_plane"] == "hooked into the novel-view UNet"
    assert len(hook_calls) == 3  # active in 3 of the 4 steps, conditional branch only
    assert calls and m["prepare"]["init_points"] == 800
