"""DreamPolish's view-conditioned prior (issue 17 part 4): the hybrid loss has both SDS terms and the
reference-view losses, the reference camera stays out of the held-out sector, and the hybrid stages run."""
from __future__ import annotations

import json

import pytest
import torch

from methods import run
from methods.dreampolish import DreamPolishConfig
from methods.dreampolish_prior import ViewPrior, hybrid_score_fn, reference_view_loss
from studio.cameras import azimuth_in_sector, orbit_cameras
from studio.errors import UserError
from studio.runs.text_to_3d import load_teacher_cached
from studio.train.gaussian_stage import ScoreContext
from studio.world.references import render_reference

TINY = {"nerf_steps": 2, "neus_steps": 1, "dmtet_steps": 1, "turntable_frames": 2, "skip_polish": True,
        "skip_texture": True, "turntable_size": 32, "texture_size": 32, "resolution": 24, "n_samples": 16,
        "batch_size": 1}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_SHAPEWORLD_CACHE", str(tmp_path / "cache"))


def _prior(obj="green_torus", **kw):
    nv = load_teacher_cached("shapeworld-nv-exact")
    ref = render_reference(obj, orbit_cameras(15.0, 0.0, 3.2, 40.0, 64, 64), cache=False)["images"].permute(0, 3, 1, 2)
    return ViewPrior(nv, ref, 15.0, 0.0, 3.2, 40.0, **kw)


def test_relative_poses_invert_the_orbit():
    p = _prior()
    cams = orbit_cameras(torch.tensor([0.0, 30.0]), torch.tensor([90.0, -45.0]), torch.tensor([3.0, 3.5]), 40.0, 8, 8)
    dp, da, dr = p.relative_poses(cams)
    assert torch.allclose(dp, torch.tensor([15.0, -15.0]), atol=1e-3)
    assert torch.allclose(da, torch.tensor([90.0, -45.0]), atol=1e-3)
    assert torch.allclose(dr, torch.tensor([-0.2, 0.3]), atol=1e-4)


def test_hybrid_loss_is_the_weighted_sum_of_both_sds_terms():
    t2i = load_teacher_cached("shapeworld-exact")
    cams = orbit_cameras(torch.tensor([10.0, 20.0]), torch.tensor([30.0, 200.0]), 3.2, 40.0, 32, 32)
    images = render_reference("green_torus", cams, cache=False)["images"].permute(0, 3, 1, 2).clone().requires_grad_(True)
    lat = t2i.encode(images)
    cond = t2i.encode_prompt(["a green torus"] * 2)
    t = torch.tensor([500, 500])

    def ctx():
        return ScoreContext(t2i, lat, images, torch.ones_like(images[:, :1]), cond, t, None, cams, 7.5, 0, 0.5,
                            torch.Generator().manual_seed(0))

    res = hybrid_score_fn(_prior(t2i_weight=0.7, nv_weight=0.3))(ctx())
    assert float(res.view.grad.norm()) > 0 and float(res.t2i.grad.norm()) > 0
    torch.testing.assert_close(res.loss, 0.7 * res.t2i.loss + 0.3 * res.view.loss)
    assert set(res.logs) == {"sds_t2i_grad", "sds_view_grad"}
    # without the view term the loss is the text-to-image SDS alone, and it differs from the hybrid
    only = hybrid_score_fn(_prior(t2i_weight=0.7, nv_weight=0.0))(ctx())
    torch.testing.assert_close(only.loss, 0.7 * only.t2i.loss)
    assert abs(float(res.loss.detach()) - float(only.loss.detach())) > 1e-6


def test_reference_view_loss_zero_at_the_reference_and_positive_elsewhere():
    p = _prior()
    ref = p.reference
    loss0, logs0 = reference_view_loss(ref, p.mask, p)
    assert float(loss0) < 1e-6
    loss1, logs1 = reference_view_loss(torch.ones_like(ref), torch.zeros_like(p.mask), p)
    assert logs1["ref_rgb"] > 0.01 and logs1["ref_mask"] > 0.01
    assert float(loss1) == pytest.approx(1000 * logs1["ref_rgb"] + 100 * logs1["ref_mask"], rel=1e-5)


def test_hybrid_nerf_step_has_both_terms_and_reference_outside_heldout_sector(tmp_path):
    from methods.dreampolish import DreamPolishMethod
    from methods.dreampolish_prior import HybridDMTetStage, HybridFieldStage

    cfg = DreamPolishConfig(prompt="a green torus", view_prior=True, geometry_camera=False, **TINY)
    m, teacher = DreamPolishMethod(), load_teacher_cached("shapeworld-exact")
    info = m.prepare(cfg, teacher, tmp_path, False)
    assert (tmp_path / "reference.png").is_file() and info["reference"].startswith("generated")
    az = info["reference_camera"]["azimuth"]
    assert not bool(azimuth_in_sector(torch.tensor([az]), tuple(cfg.heldout_azimuth))[0])
    # the generated reference (exact teacher at the reference camera) shows the prompt's object
    assert float(m.view_prior.mask.mean()) > 0.02
    stages = m.stages(cfg, teacher, {"guidance_scale": 7.5})
    assert [type(s) for s in stages[:3]] == [HybridFieldStage, HybridFieldStage, HybridDMTetStage]
    out = stages[0].train_step(0, 0.0)
    for k in ("sds_view_grad", "sds_t2i_grad", "ref_rgb", "ref_mask"):
        assert out.logs[k] > 0, (k, out.logs)
    out.loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for p in stages[0].result.parameters())
    # without --view-prior the stages are the plain ones
    plain = DreamPolishMethod()
    plain.prepare(DreamPolishConfig(prompt="a green torus", **TINY), teacher, tmp_path / "p", False)
    assert not any(isinstance(s, (HybridFieldStage, HybridDMTetStage))
                   for s in plain.stages(DreamPolishConfig(prompt="a green torus", **TINY), teacher,
                                         {"guidance_scale": 7.5}))


@pytest.mark.slow
def test_hybrid_stages_run_and_reference_outside_heldout_sector(tmp_path):
    cfg = DreamPolishConfig(prompt="a green torus", view_prior=True, geometry_camera=False, **TINY)
    recs = []
    run(cfg, "dreampolish", tmp_path / "out", progress=False, callbacks=[lambda r: recs.append(r)])
    run_dir = tmp_path / "out" / "a-green-torus"
    assert (run_dir / "reference.png").is_file()
    info = json.loads((run_dir / "metrics.json").read_text())
    cam = info.get("reference_camera") or info.get("prepare", {}).get("reference_camera")
    assert cam is not None, sorted(info)
    assert not bool(azimuth_in_sector(torch.tensor([cam["azimuth"]]), tuple(cfg.heldout_azimuth))[0])
    # every geometry stage's loss had both SDS terms (non-zero gradients) and the reference-view losses
    assert {r["stage"] for r in recs} == {"nerf", "neus", "dmtet"}
    for r in recs:
        assert r["sds_view_grad"] > 0 and r["sds_t2i_grad"] > 0, r
        assert r["ref_rgb"] > 0 and r["ref_mask"] >= 0, r
    # a held-out sector that contains the reference camera is refused
    bad = DreamPolishConfig(prompt="a green torus", view_prior=True, heldout_azimuth=(-30.0, 30.0), **TINY)
    with pytest.raises(UserError, match="held-out sector"):
        from methods.dreampolish import DreamPolishMethod
        DreamPolishMethod().prepare(bad, load_teacher_cached("shapeworld-exact"), tmp_path / "x", False)
