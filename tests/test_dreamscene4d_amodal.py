"""DreamScene4D with ``--amodal teacher``: the part-3 inpainting (``complete_objects``) feeds the lifting stages."""
import pytest

TINY = dict(size=32, frames=4, steps_static=3, steps_deform=2, steps_translate=2, steps_joint=1, init_points=60,
            crop_size=32, batch_frames=2, sds_views=1, sds_views_dynamic=1, orbit_frames=3, video_size=32,
            rho_search=4, kplanes_resolution=4, kplanes_channels=4, kplanes_multires=(1,))


def test_teacher_amodal_route_runs_and_recovers_the_hidden_masks(tmp_path):
    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from studio.runs.skeleton import execute

    cfg = DreamScene4DConfig(video="two_cross", amodal="teacher", inpaint_teacher="shapeworld-exact", inpaint_steps=4,
                             **TINY)
    m = execute(DreamScene4DMethod(), cfg, out=tmp_path, progress=False)
    assert m["status"] == "done" and m["amodal"] == "teacher" and m["inpaint_teacher"] == "shapeworld-exact"
    am, vis = m["amodal_iou"], m["visible_iou"]
    assert len(am) == 2 and min(am) >= 0.9, am  # completed masks close to the scene's amodal masks
    # the house behind the penguin is partly hidden: the completion recovers what the visible mask misses
    assert min(vis) < 0.95 and am[vis.index(min(vis))] > min(vis) + 0.03, (am, vis)
    assert len(sorted((tmp_path / "two-cross" / "ply").glob("frame_*.ply"))) == 4


def test_teacher_amodal_refuses_the_exact_teacher_without_a_scene(tmp_path):
    from methods.dreamscene4d import DreamScene4DConfig, DreamScene4DMethod
    from studio.errors import UserError
    from studio.runs.video_to_4d import VideoInput
    from studio.world.scenes4d import make_scene

    with pytest.raises(UserError, match="--inpaint-steps >= 1"):
        DreamScene4DMethod().validate(DreamScene4DConfig(video="two_cross", amodal="teacher", inpaint_steps=0))
    sc = make_scene("two_cross", size=32, frames=2, seed=0)
    user = VideoInput(sc.frames, sc.masks, sc.cameras, scene=None)  # a user video: no ground truth
    cfg = DreamScene4DConfig(video="clip.mp4", amodal="teacher", sds_weight=0.0, **{**TINY, "frames": 2})
    with pytest.raises(UserError, match="shapeworld-exact needs a ShapeWorld scene"):
        DreamScene4DMethod().reconstruct(cfg, user, tmp_path, progress=False)
