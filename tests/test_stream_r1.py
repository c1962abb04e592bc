"""Stream-R1 as a method (methods/stream_r1.py, issue 18 part 5) on a tiny architecture-true pixel Wan loaded by
path: the spec 3.6 properties at method level (beta = 0 and W = 1 is Self-Forcing DMD exactly; Reward Forcing reads
the motion axis only; f_fake = f_real gives no generator gradient whatever the reward; no reward-gradient path into
the generator; the critic loss carries no reward weighting), the two-time-scale update ratio through the one
Trainer, the end-to-end run and the CLI, the causal student folder and streaming generation (frames written as blocks
finish, constant per-block cost with the KV window). The function-level properties are in test_stream_r1_parts.py."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from methods import run
from methods.stream_r1 import ODEInitStage, StreamR1Config, StreamR1Method, StreamR1Stage
from studio.distill.dmd import dmd_generator_loss, dmd_gradient
from studio.distill.reward_weighting import fuse_saliency, intra_perplexity_weights
from studio.runs.video_distill import VideoData, resolve_prompts
from studio.runs.video_generate import VideoGenerateConfig, VideoGenerateMethod, causal_sample, load_video_model
from studio.teachers.rewards import RewardModel, ShapeWorldReward
from studio.teachers.registry import load_video_teacher

sys.path.insert(0, str(Path(__file__).parent))

PROMPT = "a red cube moving left"


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from tiny_video_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("sr1") / "wan", pixel=True, num_frames=8)


def _cfg(path, **kw):
    base = dict(teacher=str(path), block_size=2, local_attn_size=6, sink_size=2, batch_size=1, ode_steps=0,
                eval_prompts=0, seed=3)
    return StreamR1Config(**{**base, **kw})


def _stage(path, reward=None, **kw) -> StreamR1Stage:
    """A DMD stage on fresh networks (same seeds -> same weights) with a perturbed generator (not the teacher)."""
    cfg = _cfg(path, **kw)
    m = StreamR1Method()
    teacher = load_video_teacher(cfg.teacher)
    gen = m.make_student(cfg, teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return StreamR1Stage(cfg, teacher, gen, m._nets.critic, reward or ShapeWorldReward(), resolve_prompts("static"))


def _grads(stage: StreamR1Stage, loss: torch.Tensor) -> list[torch.Tensor]:
    params = stage.generator.trainable_parameters()
    return [torch.zeros_like(p) if x is None else x
            for p, x in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


class LinearReward(RewardModel):
    """A differentiable reward whose logits are linear in the pixels: its saliency is constant (W = 1). Records
    whether the pixels it was given carried a graph (they must not: rewards are numbers to the generator)."""

    name = "linear"

    def __init__(self):
        super().__init__({})
        self.saw_graph = []

    def saliency(self, videos, prompts):
        self.saw_graph.append(videos.requires_grad or videos.grad_fn is not None)
        return super().saliency(videos, prompts)

    def scores(self, videos, prompts):
        self.saw_graph.append(videos.requires_grad or videos.grad_fn is not None)
        return super().scores(videos, prompts)

    def logits(self, videos, prompts):
        s = videos.sum((1, 2, 3, 4)) / videos[0].numel()
        return torch.stack([0.3 * s, -0.2 * s + 0.1, 0.5 * s - 0.4], -1)


# ------------------------------------------------------------------------------------------ spec 3.6 at method level
def test_beta_zero_and_flat_W_is_self_forcing_dmd_exactly(tiny_wan):
    """3.6 (1): the ``dmd`` preset, ``stream-r1`` with beta = 0 and a constant-saliency reward (W = 1), and plain
    Self-Forcing DMD written out by hand give the same loss value and the same generator gradients."""
    plain = _stage(tiny_wan, preset="dmd")
    loss_dmd, _ = plain.generator_loss(0)
    g_dmd = _grads(plain, loss_dmd)
    sr1 = _stage(tiny_wan, LinearReward(), preset="stream-r1", beta=0.0, balance_warmup=1)
    loss_sr1, logs = sr1.generator_loss(0)
    assert torch.equal(loss_sr1.detach(), loss_dmd.detach()) and logs["sample_weight"] == 1.0
    for a, b in zip(_grads(sr1, loss_sr1), g_dmd):
        assert torch.equal(a, b)
    # by hand: rollout with the stage's seed and random exit step, DMD gradient, surrogate loss
    hand = _stage(tiny_wan, preset="dmd")
    cond = hand.real.encode_prompt(hand.draw_prompts(0, 0), "")
    x = hand.generator.rollout(cond, seed=hand.rollout_seed(0, 0), grad_exit_step="random")
    out = dmd_gradient(hand.real, hand.critic, x, cond, guidance_scale=4.0, generator=hand.gen)
    loss = dmd_generator_loss(x, out.grad)
    assert torch.equal(loss.detach(), loss_dmd.detach())
    for a, b in zip(_grads(hand, loss), g_dmd):
        assert torch.equal(a, b)
    assert any(float(a.abs().max()) > 0 for a in g_dmd)
    # and beta != 0 does change them
    rf = _stage(tiny_wan, LinearReward(), preset="reward-forcing")
    loss_rf, logs_rf = rf.generator_loss(0)
    assert logs_rf["sample_weight"] != 1.0 and not torch.equal(loss_rf.detach(), loss_dmd.detach())


def test_reward_forcing_weights_each_rollout_by_its_motion_reward(tiny_wan):
    """3.6 (2): Reward Forcing is exp(beta r_MQ) per rollout (per sample, batch of 2), no W, no balance penalty."""
    stage = _stage(tiny_wan, preset="reward-forcing", batch_size=2)
    prompts = stage.draw_prompts(0, 0)
    cond = stage.real.encode_prompt(prompts, "")
    with torch.no_grad():
        x = stage.generator.rollout(cond, seed=stage.rollout_seed(0, 0), grad_exit_step="random")
    rewards, saliency = stage.score(x, prompts)
    assert saliency is None and rewards.shape == (2, 3)
    direct = ShapeWorldReward().scores(stage.real.decode(x).float(), prompts)
    torch.testing.assert_close(rewards, direct)
    _, logs = stage.generator_loss(0)
    expect = torch.exp(2.0 * direct[:, 1].double()).mean()
    assert math.isclose(logs["sample_weight"], float(expect), rel_tol=1e-9)
    assert direct[0, 1] != direct[1, 1] and logs["balance_penalty"] == 0.0


def test_equal_scores_give_no_generator_gradient_whatever_the_reward(tiny_wan):
    """3.6 (3): at initialisation the critic is an exact copy of the real score; without CFG f_fake = f_real, so
    g = 0 and the generator gets no gradient even with a large reward weight and saliency weights."""
    stage = _stage(tiny_wan, LinearReward(), preset="stream-r1", guidance_scale=1.0, beta=5.0)
    loss, logs = stage.generator_loss(0)
    assert logs["sample_weight"] != 1.0
    assert all(float(g.abs().max()) == 0.0 for g in _grads(stage, loss))
    with_cfg = _stage(tiny_wan, LinearReward(), preset="stream-r1", beta=5.0)
    loss2, _ = with_cfg.generator_loss(0)
    assert any(float(g.abs().max()) > 0 for g in _grads(with_cfg, loss2))


def test_no_reward_gradient_reaches_the_generator(tiny_wan):
    """3.6 (4): the reward sees detached pixels only; the generator's gradients are those of the W-weighted DMD
    surrogate scaled by the scalar exp(beta r) -- nothing else."""
    spy = LinearReward()
    stage = _stage(tiny_wan, spy, preset="stream-r1")
    loss, logs = stage.generator_loss(0)
    assert spy.saw_graph == [False]
    got = _grads(stage, loss)
    ref = _stage(tiny_wan, LinearReward(), preset="dmd")
    prompts = ref.draw_prompts(0, 0)
    cond = ref.real.encode_prompt(prompts, "")
    x = ref.generator.rollout(cond, seed=ref.rollout_seed(0, 0), grad_exit_step="random")
    r, sal = LinearReward().saliency(ref.real.decode(x.detach()).float(), prompts)
    out = dmd_gradient(ref.real, ref.critic, x, cond, guidance_scale=4.0, generator=ref.gen)
    from studio.distill.reward_weighting import saliency_to_latent_grid

    W = intra_perplexity_weights(fuse_saliency(saliency_to_latent_grid(sal.double(), x.shape[-3:]), r))[:, None]
    base = _grads(ref, dmd_generator_loss(x, out.grad, element_weight=W.float()))
    scale = math.exp(2.0 * float(r.double().mean()))
    assert math.isclose(logs["sample_weight"], scale, rel_tol=1e-6)
    top = max(float(b.abs().max()) for b in base) * scale
    assert top > 0
    # float32 backward of sums over the N latent elements: error bound N * eps32 of the largest gradient
    tol = x.numel() * torch.finfo(torch.float32).eps * top
    for a, b in zip(got, base):
        assert float((a - scale * b).abs().max()) <= tol


def test_critic_loss_carries_no_reward_weighting(tiny_wan):
    """3.3 step 8: the critic's flow-matching loss is the same under every preset."""
    losses = [_stage(tiny_wan, preset=p).critic_loss(1) for p in ("dmd", "reward-forcing", "stream-r1")]
    assert losses[0] > 0 and all(torch.equal(losses[0].detach(), x.detach()) for x in losses[1:])


# ------------------------------------------------------------------------------------------ the method end to end
def test_method_trains_with_the_update_ratio_and_writes_a_causal_student(tiny_wan, tmp_path):
    cfg = _cfg(tiny_wan, steps=5, update_ratio=2, ode_steps=2, ode_pairs=2, ode_substeps=1, ode_batch_size=1,
               eval_prompts=1, checkpoint_every=100)
    teacher = load_video_teacher(cfg.teacher)
    before = {k: v.clone() for k, v in teacher.denoiser.state_dict().items()}
    m = run(cfg, StreamR1Method(), tmp_path, progress=False)
    hist = json.loads((tmp_path / "history.json").read_text())
    ode = [h for h in hist if h["stage"] == "ode-init"]
    dmd = [h for h in hist if h["stage"] == "dmd"]
    assert len(ode) == 2 and len(dmd) == 5
    assert all("loss/generator" in h for h in ode)
    assert [("loss/generator" in h) for h in dmd] == [True, False, True, False, True]  # critic:generator 2:1 here
    assert all("loss/critic" in h for h in dmd) and "reward_mq" in dmd[0] and "sample_weight" in dmd[0]
    meta = json.loads(Path(m["student"], "student.json").read_text())
    assert meta["student"] == "causal-wan" and meta["sampler"]["sampler"] == "causal" and meta["method"] == "stream-r1"
    assert "student_4_motion_accuracy" in m["headline"]
    # the real score never moved (a fresh load of the same folder is what the run used)
    for k, v in load_video_teacher(cfg.teacher).denoiser.state_dict().items():
        assert torch.equal(v, before[k])
    # the student folder differs from the teacher (it trained) and carries its stream options
    model, defaults = load_video_model(m["student"])
    assert (model.block_size, model.local_attn_size, model.sink_size) == (2, 6, 2)
    assert defaults["sampler"] == "causal" and defaults["steps"] == 4
    moved = [float((a - before[n]).abs().max()) for n, a in model.denoiser.named_parameters() if n in before]
    assert max(moved) > 0
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("stages.dmd.critic.") for k in state) and any("generator_ema" in k for k in state)


def test_lora_generator_and_critic(tiny_wan, tmp_path):
    cfg = _cfg(tiny_wan, steps=1, lora_rank=4, critic_lora_rank=2)
    m = StreamR1Method()
    teacher = load_video_teacher(cfg.teacher)
    gen = m.make_student(cfg, teacher)
    names = [n for n, p in gen.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all("lora_" in n for n, p in m._nets.critic.denoiser.named_parameters() if p.requires_grad)
    stage = StreamR1Stage(cfg, teacher, gen, m._nets.critic, ShapeWorldReward(), resolve_prompts("static"))
    loss, _ = stage.generator_loss(0)
    assert any(float(g.abs().max()) > 0 for g in _grads(stage, loss))
    # a LoRA student folder holds only the adapter and loads back to the same rollout
    from studio.runs.video_generate import write_student

    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.01)
    folder = write_student(tmp_path / "student", gen, teacher=str(tiny_wan), sampler=StreamR1Method().sampler(cfg))
    model, _ = load_video_model(folder)
    assert model.lora_rank == 4
    with torch.no_grad():
        torch.testing.assert_close(model.rollout([PROMPT], seed=1), gen.rollout([PROMPT], seed=1))


def test_ode_init_stage_regresses_onto_teacher_trajectories(tiny_wan):
    cfg = _cfg(tiny_wan, ode_pairs=2, ode_substeps=1, ode_batch_size=2, ode_lr=3e-3)
    m = StreamR1Method()
    teacher = load_video_teacher(cfg.teacher)
    gen = m.make_student(cfg, teacher)
    stage = ODEInitStage(cfg, teacher, gen, resolve_prompts("static"))
    traj, ts = stage.pairs()
    assert traj.shape[:2] == (2, 5) and ts == [999, 749, 499, 249]
    losses = []
    for step in range(6):
        stage.opt.zero_grad()
        loss = stage.train_step(step, 0.0).loss["generator"]
        loss.backward()
        stage.opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_cli_stream_r1_then_streaming_generate(tiny_wan, tmp_path):
    from studio.cli import main

    out = tmp_path / "run"
    main(["video", "distill", "--method", "stream-r1", "--teacher", str(tiny_wan), "--preset", "dmd", "--steps", "2",
          "--ode-steps", "1", "--ode-pairs", "1", "--ode-substeps", "1", "--ode-batch-size", "1",
          "--block-size", "2", "--local-attn-size", "4", "--sink-size", "1", "--eval-prompts", "0", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "stream-r1" and m["status"] == "done"
    cfg = (out / "config.yaml").read_text()
    assert "preset: dmd" in cfg
    gen = tmp_path / "gen"
    main(["video", "generate", PROMPT, "--model", str(out / "student"), "--num-frames", "20", "--out", str(gen)])
    folder = next(p for p in gen.iterdir() if p.is_dir())
    g = json.loads((folder / "metrics.json").read_text())
    assert g["sampler"] == "causal" and g["frames"] == 20
    assert g["streamed"]["blocks"] == 10 and g["streamed"]["frames_written_while_generating"] == 20
    assert len(list((folder / "frames").glob("0_*.png"))) == 20 and (folder / "video.mp4").is_file()
    with pytest.raises(SystemExit) as e:
        main(["video", "distill", "--method", "stream-r1", "--teacher", str(tiny_wan), "--update-ratio", "0",
              "--out", str(tmp_path / "bad")])
    assert e.value.code == 2


def test_streaming_writes_frames_as_blocks_finish_with_constant_block_cost(tiny_wan, tmp_path):
    """Frames are on disk before the next block starts; a long stream (24 frames, window 6 with 2 sinks) attends
    to the same number of keys in every block once the window is full, and the cache holds at most the window."""
    from studio.runs.video_generate import write_student

    cfg = _cfg(tiny_wan)
    teacher = load_video_teacher(cfg.teacher)
    gen = StreamR1Method().make_student(cfg, teacher)
    folder = write_student(tmp_path / "student", gen, teacher=str(tiny_wan), sampler=StreamR1Method().sampler(cfg))
    model, _ = load_video_model(folder)
    streamed = {"frames": 0, "blocks": 0, "block_seconds": []}
    writer = VideoGenerateMethod._frame_writer(model, tmp_path / "out", streamed)
    seen = []

    def on_block(b, latents):
        writer(b, latents)
        seen.append((b, len(list((tmp_path / "out" / "frames").glob("*.png")))))

    video = causal_sample(model, [PROMPT], steps=2, num_frames=24, on_block=on_block)
    assert video.shape[:2] == (1, 24)
    assert seen == [(b, 2 * (b + 1)) for b in range(12)]
    cache = model.init_block_cache()
    with torch.no_grad():
        model.rollout([PROMPT], 24, seed=0, kv_cache=cache, denoising_steps=(1000, 500))
    keys = {}
    for start, k in cache.key_counts:
        keys.setdefault(start, set()).add(k)
    assert all(len(v) == 1 for v in keys.values())
    per_block = [keys[s].pop() for s in sorted(keys)]
    assert per_block[2:] == [per_block[2]] * (len(per_block) - 2) and per_block[1] < per_block[2]
    assert len(cache.cached_frames()) <= 6
    # a student folder is replaced whole: a second write swaps it, leaving no temporary folders
    write_student(folder, gen, teacher=str(tiny_wan), sampler={"sampler": "causal", "steps": 2})
    assert json.loads((folder / "student.json").read_text())["sampler"]["steps"] == 2
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_generate_rejects_the_causal_sampler_for_a_teacher(tiny_wan, tmp_path):
    from studio.errors import UserError

    with pytest.raises(UserError, match="causal"):
        run(VideoGenerateConfig(PROMPT, model=str(tiny_wan), sampler="causal", steps=2), VideoGenerateMethod(),
            tmp_path, progress=False)


def test_stream_r1_step_with_the_real_videoreward_class_by_path(tiny_wan, tmp_path):
    """Tier 1: the generator step with a tiny random VideoReward (Qwen2-VL + reward head) loaded by path through
    ``--reward DIR`` (``load_reward``): z-scores from its config, pixel saliency -> W, a finite weighted loss."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from studio.teachers.rewards import VideoAlignReward, load_reward

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(tmp_path / "vr")
    save_file({"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, str(tmp_path / "vr" / "reward_head.safetensors"))
    stats = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 1.0, "TA_mean": 0.0, "TA_std": 4.0}
    (tmp_path / "vr" / "model_config.json").write_text(json.dumps({"inference_config": stats, "use_norm": True,
                                                                   "reward_token_ids": [294, 295, 296]}))
    reward = load_reward(str(tmp_path / "vr"))
    assert isinstance(reward, VideoAlignReward)
    stage = _stage(tiny_wan, reward, preset="stream-r1")
    loss, logs = stage.generator_loss(0)
    assert torch.isfinite(loss) and {"reward_vq", "reward_mq", "reward_ta"} <= set(logs)
    assert any(float(g.abs().max()) > 0 for g in _grads(stage, loss))
    assert not any(p.requires_grad for p in reward.parameters())


def test_ode_regression_with_clean_context(tiny_wan):
    """Self-Forcing's ODE init draws the clean end point too (t = 0: clean context, as the rollout's cache holds);
    those frames are left out of the loss."""
    from studio.distill.ode_regression import ode_regression_inputs, ode_regression_loss
    from studio.students.causal_video import CausalWanStudent, teacher_ode_pairs

    teacher = load_video_teacher(str(tiny_wan))
    cond = teacher.encode_prompt([PROMPT], "")
    pairs = teacher_ode_pairs(teacher, cond, num_frames=4, substeps=1, seed=1)
    K = pairs.trajectory.shape[1] - 1
    x_t, t_frames, _ = ode_regression_inputs(pairs.trajectory, pairs.timesteps, 2, index=torch.tensor([[K, 1]]),
                                             clean_context=True)
    assert torch.equal(x_t[:, :, :2], pairs.trajectory[:, -1, :, :2]) and t_frames.tolist()[0][:2] == [0.0, 0.0]
    with pytest.raises(ValueError, match="index"):
        ode_regression_inputs(pairs.trajectory, pairs.timesteps, 2, index=torch.tensor([[K, 1]]))
    draws = ode_regression_inputs(pairs.trajectory, pairs.timesteps, 2, clean_context=True,
                                  generator=torch.Generator().manual_seed(0))[2]
    st = CausalWanStudent(teacher, block_size=2)
    idx = torch.tensor([[K, 2]])
    loss = ode_regression_loss(st, pairs.trajectory, pairs.timesteps, cond, index=idx, clean_context=True)
    with torch.no_grad():
        xi, tf, _ = ode_regression_inputs(pairs.trajectory, pairs.timesteps, 2, index=idx, clean_context=True)
        pred = st.predict_frames(xi, tf.long(), cond)
    expect = ((pred - pairs.trajectory[:, -1]) ** 2)[:, :, 2:].mean()
    torch.testing.assert_close(loss.detach(), expect)
    assert int(draws.max()) <= K


def test_init_from_a_student_folder_skips_the_ode_stage(tiny_wan, tmp_path):
    from studio.runs.video_generate import write_student

    cfg = _cfg(tiny_wan)
    teacher = load_video_teacher(cfg.teacher)
    gen = StreamR1Method().make_student(cfg, teacher)
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.03)
    folder = write_student(tmp_path / "init", gen, teacher=str(tiny_wan), sampler={"sampler": "causal"})
    m = StreamR1Method()
    cfg2 = _cfg(tiny_wan, init=str(folder), ode_steps=5, steps=1)
    started = m.make_student(cfg2, teacher)
    for a, b in zip(started.trainable_parameters(), gen.trainable_parameters()):
        assert torch.equal(a, b)
    data = VideoData("shapeworld", teacher, resolve_prompts("static"))
    assert [s.name for s in m.stages(cfg2, teacher, started, data)] == ["dmd"]
    from studio.errors import UserError

    with pytest.raises(UserError, match="LoRA"):
        StreamR1Method().make_student(_cfg(tiny_wan, init=str(folder), lora_rank=2), teacher)
