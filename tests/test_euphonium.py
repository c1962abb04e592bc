"""Euphonium as a method (issue 19 parts 2, 5, 6): `studio video rl --method euphonium` end to end on a tiny Wan of
the real classes loaded by path, the presets against each other, the process reward models by name and by folder.
The spec-4.8 properties of the parts are in tests/test_euphonium_parts.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from studio.errors import UserError
from studio.teachers.process_reward import (DenoiserProcessReward, ShapeWorldVideoProcessReward, VideoPRMNet,
                                            load_process_reward)

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from tiny_video_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan", pixel=True)


class ConstantPRM:
    """A process reward with zero gradient (and a constant value, so its process advantages are exactly 0)."""

    def reward_and_grad(self, x, sigma, prompts=None):
        return torch.full((x.shape[0],), 0.5, dtype=x.dtype), torch.zeros_like(x)


def _stage(policy_path, prm=None, **kw):
    from methods.euphonium import EuphoniumConfig, EuphoniumStage
    from studio.runs.video_rl import load_outcome_reward
    from studio.students.video_lora import VideoLoRAStudent
    from studio.teachers.registry import load_video_teacher

    cfg = EuphoniumConfig(policy=str(policy_path), steps=1, sampling_steps=4, group_size=2, prompts_per_step=1,
                          guidance_scale=1.0, guidance_start=1, seed=3, **kw)
    ref = load_video_teacher(str(policy_path))
    policy = VideoLoRAStudent(ref, rank=4, seed=0)
    with torch.no_grad():  # a non-zero adapter, so the policy's gradients are not structurally sparse
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return EuphoniumStage(cfg, policy, ref, load_outcome_reward("shapeworld"), ["a red ball moving left",
                                                                               "a blue cube moving up"], prm=prm)


def _loss_and_grads(stage):
    out = stage.train_step(0, 0.0)
    params = stage.policy.trainable_parameters()
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


@pytest.mark.parametrize("form,base", [("dance-grpo", "dance-grpo"), ("flow-grpo", "flow-grpo")])
def test_euphonium_with_zero_prm_gradient_is_the_baseline_exactly(tiny_wan, form, base):
    """Spec 4.8.1 at the method level: the euphonium preset with a zero-gradient PRM (guidance on, dual-reward
    advantages) takes exactly the baseline's rollouts, loss and gradients."""
    level = {"dance-grpo": 0.25, "flow-grpo": 0.7}[form]
    eu = _stage(tiny_wan, prm=ConstantPRM(), preset="euphonium", sde_form=form, noise_level=level, guidance=5.0)
    ref = _stage(tiny_wan, preset=base)
    assert ref.prm is None and ref.mode == "none" and eu.mode == "both" and ref.form == eu.form == form
    out_e, g_e = _loss_and_grads(eu)
    out_r, g_r = _loss_and_grads(ref)
    assert out_e.logs["guided_steps"] == 3 and out_r.logs["guided_steps"] == 0
    assert torch.equal(out_e.loss, out_r.loss)
    assert all(torch.equal(a, b) for a, b in zip(g_e, g_r))
    assert sum(float(g.abs().sum()) for g in g_e) > 0
    # a real PRM gradient changes the rollouts (and so the loss)
    from studio.teachers.process_reward import load_process_reward as load

    guided = _stage(tiny_wan, prm=load("shapeworld-video-prm"), preset="euphonium", sde_form=form,
                    noise_level=level, guidance=5.0)
    out_g, _ = _loss_and_grads(guided)
    assert not torch.equal(out_g.loss, out_r.loss)


def test_first_update_is_on_policy(tiny_wan):
    """Spec 4.8.6 in the method: at theta = theta_old the recomputed log-probabilities equal the rollout's up to
    float32 rounding of the same computation (ratio 1), also with guided rollouts (unguided-mean log-probs)."""
    st = _stage(tiny_wan, prm=load_process_reward("shapeworld-video-prm"), guidance=5.0)
    out = st.train_step(0, 0.0)
    assert out.logs["ratio_max_dev"] < 1e-4  # inside the 1e-4 trust region: the unclipped branch is used


def test_explicit_distillation_adds_the_regression_on_guided_steps(tiny_wan):
    prm = load_process_reward("shapeworld-video-prm")
    imp = _stage(tiny_wan, prm=prm, guidance=5.0, distill="implicit")
    exp = _stage(tiny_wan, prm=prm, guidance=5.0, distill="explicit", distill_weight=1.0)
    oi, oe = imp.train_step(0, 0.0), exp.train_step(0, 0.0)
    # the same rollouts; the explicit loss adds the (positive) regression term
    assert oi.logs["reward"] == oe.logs["reward"]
    assert oe.logs["distill"] > 0
    torch.testing.assert_close(oe.loss.detach(), oi.loss.detach() + oe.logs["distill"], rtol=1e-5, atol=1e-9)
    with pytest.raises(UserError, match="--prm"):
        _stage(tiny_wan, preset="dance-grpo", distill="explicit")


def test_studio_video_rl_euphonium_end_to_end(tiny_wan, tmp_path):
    from studio.cli import main
    from studio.runs.video_generate import load_video_model
    from studio.teachers.registry import load_video_teacher

    out = tmp_path / "run"
    main(["video", "rl", "--method", "euphonium", "--policy", str(tiny_wan), "--steps", "2", "--sampling-steps", "4",
          "--group-size", "2", "--prompts-per-step", "1", "--guidance-start", "1", "--guidance-scale", "1",
          "--eval-samples", "1", "--eval-every", "1", "--held-out-every", "7", "--distill", "explicit",
          "--lr", "1e-2", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "done" and m["method"] == "euphonium" and m["inference_uses_reward_model"] is False
    assert len(m["held_out_prompts"]) == 3 and m["train_prompts"] == 18
    assert [r["step"] for r in m["curve"]] == [1] and "reward" in m["eval_after"]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 2 and all(h["guided_steps"] == 3 for h in hist)
    meta = json.loads((out / "student" / "student.json").read_text())
    assert meta["reward_model_at_inference"] is False and meta["sampler"]["sampler"] == "flow"
    # the student samples with the plain sampler, no reward model
    main(["video", "generate", "a red ball moving left", "--model", str(out / "student"), "--out", str(tmp_path / "g")])
    g = json.loads((tmp_path / "g" / "a-red-ball-moving-left" / "metrics.json").read_text())
    assert g["sampler"] == "flow" and g["steps"] == 4
    model, _ = load_video_model(out / "student")
    teacher = load_video_teacher(str(tiny_wan))
    x, c = teacher.noise(1, seed=0), teacher.encode_prompt(["a red ball moving left"])
    assert (model.predict(x, 500, c) - teacher.predict(x, 500, c)).abs().max() > 0


def test_full_finetune_writes_a_diffusers_folder(tiny_wan, tmp_path):
    from methods import run
    from methods.euphonium import EuphoniumConfig, EuphoniumMethod
    from studio.runs.video_generate import is_student_folder, load_video_model
    from studio.teachers.registry import load_video_teacher

    cfg = EuphoniumConfig(policy=str(tiny_wan), preset="dance-grpo", finetune="full", steps=1, sampling_steps=3,
                          group_size=2, prompts_per_step=1, guidance_scale=1.0, eval_samples=1, held_out_every=7,
                          lr=1e-3)
    m = run(cfg, EuphoniumMethod(), tmp_path / "full", progress=False)
    folder = Path(m["student"])
    assert not is_student_folder(folder) and (folder / "transformer" / "config.json").is_file()
    model, defaults = load_video_model(folder)
    teacher = load_video_teacher(str(tiny_wan))
    x, c = teacher.noise(1, seed=0), teacher.encode_prompt(["a red ball moving left"])
    assert (model.predict(x, 500, c) - teacher.predict(x, 500, c)).abs().max() > 0
    with pytest.raises(UserError, match="diffusers folder"):
        EuphoniumMethod().validate(EuphoniumConfig(policy="owner/some-hub-model", finetune="full"))


def test_trained_prm_loads_by_name_and_is_small():
    from studio.assets import assets_dir

    prm = load_process_reward("shapeworld-video-prm")
    assert isinstance(prm, VideoPRMNet) and not any(p.requires_grad for p in prm.parameters())
    folder = assets_dir() / "shapeworld-video-prm"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 3_000_000
    training = json.loads((folder / "training.json").read_text())
    assert training["steps"] > 0 and set(training["held_out"]) == {"0.2", "0.4", "0.6", "0.8"}
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    r, g = prm.reward_and_grad(x, 0.5, ["a red ball moving left", "a blue cube moving up"])
    assert r.shape == (2,) and bool(((r > 0) & (r < 1)).all()) and g.shape == x.shape and float(g.abs().sum()) > 0
    # each sample's value depends on its own row and prompt only
    r1 = prm.reward(x[:1], 0.5, ["a red ball moving left"])
    torch.testing.assert_close(r1, r[:1], rtol=1e-5, atol=1e-6)
    assert load_process_reward("none") is None
    exact = load_process_reward("shapeworld-video-exact-prm")
    assert isinstance(exact, ShapeWorldVideoProcessReward) and exact.support == "all"
    with pytest.raises(UserError, match="shapeworld-video-prm"):
        load_process_reward("no-such-prm")
    with pytest.raises(UserError, match="colour"):
        prm.reward(x[:1], 0.5, ["a purple elephant"])


def test_exact_prm_over_all_prompts_scores_the_nearest_reference_against_the_asked_prompt():
    from studio.teachers.shapeworld_video import ShapeWorldVideoExactTeacher

    teacher = ShapeWorldVideoExactTeacher(uncond_prompts=["a red ball moving left", "a red ball moving right"],
                                          uncond_refs_per_prompt=2)
    prm = ShapeWorldVideoProcessReward(teacher, support="all")
    refs = teacher.references("")  # 2 of "moving left", then 2 of "moving right"
    assert refs.shape[0] == 4
    x = 0.9 * refs + 0.1 * torch.randn(refs.shape, generator=torch.Generator().manual_seed(0), dtype=refs.dtype)
    own = prm.reward(x, 0.1, ["a red ball moving left"] * 2 + ["a red ball moving right"] * 2)
    other = prm.reward(x, 0.1, ["a red ball moving right"] * 2 + ["a red ball moving left"] * 2)
    assert bool((own > 0.5).all()) and bool((other < 0.1).all())
    with pytest.raises(UserError, match="support"):
        ShapeWorldVideoProcessReward(teacher, support="some")


def test_denoiser_prm_on_a_real_video_denoiser_class(tiny_wan, tmp_path):
    from studio.teachers.registry import load_video_teacher

    teacher = load_video_teacher(str(tiny_wan))
    prm = DenoiserProcessReward(teacher, str(tiny_wan), hidden=8, seed=1)
    x = teacher.noise(2, seed=0).double().float()
    prompts = ["a red ball moving left", "a blue cube moving up"]
    r, g = prm.reward_and_grad(x, 0.6, prompts)
    assert r.shape == (2,) and g.shape == x.shape and float(g.abs().sum()) > 0
    # the gradient through the whole denoiser against a central difference (float32: loose)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-2
    with torch.no_grad():
        fd = (prm.reward(x + h * d, 0.6, prompts) - prm.reward(x - h * d, 0.6, prompts)).sum() / (2 * h)
    assert float((g * d).sum()) == pytest.approx(float(fd), rel=0.05, abs=1e-4)
    # saved head + recorded backbone path: loads back by folder through the registry's loader
    prm.save_pretrained(tmp_path / "prm")
    back = load_process_reward(tmp_path / "prm")
    assert isinstance(back, DenoiserProcessReward) and not any(p.requires_grad for p in back.head.parameters())
    torch.testing.assert_close(back.reward(x, 0.6, prompts), r)


def test_video_rl_resume_continues(tiny_wan, tmp_path):
    from methods import run
    from methods.euphonium import EuphoniumConfig, EuphoniumMethod
    from studio.runs.video_generate import load_video_model
    from studio.train.loop import TrainingCancelled

    cfg = EuphoniumConfig(policy=str(tiny_wan), steps=2, sampling_steps=4, group_size=2, prompts_per_step=1,
                          guidance_scale=1.0, guidance_start=1, eval_samples=1, held_out_every=7, lr=1e-2,
                          checkpoint_every=1)
    full = run(cfg, EuphoniumMethod(), tmp_path / "a", progress=False)
    with pytest.raises(TrainingCancelled):
        run(cfg, EuphoniumMethod(), tmp_path / "b", progress=False, callbacks=[lambda rec: rec["step"] < 1])
    resumed = run(cfg, EuphoniumMethod(), tmp_path / "b", resume=True, progress=False)
    a, b = load_video_model(tmp_path / "a" / "student")[0], load_video_model(tmp_path / "b" / "student")[0]
    x, c = a.noise(1, seed=1), a.encode_prompt(["a blue cube moving up"])
    torch.testing.assert_close(a.predict(x, 400, c), b.predict(x, 400, c))
    assert resumed["eval_after"]["reward"] == full["eval_after"]["reward"]
