"""The per-step profile of the Gaussian stage (issue 22 part 4): parts add up to the step, results unchanged."""
import dataclasses

import torch

from studio.train.gaussian_stage import GaussianDistillStage, GaussianStageConfig
from studio.train.loop import Trainer, TrainerConfig
from studio.train.profile import PARTS, StepProfiler, profiling


def _run(tmp_path, prof=None, steps=8):
    from studio.distill.sds import sds
    from studio.teachers.registry import load_teacher

    teacher = load_teacher("shapeworld-exact", resolution=32)
    cfg = dataclasses.replace(GaussianStageConfig(), init_points=300, densify_start=3, densify_every=3,
                              densify_grad=1e-6)

    def score(ctx):
        return sds(ctx.teacher, ctx.latents, ctx.cond, ctx.t, guidance_scale=ctx.guidance_scale,
                   camera=ctx.camera, generator=ctx.generator)

    torch.manual_seed(0)
    stage = GaussianDistillStage("s", cfg, teacher, "a red cube", score, steps=steps, resolution=32,
                                 guidance_scale=1.0, seed=0)
    tr = Trainer(TrainerConfig(out_dir=tmp_path, seed=0, progress=False, checkpoint_every=0, preview_every=4))
    if prof is None:
        tr.run([stage])
    else:
        with profiling(prof):
            tr.run([stage])
        prof.end()
    return [r["loss"] for r in tr.history], {k: v.detach().clone() for k, v in stage.model.params.items()}


def test_profile_parts_sum_to_the_step_and_change_nothing(tmp_path):
    loss0, params0 = _run(tmp_path / "a")
    prof = StepProfiler()
    loss1, params1 = _run(tmp_path / "b", prof)
    # same losses and same final Gaussians (densification ran: shapes must match too)
    assert loss0 == loss1
    assert params0.keys() == params1.keys()
    for k in params0:
        assert params0[k].shape == params1[k].shape and torch.equal(params0[k], params1[k]), k
    assert len(prof.steps) == 8
    for r in prof.steps:
        measured = sum(r[p] for p in PARTS if p != "other")
        # exclusive sections: nothing counted twice, so the measured parts never exceed the step's wall time
        assert measured <= r["total"] + 1e-6 and r["other"] >= -1e-6
        assert abs(measured + r["other"] - r["total"]) < 1e-9
        for p in ("teacher_forward", "render_forward", "render_backward", "loss_sds", "optimizer_step"):
            assert r[p] > 0, p
    s = prof.summary(skip=2)
    assert s["steps"] == 6 and abs(s["sum_of_parts_ms"] - s["step_ms"]) < 0.01 * s["step_ms"] + 0.01
    # the measured parts cover most of a step (the residual is the Trainer's bookkeeping)
    assert s["share"]["other"] < 0.5
    assert sum(r["densification"] > 0 for r in prof.steps) >= 6
    assert sum(r["preview"] > 0 for r in prof.steps) == 2  # preview_every=4 of 8 steps
