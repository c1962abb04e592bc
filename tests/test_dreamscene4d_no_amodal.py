"""DreamScene4D's "no amodal completion" ablation (``--amodal none``): what the lift sees, the option's validation,
and the benchmark's ``no_amodal`` variant (``track_epe_occluded_no_amodal``, ``claims.amodal_lowers_occluded_epe``)."""
import pytest
import torch


@pytest.fixture(scope="module")
def scene():
    from studio.world.scenes4d import make_scene

    return make_scene("bend_occlude", size=32, frames=4, seed=0)


def _fit(scene, amodal: str, k: int):
    from methods.dreamscene4d.method import lift_targets
    from methods.dreamscene4d.stages import FitSettings, ObjectFit

    rgb, masks = lift_targets(amodal, k, scene)
    return ObjectFit(k, scene.frames, scene.masks, scene.cameras, FitSettings(crop_size=32, init_points=16), None,
                     lift_rgb=rgb, lift_masks=masks), rgb, masks


def test_amodal_none_lifts_from_the_visible_pixels_only(scene):
    from methods.dreamscene4d import geometry as G

    hidden = (scene.amodal_masks & ~scene.masks).flatten(2).sum(-1)  # [K,T] hidden pixels per object and frame
    k, t = divmod(int(hidden.argmax()), hidden.shape[1])
    assert int(hidden[k, t]) >= 10, hidden  # bend_occlude: an object is really occluded
    off, rgb, masks = _fit(scene, "none", k)
    on, rgb_on, masks_on = _fit(scene, "exact", k)
    assert rgb is None and masks is None and torch.equal(masks_on, scene.amodal_masks[k])
    R = 32

    def crop_of(fit, m):
        return G.crop(m[:, None].float(), fit.centers, fit.sides, R, fill=0.0)[:, 0] > 0.5

    # amodal off: the lift / deformation targets are the visible mask, the pixels other objects cover get no loss
    assert torch.equal(off.crop_mask, crop_of(off, scene.masks[k]))
    assert not bool(off.crop_valid[t].all())
    # amodal on: the amodal mask, every pixel counts; on the occluded frame it holds pixels the visible mask lacks
    assert torch.equal(on.crop_mask, crop_of(on, scene.amodal_masks[k])) and bool(on.crop_valid.all())
    assert int((on.crop_mask[t] & ~crop_of(on, scene.masks[k])[t]).sum()) >= 5
    assert not torch.equal(off.crop_rgb[t], on.crop_rgb[t])
    # the boxes (crop placement) follow the visible extent without completion
    assert not (torch.allclose(off.centers[t], on.centers[t]) and torch.allclose(off.sides[t], on.sides[t]))


def test_amodal_option_rejects_unknown_values(scene):
    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from methods.dreamscene4d.method import lift_targets
    from studio.errors import UserError

    with pytest.raises(UserError, match=r"--amodal 'visible' is not an option.*none"):
        DreamScene4DMethod().validate(DreamScene4DConfig(video="bend_occlude", amodal="visible"))
    with pytest.raises(UserError, match="is not an option"):
        lift_targets("visible", 0, scene)
    with pytest.raises(UserError, match="needs a ShapeWorld scene"):
        lift_targets("exact", 0, None)
    DreamScene4DMethod().validate(DreamScene4DConfig(video="bend_occlude", amodal="none"))


def test_benchmark_no_amodal_variant_and_claim():
    import benchmarks.dreamscene4d as B

    assert B.VARIANTS["no_amodal"] == (True, {"amodal": "none"})
    row = dict(novel_view_psnr=18.0, track_epe_visible=2.0, track_epe_occluded=4.0, traj_error_3d=0.2, seconds=1.0)
    per = {f"bend_occlude/seed{s}": {"factorised": {**row, "track_epe_occluded": 4.0 + 0.1 * s},
                                     "no_amodal": {**row, "track_epe_occluded": 6.0 - 0.1 * s}} for s in (0, 1)}
    head, claims, _ = B.summarise(per)
    assert head["track_epe_occluded_no_amodal"] == 5.95 and head["track_epe_occluded"] == 4.05
    c = claims["amodal_lowers_occluded_epe"]["occluded_track_epe"]
    assert c["holds"] is True and c["mean_gain"] == pytest.approx(1.9) and c["seed_spread"] is not None
    one = {"bend_occlude/seed0": per["bend_occlude/seed0"]}
    c1 = B.summarise(one)[1]["amodal_lowers_occluded_epe"]["occluded_track_epe"]
    assert c1["seed_spread"] is None and "one seed" in c1["note"]
    with pytest.raises(SystemExit):
        B.main(["--variants", "nope"])
