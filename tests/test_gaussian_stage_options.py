"""The Gaussian stage's PlacidDreamer-style options: camera schedules, shared t, depth-as-latent, flip, TV."""
import dataclasses

import torch

from studio.distill.timesteps import TimestepSampler
from studio.teachers.schedule import NoiseSchedule
from studio.train.gaussian_stage import (GaussianDistillStage, GaussianStageConfig, depth_image,
                                         scheduled_camera_ranges, total_variation)
from tests.test_distill import StubTeacher


def _placid_like(**kw):
    from methods.placiddreamer.method import placid_stage

    return dataclasses.replace(placid_stage(), **kw)


def test_camera_schedules_follow_the_official_rule_and_stay_in_range():
    cfg = _placid_like()
    for step in range(0, 6000, 50):
        (r0, r1), (f0, f1) = scheduled_camera_ranges(cfg, step)
        k = step // 500
        assert r0 == max(3.5, 5.2 * 0.95 ** k) and r1 == max(5.0, 5.5 * 0.95 ** k)
        assert 9.17 <= f0 <= f1 <= 34.38
        assert f0 == max(9.17, 18.33 * 0.75 ** k)
    assert scheduled_camera_ranges(cfg, 0) == ((5.2, 5.5), (18.33, 34.38))
    assert scheduled_camera_ranges(GaussianStageConfig(), 10_000) == ((3.0, 3.4), (38.0, 42.0))


def test_linear_t_max_anneal_matches_placiddreamer_formula():
    # spec 2.2: u ~ U{20, ..., 500 + floor(480 r) - 1}, r = 1 - min(iter / 1500, 1), over 5000 iterations
    sampler = TimestepSampler(0.02, 0.98, "linear", t_max_end=0.5, anneal_end=1500 / 5000)
    sched = NoiseSchedule.ddpm_scaled_linear()
    for it in (0, 300, 750, 1499, 1500, 4000):
        lo, hi = sched.timestep_range(*sampler.bounds(it / 5000))
        r = 1 - min(it / 1500, 1)
        assert lo in (19, 20), lo
        assert abs(hi - (500 + int(480 * r))) <= 1, (it, hi)
        t = sampler.sample(500, it / 5000, sched, torch.Generator().manual_seed(it))
        assert int(t.min()) >= lo and int(t.max()) <= hi


def test_depth_image_is_near_bright_and_composited():
    alpha = torch.zeros(1, 1, 4, 4)
    alpha[..., 1:3, 1:3] = 1.0
    depth = torch.full((1, 1, 4, 4), 0.0)
    depth[..., 1, 1:3] = 2.0
    depth[..., 2, 1:3] = 4.0
    img = depth_image(depth * alpha, alpha, torch.tensor([[1.0, 0.0, 0.0]]))
    assert img.shape == (1, 3, 4, 4)
    assert torch.allclose(img[0, :, 1, 1], torch.ones(3)) and torch.allclose(img[0, :, 2, 1], torch.zeros(3))
    assert torch.allclose(img[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_total_variation_zero_on_constant_and_positive_on_edges():
    assert float(total_variation(torch.ones(2, 3, 8, 8))) == 0.0
    x = torch.zeros(1, 1, 4, 4)
    x[..., 2:] = 1
    assert float(total_variation(x)) > 0


def test_stage_runs_with_all_options_and_gradients_reach_the_gaussians():
    teacher = StubTeacher()
    teacher.native_resolution = 16
    cfg = _placid_like(init_points=200, radius_decay_every=2, fovy_scale_every=2, depth_latent_p=0.5,
                       densify=False, opacity_reset_every=0)
    seen = {}

    def score(ctx):
        from studio.distill.sds import sds

        seen.setdefault("t", []).append(ctx.t.clone())
        seen.setdefault("img", []).append(ctx.images.detach().clone())
        return sds(ctx.teacher, ctx.latents, ctx.cond, ctx.t, guidance_scale=1.0, generator=ctx.generator)

    stage = GaussianDistillStage("s", cfg, teacher, "a red cube", score, steps=6, resolution=16, guidance_scale=1.0)
    for step in range(6):
        out = stage.train_step(step, step / 6)
        for opt in stage.optimizers().values():
            opt.zero_grad()
        out.loss.backward()
        assert stage.model.params["means"].grad is not None and torch.isfinite(stage.model.params["means"].grad).all()
        assert "tv" in out.logs and "scale_mean" in out.logs
        stage.after_step(step, out)
    # shared t: one value per step for the whole batch of 4 views
    assert all(len(set(t.tolist())) == 1 and len(t) == 4 for t in seen["t"])
    # camera schedule applied: the sampler's radius range decayed
    assert stage.sampler.radius_range[1] < 5.5


def test_densification_budget_grows_only_the_highest_gradients():
    from studio.students.gaussians import DefaultStrategy, GaussianModel

    m = GaussianModel.random_in_sphere(1000, seed=0)
    opt = m.make_optimizers()
    st = DefaultStrategy(max_gaussians=1100, grow_grad2d=0.0, refine_start_iter=0, refine_every=1, reset_every=10**9)
    state = st.initialize_state(1.0)
    state["grad2d"], state["count"] = torch.linspace(0, 1, 1000), torch.ones(1000)
    before = m.params["means"].detach().clone()
    n_dup, n_split = st._grow(m.params, opt, state, 1)
    assert n_dup + n_split == 100 and m.params["means"].shape[0] == 1100
    # unchanged: the 900 lowest-gradient Gaussians (the split ones move; their copies are appended)
    torch.testing.assert_close(m.params["means"][:900].detach(), before[:900])
    state["grad2d"], state["count"] = torch.ones(1100), torch.ones(1100)
    assert st._grow(m.params, opt, state, 2) == (0, 0)  # budget reached: no growth
