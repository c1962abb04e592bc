"""VideoLoRAStudent: a peft LoRA on a video teacher's own denoiser (a tiny random diffusers UNet3DConditionModel,
ModelScope's class), teacher with the adapter off, student with it on."""
import copy
import zlib

import pytest
import torch
from diffusers import UNet3DConditionModel

from studio.errors import UserError
from studio.students.video_lora import (
    VIDEO_LORA_TARGETS,
    VideoLoRAStudent,
    resolve_lora_targets,
)
from studio.teachers.sampling import causal_block_rollout, ddim_sample, lcm_sample
from studio.teachers.schedule import NoiseSchedule
from studio.teachers.video_base import VideoTeacher


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)


class UNet3DTeacher(VideoTeacher):
    """Minimal latent video teacher around a UNet3DConditionModel (``_forward`` calls ``self.denoiser``)."""

    latent_channels = 4
    vae_scale_factor = 1
    native_resolution = 8
    num_frames = 3
    name = "tiny-unet3d"

    def __init__(self, unet):
        super().__init__()
        self.denoiser = unet
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.freeze()

    def _embed_texts(self, texts):
        gens = [torch.Generator().manual_seed(zlib.crc32(t.encode())) for t in texts]
        return torch.stack([torch.randn(5, 8, generator=g) for g in gens])

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        return self.denoiser(x_t, t, encoder_hidden_states=embeds).sample

    def decode(self, latents):
        return ((latents[:, :3] + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def raw_eps(self, x_t, t, cond):
        """A teacher-specific method that calls the denoiser (reached through the student with the adapter on)."""
        return self._forward(x_t, t, cond.embeds)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(4, 4)
        self.conv1 = torch.nn.Conv3d(4, 4, 1)
        self.proj_out = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj_in(x.movedim(1, -1)).movedim(-1, 1)
        return self.proj_out(self.conv1(y).movedim(1, -1)).movedim(-1, 1)


class PlainTeacher(UNet3DTeacher):
    """A teacher whose denoiser is a plain nn.Module (no diffusers adapter API), named like diffusers."""

    def __init__(self):
        VideoTeacher.__init__(self)
        self.denoiser = Net()
        self.schedule = NoiseSchedule.ddpm_scaled_linear()
        self.freeze()

    def _forward(self, x_t, t, embeds, camera=None, extra=None):
        return self.denoiser(x_t)


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet()
    pristine = copy.deepcopy(unet)
    teacher = UNet3DTeacher(unet)
    cond = teacher.encode_prompt(["a red ball", "a blue cube"])
    x = teacher.noise(2, seed=1)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        ref = teacher.predict(x, t, cond, output="epsilon")
    return teacher, pristine, cond, x, t, ref


def _train(student, cond, x, t, steps=3):
    opt = torch.optim.Adam(student.trainable_parameters(), lr=5e-2)
    target = torch.zeros_like(x)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(student.predict(x, t, cond, output="epsilon"), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_targets_exclude_temporal_convs():
    names, skipped = resolve_lora_targets(tiny_unet())
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("resnets.0.conv1") for n in names)
    assert any(n.endswith("time_emb_proj") for n in names) and any("downsamplers.0.conv" in n for n in names)
    assert any("temp_attentions" in n for n in names)  # temporal attention keeps its adapters
    assert not any("temp" in n and "conv" in n for n in names)  # MCM's ModelScope rule
    assert skipped == []  # the temp_convs Sequentials were excluded by name before the type check
    names2, skipped2 = resolve_lora_targets(tiny_unet(), exclude=None)
    assert any("temp_convs" in n for n in skipped2) and set(names2) == set(names)
    only_q, _ = resolve_lora_targets(tiny_unet(), ["to_q"], exclude="temp_attentions|transformer_in")
    assert only_q and all(n.endswith("to_q") and "temp" not in n for n in only_q)


def test_zero_init_lora_is_the_teacher_and_only_lora_trains(setup):
    teacher, _, cond, x, t, ref = setup
    student = VideoLoRAStudent(copy.deepcopy(teacher), rank=4, alpha=8)
    with torch.no_grad():
        out = student.predict(x, t, cond, output="epsilon")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    params = student.trainable_parameters()
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    lora_ids = {id(p) for p in params}
    frozen = [p for p in student.teacher.parameters() if id(p) not in lora_ids]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert len(params) == 2 * len(student.target_names)
    assert not student.adapter_is_enabled()  # teacher mode outside student calls
    assert student.schedule is student.teacher.schedule and student.num_frames == 3
    assert student.latent_shape() == (4, 3, 8, 8)
    with pytest.raises(UserError):
        VideoLoRAStudent(student.teacher, rank=4)  # same adapter name twice
    with pytest.raises(UserError):
        VideoLoRAStudent(copy.deepcopy(teacher), target_modules=["nothing_here"])


def test_training_changes_student_not_teacher_and_merge_equals_adapter(setup, tmp_path):
    teacher0, pristine, cond, x, t, ref = setup
    teacher = copy.deepcopy(teacher0)
    student = VideoLoRAStudent(teacher, rank=4, seed=3)
    student.train()
    assert not teacher.denoiser.training  # the frozen base stays in eval mode
    _train(student, cond, x, t)
    with torch.no_grad():
        s_out = student.predict(x, t, cond, output="epsilon")
        t_out = teacher.predict(x, t, cond, output="epsilon")  # adapter off by default
        with student.adapter_enabled(False):
            off = student.predict(x, t, cond, output="epsilon")
        with student.adapter_enabled(True):
            on_via_teacher = teacher.predict(x, t, cond, output="epsilon")
    assert (s_out - ref).abs().max() > 1e-3
    torch.testing.assert_close(t_out, ref, atol=0, rtol=0)
    torch.testing.assert_close(off, ref, atol=0, rtol=0)
    torch.testing.assert_close(on_via_teacher, s_out, atol=0, rtol=0)
    # base weights untouched
    base = {k.replace(".base_layer", ""): v for k, v in teacher.denoiser.state_dict().items() if "lora_" not in k}
    for k, v in pristine.state_dict().items():
        torch.testing.assert_close(base[k], v, atol=0, rtol=0)
    assert all(p.requires_grad for p in student.trainable_parameters())  # switching never froze them

    merged = student.merge()
    assert isinstance(merged, VideoTeacher) and merged is not teacher
    assert not any("lora" in n for n, _ in merged.denoiser.named_parameters())
    with torch.no_grad():
        m_out = merged.predict(x, t, cond, output="epsilon")
        t_again = teacher.predict(x, t, cond, output="epsilon")
    torch.testing.assert_close(m_out, s_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_again, ref, atol=0, rtol=0)  # merging did not touch the teacher
    # a merged model and the student sample the same clip; the student works in every sampler
    a = lcm_sample(student, cond, 2, seed=0, output="latents")
    b = lcm_sample(merged, cond, 2, seed=0, output="latents")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    vid = ddim_sample(student, ["a red ball"], steps=2, guidance_scale=2.0, seed=0)
    assert vid.shape == (1, 3, 3, 8, 8)
    r_s = causal_block_rollout(student, cond, block_size=1, denoising_steps=[1000, 500], seed=0)
    r_m = causal_block_rollout(merged, cond, block_size=1, denoising_steps=[1000, 500], seed=0)
    assert r_s.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(r_s, r_m, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # teacher methods reached through the student run with the adapter on
        torch.testing.assert_close(student.raw_eps(x, t, cond), s_out, atol=0, rtol=0)
        torch.testing.assert_close(teacher.raw_eps(x, t, cond), ref, atol=0, rtol=0)

    # save / load round trip (atomic: no temp files left behind)
    path = student.save(tmp_path / "lora.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    fresh = VideoLoRAStudent(UNet3DTeacher(copy.deepcopy(pristine)), rank=4, seed=9)
    with torch.no_grad():
        before = fresh.predict(x, t, cond, output="epsilon")
    torch.testing.assert_close(before, ref, atol=0, rtol=0)
    fresh.load(path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x, t, cond, output="epsilon"), s_out, atol=0, rtol=0)
    rebuilt = VideoLoRAStudent.from_file(UNet3DTeacher(copy.deepcopy(pristine)), path)
    assert rebuilt.rank == 4 and rebuilt.target_names == student.target_names
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.predict(x, t, cond, output="epsilon"), s_out, atol=0, rtol=0)
    with pytest.raises(UserError):  # another rank
        VideoLoRAStudent(PlainTeacher(), rank=8).load(path)
    with pytest.raises(UserError):  # same rank, other modules
        VideoLoRAStudent(PlainTeacher(), rank=4).load(path)
    with pytest.raises(UserError):
        fresh.load(tmp_path / "missing.safetensors")
    sd = student.state_dict()
    assert set(sd) == {n for n, _ in student.named_trainable_parameters()} and all("video_lora" not in k for k in sd)


def test_merge_inplace_and_dropout_train_mode(setup):
    teacher0, _, cond, x, t, _ = setup
    teacher = copy.deepcopy(teacher0)
    student = VideoLoRAStudent(teacher, rank=2, dropout=0.5, seed=1)
    _train(student, cond, x, t, steps=1)
    student.train(False)
    with torch.no_grad():
        a = student.predict(x, t, cond, output="epsilon")
        b = student.predict(x, t, cond, output="epsilon")
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # eval: dropout off
    student.train(True)
    with torch.no_grad():
        c = student.predict(x, t, cond, output="epsilon")
    assert (c - a).abs().max() > 0  # train: LoRA dropout active
    assert not teacher.denoiser.training
    merged = student.merge(inplace=True)
    assert merged is teacher
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(x, t, cond, output="epsilon"), a, atol=1e-5, rtol=1e-5)


def test_plain_module_denoiser_and_default_targets():
    """A non-diffusers denoiser (plain nn.Module named like diffusers) gets the adapter through peft directly."""
    teacher = PlainTeacher()
    student = VideoLoRAStudent(teacher, rank=2)
    assert set(student.target_names) == {"proj_in", "conv1", "proj_out"}
    assert set(VIDEO_LORA_TARGETS) >= {"proj_in", "conv1", "proj_out"}
    cond = teacher.encode_prompt(["x"])
    x = teacher.noise(1, seed=0)
    with torch.no_grad():
        ref = teacher.predict(x, 10, cond)
    _train(student, cond, x, torch.tensor([10]), steps=2)
    with torch.no_grad():
        s_out = student.predict(x, 10, cond)
        torch.testing.assert_close(teacher.predict(x, 10, cond), ref, atol=0, rtol=0)
        torch.testing.assert_close(student.merge().predict(x, 10, cond), s_out, atol=1e-5, rtol=1e-5)
    assert (s_out - ref).abs().max() > 1e-3
