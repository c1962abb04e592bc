"""The nerfstudio plugin (issue 23): ``ns-train studio-sds`` through nerfstudio's own registry and Trainer.

nerfstudio pins numpy<2 and its own gsplat, so it lives in its own environment (``.ci/nerfstudio.sh`` builds
one and runs this file there); elsewhere the whole file is skipped.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("nerfstudio", reason="nerfstudio is not installed here: it lives in its own venv "
                                         "(.ci/nerfstudio.sh, docs/notes/issue23.md)")

from nerfstudio.plugins.registry import discover_methods  # noqa: E402

from studio.io.ply import read_ply  # noqa: E402

PROMPT = "a red cube"


def trainer_config(tmp_path, steps: int, **stage):
    from studio.nerfstudio_plugin.method_configs import studio_sds

    cfg = dataclasses.replace(studio_sds.config)
    cfg.output_dir = tmp_path
    cfg.vis = "tensorboard"
    cfg.max_num_iterations = steps
    cfg.steps_per_save = steps
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10**6
    cfg.machine.device_type = "cpu"
    cfg.pipeline = dataclasses.replace(cfg.pipeline)
    cfg.pipeline.model = dataclasses.replace(
        cfg.pipeline.model, prompt=PROMPT, teacher="shapeworld-exact", steps=steps, seed=0,
        stage=dataclasses.replace(cfg.pipeline.model.stage, **{"init_points": 1000, "batch_size": 2, **stage}))
    cfg.set_timestamp()
    return cfg


def gt_mse(pipeline) -> float:
    """Mean squared error of the student's renders to ShapeWorld's ground truth at the held-out views."""
    ds = pipeline.datamanager.eval_dataset
    errs = []
    for i in range(len(ds)):
        out = pipeline.model.get_outputs_for_camera(ds.cameras[i:i + 1])
        errs.append(((out["rgb"] - ds[i]["image"]) ** 2).mean())
    return float(torch.stack(errs).mean())


def test_methods_in_nerfstudio_registry():
    methods, descriptions = discover_methods()
    for name in ("studio-sds", "studio-vsd"):
        assert name in methods, f"{name} not registered through the nerfstudio.method_configs entry point"
        assert methods[name].method_name == name
        assert "Studio" in descriptions[name]


def test_cameras_round_trip():
    from studio.cameras import orbit_cameras
    from studio.nerfstudio_plugin.pipeline import from_nerfstudio_cameras, to_nerfstudio_cameras

    cams = orbit_cameras([10.0, 30.0], [0.0, 95.0], 3.2, 40.0, 48, 32)
    ns = to_nerfstudio_cameras(cams)
    # nerfstudio's world is z-up: a camera above the object (elevation > 0) has z > 0
    assert bool((ns.camera_to_worlds[:, 2, 3] > 0).all())
    back = from_nerfstudio_cameras(ns)
    assert (back.width, back.height) == (48, 32)
    torch.testing.assert_close(back.viewmats, cams.viewmats, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.Ks, cams.Ks)


def test_train_lowers_ground_truth_error_checkpoint_resume_export(tmp_path):
    from nerfstudio.engine.trainer import Trainer

    from studio.nerfstudio_plugin.export import export_ply

    steps = 12
    cfg = trainer_config(tmp_path, steps)
    trainer = Trainer(cfg)
    trainer.setup()
    pipe = trainer.pipeline
    before = gt_mse(pipe)
    trainer.train()
    after = gt_mse(pipe)
    assert len(pipe.history) == steps, "every step went through the studio optimizer step"
    print(f"ground-truth MSE at the held-out views: {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, f"ground-truth MSE {before:.4f} -> {after:.4f}: training did not approach the cube"

    ckpts = sorted(trainer.checkpoint_dir.glob("step-*.ckpt"))
    assert [c.name for c in ckpts] == [f"step-{steps - 1:09d}.ckpt"]
    ply = export_ply(cfg.get_base_dir(), tmp_path / "model.ply")  # the run folder: its newest checkpoint
    d = read_ply(ply)
    g = pipe.model.gaussians
    assert d["means"].shape == (g.num_gaussians, 3)
    torch.testing.assert_close(d["means"], g.params["means"].detach())
    torch.testing.assert_close(d["opacities"], g.params["opacities"].detach())  # both logits

    # resume the nerfstudio way (--load-dir): the studio stage comes back as it was saved
    cfg2 = trainer_config(tmp_path / "resumed", steps)
    cfg2.load_dir = trainer.checkpoint_dir
    t2 = Trainer(cfg2)
    t2.setup()
    assert t2._start_step == steps
    torch.testing.assert_close(t2.pipeline.model.gaussians.params["means"], g.params["means"].detach())
    sd = {k: o.state_dict()["state"] for k, o in t2.pipeline.stage.optimizers().items()}
    assert all(len(s) > 0 for s in sd.values()), "the studio optimizers' Adam state was restored"
