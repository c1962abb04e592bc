"""The causal streaming Wan student (issue 18 part 2): streaming rollout == O(blocks^2) reference rollout, constant
per-block cost with a rolling window, attention sinks kept, full / LoRA training state, three separate networks,
ODE-regression initialisation. Tiny architecture-true pixel-space Wan loaded by path."""
from __future__ import annotations

import copy

import pytest
import torch

from studio.distill.ode_regression import ode_regression_inputs, ode_regression_loss
from studio.errors import UserError
from studio.students.causal_video import (
    CausalWanStudent,
    StreamingKVCache,
    WanScore,
    attended_frames,
    block_causal_mask,
    build_stream_networks,
    teacher_ode_pairs,
)
from studio.teachers.sampling import causal_block_rollout

TOKENS = 16  # tiny pixel Wan: 16 px frames, patch (1, 4, 4) -> 4 x 4 tokens per latent frame


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    from tiny_video_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("causal") / "wan", pixel=True, num_frames=8)


@pytest.fixture(scope="module")
def teacher(wan_path):
    from studio.teachers.diffusers_video import WanTeacher

    return WanTeacher.from_pretrained(str(wan_path))


@pytest.fixture(scope="module")
def cond(teacher):
    return teacher.encode_prompt(["a red cube moving left"], "")


# ------------------------------------------------------------------------------------------ masks, windows
def test_block_causal_mask_and_window_rules():
    m = block_causal_mask(4, 2, 2)
    blocks = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.equal(m, blocks[None, :] <= blocks[:, None])
    assert attended_frames(6, 2) == [0, 1, 2, 3, 4, 5]                        # no window: everything before
    assert attended_frames(10, 2, local_attn_size=6, sink_size=2) == [0, 1, 8, 9]  # sinks + 6 - 2 - 2 recent
    assert attended_frames(2, 2, local_attn_size=6, sink_size=2) == [0, 1]
    assert attended_frames(10, 3, local_attn_size=9, sink_size=3) == [0, 1, 2, 7, 8, 9]  # Stream-R1's 9 / 3
    with pytest.raises(UserError, match="local_attn_size"):
        StreamingKVCache(1, block_size=3, local_attn_size=5, sink_size=3)


def test_plain_call_is_the_teacher(teacher, cond):
    """The critic's copy computes exactly what the teacher does; the causal student with one block covering the
    clip (no mask left, per-token timesteps all equal) equals it to float32 rounding."""
    x = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = teacher.predict(x, 500, cond, output="sample")
    with torch.no_grad():
        assert torch.equal(WanScore(teacher).predict(x, 500, cond, output="sample"), ref)
        one_block = CausalWanStudent(teacher, block_size=8).predict(x, 500, cond, output="sample")
    assert (one_block - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_full_sequence_forward_is_block_causal(teacher, cond):
    st = CausalWanStudent(teacher, block_size=2)
    x = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([[900] * 2 + [500] * 2 + [100] * 2 + [300] * 2])
    with torch.no_grad():
        a = st._forward(x, t, cond.embeds)
        x2 = x.clone()
        x2[:, :, 4:] += 1.0
        b = st._forward(x2, t, cond.embeds)
    assert torch.equal(a[:, :, :4], b[:, :, :4])           # earlier blocks never see later frames
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ twin equality
def _rollouts(st, cond, **kw):
    with torch.no_grad():
        ref = causal_block_rollout(st.reference(), cond, 8, block_size=st.block_size, seed=5, **kw)
        out = st.rollout(cond, 8, seed=5, **kw)
    return ref, out


def test_streaming_rollout_equals_reference_float64_and_float32(teacher, cond):
    """Window covering the whole video (None, and a finite window >= the clip): the KV-cache rollout equals the
    reference rollout. float64 to 1e-10 (same computation, summation order only); float32 within 10x the
    reference's own float32 rounding error (measured against float64)."""
    st32 = CausalWanStudent(teacher, block_size=2)
    st64 = copy.deepcopy(st32).double()
    ref64, out64 = _rollouts(st64, cond)
    assert out64.dtype == torch.float64
    assert (out64 - ref64).abs().max() <= 1e-10 * ref64.abs().max()
    ref32, out32 = _rollouts(st32, cond)
    rounding = (ref32.double() - ref64).abs().max().item()
    assert 0 < rounding < 1e-3
    assert (out32.double() - ref32.double()).abs().max().item() <= 10 * rounding
    wide = CausalWanStudent(teacher, block_size=2, local_attn_size=8, sink_size=2)
    ref_w, out_w = _rollouts(wide, cond)
    assert (out_w - ref_w).abs().max().item() <= 10 * rounding
    assert (out_w - out32).abs().max().item() <= 10 * rounding  # same network, same video


def test_streaming_equals_reference_with_cfg_and_context_noise(teacher, cond):
    st = CausalWanStudent(teacher, block_size=2)
    ref, out = _rollouts(st, cond, guidance_scale=2.0, context_noise=250)
    plain, _ = _rollouts(st, cond)
    assert (ref - plain).abs().max() > 1e-3                        # the options change the video
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_exit_step_rollout_equals_reference(teacher, cond):
    """Self-Forcing's random exit step, shared by all blocks: the same values through both paths, and the same
    parameter gradient for the first block (no context). Later blocks differ on purpose: the streaming path reads
    the context from the cache, written under no_grad as Self-Forcing does, while the reference re-runs the
    context through the network with grad enabled (its input detached, its keys / values not)."""
    st = CausalWanStudent(teacher, block_size=2)
    params = st.trainable_parameters()
    outs, grads = [], []
    for model in (st.reference(), st):
        out = causal_block_rollout(model, cond, 4, block_size=2, seed=6, grad_exit_step="random",
                                   denoising_steps=(1000, 500))
        assert out.requires_grad
        outs.append(out)
        g = torch.autograd.grad(out[:, :, :2].square().sum(), params, allow_unused=True)
        grads.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * outs[0].abs().max()
    scale = max(x.abs().max().item() for x in grads[0])
    assert scale > 0
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-4 * scale


# ------------------------------------------------------------------------------------------ cost, sinks
def test_per_block_cost_is_constant_with_rolling_window(teacher, cond):
    """16 latent frames in blocks of 2, window 6 frames with 2 sinks: once the window is full every block attends
    to 6 * 16 keys, and the cache never holds more than the window; without a window the keys grow per block."""
    st = CausalWanStudent(teacher, block_size=2, local_attn_size=6, sink_size=2, denoising_steps=(1000, 500))
    cache = st.init_block_cache()
    with torch.no_grad():
        st.rollout(cond, 16, seed=7, kv_cache=cache)
    per_block: dict[int, set[int]] = {}
    for start, keys in cache.key_counts:
        per_block.setdefault(start, set()).add(keys)
    assert sorted(per_block) == list(range(0, 16, 2))
    assert all(len(v) == 1 for v in per_block.values())  # every call of a block: same cost
    keys = [per_block[s].pop() for s in sorted(per_block)]
    assert keys[:3] == [2 * TOKENS, 4 * TOKENS, 6 * TOKENS]
    assert keys[2:] == [6 * TOKENS] * 6
    assert len(cache.cached_frames()) <= 6
    full = CausalWanStudent(teacher, block_size=2, denoising_steps=(1000, 500))
    cache_full = full.init_block_cache()
    with torch.no_grad():
        full.rollout(cond, 16, seed=7, kv_cache=cache_full)
    grown = sorted({(s, k) for s, k in cache_full.key_counts})
    assert [k for _, k in grown] == [(s + 2) * TOKENS for s in range(0, 16, 2)]


def test_sinks_are_kept(teacher, cond):
    st = CausalWanStudent(teacher, block_size=2, local_attn_size=6, sink_size=2, denoising_steps=(1000, 500))
    cache = st.init_block_cache()
    with torch.no_grad():
        out = st.rollout(cond, 16, seed=8, kv_cache=cache)
    for layer in range(len(st.denoiser.blocks)):
        assert cache.cached_frames(layer) == [0, 1, 12, 13, 14, 15]  # sinks, recent context, last block
    # the sinks hold what the first block's context re-encoding wrote (the clean first block at t = 0)
    first = st.init_block_cache()
    with torch.no_grad():
        st.forward_block(out[:, :, :2], torch.zeros(1, dtype=torch.long), cond, None, first)
    for layer in range(len(st.denoiser.blocks)):
        for f in (0, 1):
            assert torch.allclose(cache.frames[layer][f][0], first.frames[layer][f][0], atol=1e-6)
    # and they matter: without sinks (same window) the late blocks differ
    no_sink = CausalWanStudent(teacher, block_size=2, local_attn_size=6, sink_size=0, denoising_steps=(1000, 500))
    no_sink.denoiser.load_state_dict(st.denoiser.state_dict())
    with torch.no_grad():
        out2 = no_sink.rollout(cond, 16, seed=8)
    assert torch.allclose(out[:, :, :6], out2[:, :, :6], atol=1e-5)  # window not yet full: same
    assert (out[:, :, 8:] - out2[:, :, 8:]).abs().max() > 1e-4


def test_rope_table_limit_is_a_clear_error(teacher):
    st = CausalWanStudent(teacher, block_size=2)
    with pytest.raises(UserError, match="rope_max_seq_len"):
        st._block_rotary(torch.zeros(1, 3, 2, 16, 16), start=31)


# ------------------------------------------------------------------------------------------ networks
def test_three_networks_full_and_lora(teacher, cond):
    nets = build_stream_networks(teacher, block_size=2)
    gen, critic, real = nets
    assert real is teacher and not any(p.requires_grad for p in real.parameters())
    assert all(p.requires_grad for p in gen.denoiser.parameters())
    assert all(p.requires_grad for p in critic.denoiser.parameters())
    ptrs = [{p.data_ptr() for p in m.denoiser.parameters()} for m in (gen, critic, real)]
    assert not (ptrs[0] & ptrs[1]) and not (ptrs[0] & ptrs[2]) and not (ptrs[1] & ptrs[2])
    # a generator loss reaches only the generator
    out = gen.rollout(cond, 4, seed=1, grad_exit_step=0)
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.trainable_parameters())
    assert all(p.grad is None for p in critic.denoiser.parameters())
    assert all(p.grad is None for p in real.parameters())
    # LoRA: only the adapter trains, and it starts as the copy (B = 0)
    lora = build_stream_networks(teacher, block_size=2, lora_rank=4, critic_lora_rank=2)
    names = [n for n, p in lora.generator.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(".attn1.to_q." in n for n in names)
    assert all("lora_" in n for n, p in lora.critic.denoiser.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(lora.generator.rollout(cond, 4, seed=2), nets.generator.rollout(cond, 4, seed=2))
    lora_out = lora.generator.rollout(cond, 4, seed=2, grad_exit_step=1)
    lora_out.mean().backward()
    grads = {n: p.grad for n, p in lora.generator.denoiser.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B = 0 at start: B moves first


# ------------------------------------------------------------------------------------------ ODE init
def test_ode_pairs_and_regression_lowers_the_loss(teacher, cond):
    pairs = teacher_ode_pairs(teacher, cond, num_frames=4, substeps=2, seed=3)
    B, K1 = pairs.trajectory.shape[:2]
    assert (B, K1) == (1, 5) and pairs.trajectory.shape[2:] == (3, 4, 16, 16)
    assert torch.equal(pairs.trajectory[:, 0], pairs.noise)              # sigma(999) = 1: the start noise
    assert pairs.timesteps == [999, 749, 499, 249]
    # blocks of the input come from their drawn level, frames of a block share it
    x_t, t_frames, idx = ode_regression_inputs(pairs.trajectory, pairs.timesteps, 2,
                                               index=torch.tensor([[3, 1]]))
    assert torch.equal(x_t[:, :, :2], pairs.trajectory[:, 3, :, :2])
    assert torch.equal(x_t[:, :, 2:], pairs.trajectory[:, 1, :, 2:])
    assert t_frames.tolist() == [[249.0, 249.0, 749.0, 749.0]]
    st = CausalWanStudent(teacher, block_size=2)
    opt = torch.optim.Adam(st.trainable_parameters(), lr=3e-3)
    fixed = torch.tensor([[0, 2]])

    def loss():
        return ode_regression_loss(st, pairs.trajectory, pairs.timesteps, cond, index=fixed)

    with torch.no_grad():
        before = loss().item()
    for _ in range(6):
        opt.zero_grad()
        value = ode_regression_loss(st, pairs.trajectory, pairs.timesteps, cond,
                                    generator=torch.Generator().manual_seed(_))
        value.backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)
