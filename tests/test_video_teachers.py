"""Tier-1 video teachers (ModelScope T2V, AnimateDiff, Wan 2.1), verified with architecture-true tiny models of
the real diffusers / transformers classes, saved with ``save_pretrained`` and loaded back by path through
``load_teacher``; parity with the diffusers pipelines' own conventions."""
import shutil
from itertools import pairwise

import pytest
import torch
from tiny_models import make_tiny_sd
from tiny_video_models import (
    make_tiny_animatediff,
    make_tiny_modelscope,
    make_tiny_motion_adapter,
    make_tiny_wan,
)

from studio.errors import UserError
from studio.teachers import list_teachers, load_teacher
from studio.teachers.diffusers_video import (
    AnimateDiffTeacher,
    ModelScopeTeacher,
    WanTeacher,
    read_prediction_type,
    read_video_facts,
    video_layout,
    write_video_facts,
)
from studio.teachers.registry import load_video_teacher
from studio.teachers.schedule import NoiseSchedule
from studio.teachers.video_base import VideoTeacher

KINDS = ("modelscope", "animatediff", "wan", "wan_pixel")
CLASSES = {"modelscope": ModelScopeTeacher, "animatediff": AnimateDiffTeacher, "wan": WanTeacher,
           "wan_pixel": WanTeacher}
DENOISERS = {"modelscope": "UNet3DConditionModel", "animatediff": "UNetMotionModel", "wan": "WanTransformer3DModel",
             "wan_pixel": "WanTransformer3DModel"}
#: (C, F pixel frames, F' latent frames, h) of the tiny models at their native 16 px
SHAPES = {"modelscope": (4, 4, 4, 8), "animatediff": (4, 4, 4, 8), "wan": (4, 5, 2, 4), "wan_pixel": (3, 4, 4, 16)}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_video")
    return {"modelscope": make_tiny_modelscope(root / "modelscope"),
            "animatediff": make_tiny_animatediff(root / "animatediff"),
            "wan": make_tiny_wan(root / "wan"),
            "wan_pixel": make_tiny_wan(root / "wan_pixel", pixel=True)}


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", sample_size=8)


@pytest.fixture(scope="module")
def teachers(paths):
    return {k: load_teacher(str(p)) for k, p in paths.items()}


def _video(b, f, size=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, size, size, generator=g).requires_grad_(requires_grad)


def _raw(kind, teacher, x, t, emb):
    """The denoiser called directly, the way each diffusers pipeline calls it."""
    den = teacher.denoiser
    with torch.no_grad():
        if kind == "modelscope":
            return den(x, t, encoder_hidden_states=emb).sample
        if kind == "animatediff":  # AnimateDiffPipeline: prompt_embeds.repeat_interleave(num_frames)
            return den(x, t, encoder_hidden_states=emb.repeat_interleave(x.shape[2], dim=0)).sample
        timestep = teacher.schedule.sigma(t) * teacher.schedule.num_train_timesteps  # WanPipeline: sigma * T
        return den(hidden_states=x, timestep=timestep, encoder_hidden_states=emb).sample


# --------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", KINDS)
def test_loads_by_path_with_facts(kind, teachers, paths):
    t = teachers[kind]
    C, F, Fl, h = SHAPES[kind]
    assert type(t) is CLASSES[kind] and isinstance(t, VideoTeacher)
    assert video_layout(str(paths[kind])) == ("wan" if kind == "wan_pixel" else kind)
    assert t.name == str(paths[kind])
    assert type(t.denoiser).__name__ == DENOISERS[kind]
    assert (t.transformer if kind.startswith("wan") else t.unet) is t.denoiser
    assert (t.latent_channels, t.num_frames, t.latent_frames(), t.native_resolution) == (C, F, Fl, 16)
    assert t.latent_shape() == (C, Fl, h, h)
    assert t.vae_scale_factor == 16 // h and t.frame_rate == 8
    assert t.temporal_compression == (4 if kind == "wan" else 1)
    assert t.is_latent == (kind != "wan_pixel")
    assert t.schedule.prediction_type == ("flow" if kind.startswith("wan") else "epsilon")
    if kind.startswith("wan"):
        assert t.schedule.shift == 3.0
    assert all(not p.requires_grad for p in t.parameters()) and not t.training
    t.train()
    assert not t.training and not t.denoiser.training


def test_schedules_follow_the_saved_schedulers(teachers):
    ms, ad = teachers["modelscope"].schedule, teachers["animatediff"].schedule
    torch.testing.assert_close(ms.alphas_cumprod, NoiseSchedule.ddpm_scaled_linear().alphas_cumprod)
    torch.testing.assert_close(ad.alphas_cumprod, NoiseSchedule.ddpm_linear(beta_start=0.00085,
                                                                            beta_end=0.012).alphas_cumprod)


# --------------------------------------------------------------------------------------- VAE side
@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_shapes_and_gradients(kind, teachers):
    t = teachers[kind]
    C, F, Fl, h = SHAPES[kind]
    video = _video(2, F, requires_grad=True)
    z = t.encode(video)
    assert z.shape == (2, C, Fl, h, h) and z.dtype == torch.float32
    z.square().mean().backward()
    assert video.grad is not None and video.grad.abs().sum() > 0
    with torch.no_grad():
        out = t.decode(z)
    assert out.shape == (2, F, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    # methods backprop through decoding 2 (latent) frames
    lat = z.detach()[:, :, :2].clone().requires_grad_(True)
    frames = t.decode(lat)
    assert frames.shape[1] == (5 if kind == "wan" else 2)
    (frames - 0.5).square().mean().backward()
    assert torch.isfinite(lat.grad).all() and lat.grad.abs().sum() > 0


def test_wan_causal_vae_and_its_latent_normalisation(teachers):
    t = teachers["wan"]
    cfg = t.vae.config
    mean = torch.tensor(cfg.latents_mean).reshape(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).reshape(1, -1, 1, 1, 1)
    video = _video(1, 5, seed=3)
    with torch.no_grad():
        z = t.encode(video)
        raw = t.vae.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
        torch.testing.assert_close(z, (raw - mean) / std)
        pix = t.vae.decode(z * std + mean).sample  # WanPipeline: latents / (1 / std) + mean
        torch.testing.assert_close(t.decode(z), ((pix + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4))
        assert t.decode(torch.zeros(1, 4, 3, 4, 4)).shape[1] == 9  # 1 + 4 (F' - 1)
    assert t.latent_frames(9) == 3 and t.latent_shape(9, 32) == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        t.encode(_video(1, 4))


# --------------------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("kind", KINDS)
def test_cfg_and_branches_equal_manual_combination(kind, teachers):
    t = teachers[kind]
    C, _, Fl, h = SHAPES[kind]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, Fl, h, h, generator=g)
    ts = torch.tensor([150, 820])
    cond = t.encode_prompt(["a red cube bouncing", "a blue ball rolling left"], negative="blurry")
    with torch.no_grad():
        eps_c = t.schedule.convert(_raw(kind, t, x, ts, cond.embeds), x, ts, dst="epsilon")
        eps_u = t.schedule.convert(_raw(kind, t, x, ts, cond.negative_embeds), x, ts, dst="epsilon")
        w = 4.5
        # The teacher batches both branches into one call, the reference calls the denoiser per branch: the
        # same float32 network with another summation order (GEMM blocking, SIMD width), which differs by a
        # few tens of ulps of the output's magnitude; 256 ulps (f32u) of max|output| is the allowance, times
        # |w| + |1 - w| where CFG combines the two branches.
        f32u = 256 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(t.predict(x, ts, cond, guidance_scale=w), eps_u + w * (eps_c - eps_u), rtol=0,
                                   atol=f32u * (2 * w - 1) * float(torch.maximum(eps_c.abs(), eps_u.abs()).max()))
        torch.testing.assert_close(t.predict(x, ts, cond), eps_c, rtol=0, atol=f32u * float(eps_c.abs().max()))
        bu, bc = t.predict_branches(x, ts, cond, output="sample")
        ref_u, ref_c = (t.schedule.convert(e, x, ts, "epsilon", "sample") for e in (eps_u, eps_c))
        torch.testing.assert_close(bu, ref_u, rtol=0, atol=f32u * float(ref_u.abs().max()))
        torch.testing.assert_close(bc, ref_c, rtol=0, atol=f32u * float(ref_c.abs().max()))
    assert not torch.allclose(eps_c, eps_u)  # the text condition matters


@pytest.mark.parametrize("kind", ("modelscope", "animatediff", "wan"))
def test_frames_interact(kind, teachers):
    """Temporal layers are live: changing the first frame of x_t changes the prediction for the last one."""
    t = teachers[kind]
    C, _, Fl, h = SHAPES[kind]
    x = torch.randn(1, C, Fl, h, h, generator=torch.Generator().manual_seed(2))
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    cond = t.encode_prompt("a red cube")
    with torch.no_grad():
        a, b = t.predict(x, 500, cond), t.predict(x2, 500, cond)
    assert (a[:, :, -1] - b[:, :, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ("wan", "wan_pixel"))
def test_flow_predictions_round_trip_through_the_schedule(kind, teachers):
    t = teachers[kind]
    s = t.schedule
    C, _, Fl, h = SHAPES[kind]
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, C, Fl, h, h, generator=g), torch.randn(2, C, Fl, h, h, generator=g)
    ts = torch.tensor([37.5, 612.25])  # float timesteps, mapped through the shifted flow schedule
    x_t = s.add_noise(x0, eps, ts)
    torch.testing.assert_close(x_t, (1 - s.sigma(ts, x0)) * x0 + s.sigma(ts, x0) * eps)
    cond = t.encode_prompt("a green cone spinning")
    with torch.no_grad():
        v = t.predict(x_t, ts, cond, output="flow")
        raw = t._forward(x_t, ts, cond.embeds)
        px0 = t.predict(x_t, ts, cond, output="sample")
        peps = t.predict(x_t, ts, cond, output="epsilon")
        pv = t.predict(x_t, ts, cond, output="v_prediction")
    # prediction_type "flow": the raw output is the velocity (the float32 network, up to the float32 rounding of its
    # timestep input: 256 ulps of max|v|)
    same = dict(rtol=0, atol=256 * torch.finfo(torch.float32).eps * float(raw.abs().max()))
    torch.testing.assert_close(v, raw, **same)
    torch.testing.assert_close(v, _raw(kind, t, x_t, ts, cond.embeds), **same)
    torch.testing.assert_close(v, peps - px0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.add_noise(px0, peps, ts), x_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(px0, x_t - s.sigma(ts, x_t) * v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.convert(pv, x_t, ts, "v_prediction", "flow"), v, rtol=1e-4, atol=1e-5)
    # the model sees the timestep sigma(t) * T (WanPipeline's), not the index t
    torch.testing.assert_close(s.model_timestep(ts), s.sigma(ts) * 1000)


def test_wan_euler_step_matches_flow_match_euler_scheduler(teachers, paths):
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = teachers["wan"]
    s = t.schedule
    T = s.num_train_timesteps
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(paths["wan"]), subfolder="scheduler")
    t_i, t_j = 700.4, 341.0
    sched.set_timesteps(sigmas=[(t_i + 1) / T, (t_j + 1) / T])  # unshifted u; the scheduler applies its shift
    # diffusers' sigmas are float32 (a few roundings in the shift formula), ours float64: 4 ulps relative
    torch.testing.assert_close(sched.sigmas[:2].double(), s.sigma(torch.tensor([t_i, t_j])).double(), atol=0,
                               rtol=4 * torch.finfo(torch.float32).eps)
    x = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    cond = t.encode_prompt(["a red cube", "a blue ball"], negative="low quality")
    w = 5.0
    with torch.no_grad():
        # diffusers' side: the transformer at the scheduler's timestep, CFG on the raw output, one Euler step
        den = t.denoiser
        ts = sched.timesteps[0].expand(2)
        v_c = den(hidden_states=x, timestep=ts, encoder_hidden_states=cond.embeds).sample
        v_u = den(hidden_states=x, timestep=ts, encoder_hidden_states=cond.negative_embeds).sample
        theirs = sched.step(v_u + w * (v_c - v_u), sched.timesteps[0], x).prev_sample
        # ours: teacher prediction, (x0, eps) from the schedule, re-noised at the next level (= the Euler step)
        v = t.predict(x, torch.tensor(t_i), cond, guidance_scale=w, output="flow")
        x0, eps = s.to_x0_eps(v, x, t_i, "flow")
        ours = s.add_noise(x0.float(), eps.float(), t_j)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_matches_the_diffusers_pipeline(kind, teachers, paths):
    """The pipeline class loads the same folder (the ``_studio`` facts are ignored by diffusers); one denoising step
    with CFG from the same latents equals the teacher's (prompt encoding, context layout, timestep, CFG, decode)."""
    from diffusers import DiffusionPipeline

    t = teachers[kind]
    C, F, Fl, h = SHAPES[kind]
    pipe = DiffusionPipeline.from_pretrained(str(paths[kind]), **({"vae": None} if kind == "wan_pixel" else {}))
    x = torch.randn(1, C, Fl, h, h, generator=torch.Generator().manual_seed(6))
    prompt, negative, w = "a red cube bouncing left", "blurry", 3.0
    cond = t.encode_prompt(prompt, negative=negative)
    kw = {"prompt": prompt, "negative_prompt": negative, "num_inference_steps": 1, "guidance_scale": w,
          "latents": x.clone()}
    with torch.no_grad():
        if kind.startswith("wan"):
            seq = {"max_sequence_length": t.max_sequence_length}  # (77 for the CLIP-conditioned pixel model)
            out = pipe(**kw, **seq, height=16, width=16, num_frames=F,
                       output_type="latent" if kind == "wan_pixel" else "pt").frames
            x0 = t.predict(x, s_max := t.schedule.num_train_timesteps - 1, cond, guidance_scale=w, output="sample")
            assert float(t.schedule.sigma(s_max)) == 1.0  # one FlowMatchEuler step goes from sigma 1 to 0
            ours = x0 if kind == "wan_pixel" else t.decode(x0)
        else:
            out = pipe(**kw, num_frames=F, height=16, width=16, output_type="latent").frames
            step = pipe.scheduler.timesteps[0]
            eps = t.predict(x, step, cond, guidance_scale=w)
            ours = pipe.scheduler.step(eps, step, x).prev_sample
    torch.testing.assert_close(torch.as_tensor(out).float(), ours.float(), rtol=1e-4, atol=1e-4)


def _sample(teacher, prompts, steps=3, w=4.0, seed=0):
    """A minimal deterministic sampler (DDIM / flow Euler in the (x0, eps) form) using only teacher.schedule."""
    s = teacher.schedule
    cond = teacher.encode_prompt(prompts)
    x = teacher.noise(len(prompts), seed=seed)
    grid = torch.linspace(s.num_train_timesteps - 1, 0, steps + 1)
    if not s.is_flow:
        grid = grid.round().long()
    with torch.no_grad():
        for t, t_next in pairwise(grid):
            x0 = teacher.predict(x, t, cond, guidance_scale=w, output="sample")  # (eps is x_t itself at sigma = 1)
            _, eps = s.to_x0_eps(x0, x, t, "sample")
            x = s.add_noise(x0, eps.to(x.dtype), t_next)
        return teacher.decode(x)


@pytest.mark.parametrize("kind", KINDS)
def test_few_step_sampling_is_deterministic_and_valid(kind, teachers):
    t = teachers[kind]
    a = _sample(t, ["a red cube bouncing", "a blue ball"])
    assert a.shape == (2, t.num_frames, 3, 16, 16)
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(_sample(t, ["a red cube bouncing", "a blue ball"]), a, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("modelscope", "wan"))
def test_an_adapter_added_later_is_used(kind, paths):
    """LoRA students wrap ``teacher.denoiser`` with peft after loading; the teacher's forward must run it."""
    from peft import LoraConfig, inject_adapter_in_model

    t = load_teacher(str(paths[kind]))
    C, _, Fl, h = SHAPES[kind]
    x = torch.randn(1, C, Fl, h, h, generator=torch.Generator().manual_seed(7))
    cond = t.encode_prompt("a red cube")
    with torch.no_grad():
        before = t.predict(x, 400, cond)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                           init_lora_weights=False), t.denoiser)
        after = t.predict(x, 400, cond)
        direct = t.schedule.convert(_raw(kind, t, x, torch.tensor([400]), cond.embeds), x, 400, dst="epsilon")
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, direct, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- AnimateDiff from SD
def test_sd_folder_plus_motion_adapter(sd_path, tmp_path):
    sd = sd_path
    adapter = make_tiny_motion_adapter(tmp_path / "adapter")
    t = load_teacher(str(sd), motion_adapter=str(adapter))
    assert type(t) is AnimateDiffTeacher and type(t.denoiser).__name__ == "UNetMotionModel"
    assert (t.num_frames, t.native_resolution, t.latent_channels) == (16, 16, 4)
    # AnimateDiff's linear betas replace SD's scaled_linear ones; beta_schedule=None keeps the folder's
    torch.testing.assert_close(t.schedule.alphas_cumprod,
                               NoiseSchedule.ddpm_linear(beta_start=0.00085, beta_end=0.012).alphas_cumprod)
    keep = AnimateDiffTeacher.from_pretrained(sd, motion_adapter=adapter, beta_schedule=None)
    torch.testing.assert_close(keep.schedule.alphas_cumprod, NoiseSchedule.ddpm_scaled_linear().alphas_cumprod)
    x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert t.predict(x, 300, t.encode_prompt("a cat"), guidance_scale=2.0).shape == x.shape
        assert t.decode(x).shape == (1, 3, 3, 16, 16)
    with pytest.raises(UserError, match="motion adapter"):
        load_teacher(str(sd), motion_adapter=str(tmp_path / "no_adapter"))
    with pytest.raises(UserError, match="motion_adapter"):
        AnimateDiffTeacher.from_pretrained(sd)
    with pytest.raises(UserError, match="image model"):
        load_video_teacher(str(sd))


# --------------------------------------------------------------------------------------- registry and errors
def test_registry_names_and_video_loader(paths, monkeypatch):
    names = list_teachers()
    for n, repo in (("modelscope-t2v", "text-to-video-ms-1.7b"), ("animatediff", "motion-adapter-v1-5-2"),
                    ("wan2.1-t2v-1.3b", "Wan2.1-T2V-1.3B-Diffusers")):
        assert n in names and repo in names[n]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not found"):  # hub weights are not cached here: one clear message
        load_teacher("wan2.1-t2v-1.3b")
    assert isinstance(load_video_teacher(str(paths["wan_pixel"])), WanTeacher)
    assert video_layout("ali-vilab/text-to-video-ms-1.7b") == "modelscope"
    assert video_layout("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "wan"
    assert video_layout("guoyww/animatediff-motion-adapter-v1-5-2") is None
    assert video_layout("stabilityai/stable-diffusion-2-1-base") is None


def test_error_messages_for_missing_or_wrong_folders(paths, sd_path, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not found"):
        WanTeacher.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        ModelScopeTeacher.from_pretrained(empty)
    with pytest.raises(UserError, match="TextToVideoSDPipeline.*WanPipeline|WanPipeline.*ModelScope"):
        WanTeacher.from_pretrained(paths["modelscope"])
    with pytest.raises(UserError, match="WanPipeline"):
        ModelScopeTeacher.from_pretrained(paths["wan"])
    with pytest.raises(UserError, match="AnimateDiffPipeline.*AnimateDiffTeacher"):
        ModelScopeTeacher.from_pretrained(paths["animatediff"])
    with pytest.raises(UserError, match="UNet3DConditionModel"):
        ModelScopeTeacher.from_pretrained(sd_path)
    with pytest.raises(UserError, match="StableDiffusionPipeline"):
        WanTeacher.from_pretrained(sd_path)
    # a clip length the causal VAE cannot produce, recorded in the folder
    bad = tmp_path / "wan_bad"
    shutil.copytree(paths["wan"], bad)
    write_video_facts(bad, num_frames=6)
    assert read_video_facts({"_studio": {"num_frames": 6}}) == {"num_frames": 6}
    assert read_video_facts({"_studio": {"resolution": 32, "note": "pixel"}}) == {"native_resolution": 32}
    with pytest.raises(UserError, match="4k \\+ 1"):
        load_teacher(str(bad))


def test_wan_folder_records_x_prediction(paths, tmp_path):
    """A pixel-space Wan folder trained with x-prediction (``_studio.prediction_type = "sample"``) loads as a flow
    schedule whose model outputs x0: predict(output="sample") is the transformer's raw output and the velocity
    follows from it; an unknown value is refused naming the folder."""
    import json

    folder = tmp_path / "wan_x0"
    shutil.copytree(paths["wan_pixel"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.setdefault("_studio", {})["prediction_type"] = "sample"
    (folder / "model_index.json").write_text(json.dumps(index))
    t = load_teacher(str(folder))
    assert t.schedule.is_flow and t.schedule.prediction_type == "sample" and t.schedule.shift == 3.0
    x = torch.randn(2, 3, 4, 16, 16)
    tt = torch.tensor([250.0, 800.0])
    cond = t.encode_prompt(["a red ball", "a cube"])
    raw = _raw("wan_pixel", t, x, tt, cond.embeds)
    torch.testing.assert_close(t.predict(x, tt, cond, output="sample"), raw, rtol=0,
                               atol=256 * torch.finfo(torch.float32).eps * float(raw.abs().max()))  # as above
    s = t.schedule.sigma(tt).float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(t.predict(x, tt, cond, output="flow"), (x - raw) / s, rtol=1e-4, atol=1e-4)
    assert read_prediction_type({}) == "flow" and read_prediction_type({"_studio": {"prediction_type": "x0"}}) == "sample"
    index["_studio"]["prediction_type"] = "banana"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="prediction_type 'banana'"):
        load_teacher(str(folder))


def test_wan_hub_scheduler_config_reads_as_flow():
    """Wan 2.1 ships a UniPC solver on flow sigmas (prediction_type="flow_prediction", flow_shift): the same
    shifted flow schedule as FlowMatchEuler's, timesteps sigma * T."""
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    s = NoiseSchedule.from_diffusers(dict(unipc.config))
    assert s.prediction_type == "flow" and s.shift == 3.0
    unipc.set_timesteps(4)
    T = s.num_train_timesteps
    u = torch.linspace(1, 1 / T, 5, dtype=torch.float64)[1:4]  # UniPC's unshifted grid (its first sigma is 1 - 1e-6)
    torch.testing.assert_close(unipc.sigmas[1:4].double(), s.sigma(u * T - 1).double(), rtol=1e-5, atol=1e-6)
    # (UniPC hands the model sigma * T truncated to an integer; the teacher passes it unrounded)
    gap = s.model_timestep(u * T - 1).double() - unipc.timesteps[1:4].double()
    assert bool(((gap >= 0) & (gap < 1)).all())
    assert NoiseSchedule.from_diffusers(dict(unipc.config), prediction_type="epsilon").prediction_type == "epsilon"
