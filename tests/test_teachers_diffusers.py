"""The SD-family teacher, verified with tiny architecture-true models loaded back by path."""
import pytest
import torch

from studio.errors import UserError
from studio.teachers import (ImageTeacher, TextCond, list_teachers, load_teacher, register_teacher,
                             unregister_teacher, view_conditioned, view_prompts, view_suffixes)
from studio.teachers.prompts import interpolation_weights
from tiny_models import make_tiny_lora, make_tiny_sd

S = 16  # UNet latent size of the test models (images are 2*S: the tiny VAE downsamples by 2)


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd-eps", prediction_type="epsilon", sample_size=S)


@pytest.fixture(scope="module")
def sd_v_path(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd-v", prediction_type="v_prediction", seed=1,
                        sample_size=S)


@pytest.fixture(scope="module")
def teacher(sd_path):
    return load_teacher(str(sd_path))


def _images(b=2, size=2 * S, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g).requires_grad_(requires_grad)


def _raw(teacher, x_t, t, embeds):
    with torch.no_grad():
        return teacher.unet(x_t, t, encoder_hidden_states=embeds).sample


def test_loads_by_path_with_architecture_attributes(teacher, sd_path):
    assert isinstance(teacher, ImageTeacher)
    assert teacher.name == str(sd_path)
    assert teacher.latent_channels == 4 and teacher.vae_scale_factor == 2 and teacher.native_resolution == 2 * S
    assert teacher.is_latent and teacher.schedule.prediction_type == "epsilon"
    assert teacher.device.type == "cpu" and teacher.dtype == torch.float32
    assert not teacher.training
    teacher.train()
    assert not teacher.training and not teacher.unet.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_encode_decode_predict_shapes(teacher):
    imgs = _images()
    with torch.no_grad():
        z = teacher.encode(imgs)
        assert z.shape == (2, 4, S, S) and z.dtype == torch.float32
        out = teacher.decode(z)
        assert out.shape == (2, 3, 2 * S, 2 * S) and out.min() >= 0 and out.max() <= 1
        z_small = teacher.encode(_images(1, 24), size=2 * S)
        assert z_small.shape == (1, 4, S, S)
        cond = teacher.encode_prompt(["a red cube", "a blue ball"])
        assert cond.embeds.shape == (2, 77, 32) and len(cond) == 2
        t = torch.tensor([10, 700])
        x_t = teacher.schedule.add_noise(z, torch.randn_like(z), t)
        for gs, output in ((1.0, "epsilon"), (7.5, "v_prediction"), (7.5, "sample"), (1.0, "flow")):
            assert teacher.predict(x_t, t, cond, guidance_scale=gs, output=output).shape == z.shape
        # a single prompt and a scalar timestep broadcast to the batch
        one = teacher.encode_prompt("a red cube")
        assert teacher.predict(x_t, 500, one, guidance_scale=3.0).shape == z.shape
    with pytest.raises(ValueError):
        teacher.encode(torch.rand(1, 3, 2 * S - 1, 2 * S))
    with pytest.raises(ValueError):
        teacher.encode(torch.rand(1, 4, 2 * S, 2 * S))


def test_cfg_is_uncond_plus_w_times_difference_in_epsilon_space(teacher):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, S, S, generator=g)
    t = torch.tensor([100, 600])
    cond = teacher.encode_prompt(["a red cube", "a green cone"], negative="blurry, low quality")
    with torch.no_grad():
        eps_u, eps_c = teacher.predict_branches(x_t, t, cond)
        ref_u = _raw(teacher, x_t, t, cond.negative_embeds)
        ref_c = _raw(teacher, x_t, t, cond.embeds)
        # the teacher batches the branches, the reference calls the UNet per branch: one float32 network in
        # two summation orders, 256 ulps of max|eps| (times |w| + |1 - w| where CFG combines the branches)
        f32 = 256 * torch.finfo(torch.float32).eps * float(torch.maximum(ref_u.abs(), ref_c.abs()).max())
        torch.testing.assert_close(eps_u, ref_u, rtol=0, atol=f32)
        torch.testing.assert_close(eps_c, ref_c, rtol=0, atol=f32)
        w = 7.5
        guided = teacher.predict(x_t, t, cond, guidance_scale=w)
        torch.testing.assert_close(guided, ref_u + w * (ref_c - ref_u), rtol=0, atol=(2 * w - 1) * f32)
        torch.testing.assert_close(teacher.predict(x_t, t, cond, guidance_scale=1.0), ref_c, rtol=0, atol=f32)
        # converting after guidance == guiding after converting (affine parameterisations)
        x0 = teacher.predict(x_t, t, cond, guidance_scale=w, output="sample")
        torch.testing.assert_close(x0, teacher.schedule.convert(guided, x_t, t, "epsilon", "sample"))
        # a non-camera UNet ignores camera
        cam = torch.randn(2, 16)
        torch.testing.assert_close(teacher.predict(x_t, t, cond, 7.5, camera=cam), guided)


def test_v_prediction_teacher_converts_through_schedule(sd_v_path):
    tv = load_teacher(str(sd_v_path))
    assert tv.schedule.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 4, S, S, generator=g)
    t = torch.tensor([50, 900])
    cond = tv.encode_prompt(["a red cube", "a red cube"])
    with torch.no_grad():
        raw = _raw(tv, x_t, t, cond.embeds)
        torch.testing.assert_close(tv.predict(x_t, t, cond, output="v_prediction"), raw, rtol=1e-4, atol=1e-5)
        eps = tv.predict(x_t, t, cond, output="epsilon")
        torch.testing.assert_close(eps, tv.schedule.convert(raw, x_t, t, "v_prediction", "epsilon"),
                                   rtol=1e-4, atol=1e-5)
        raw_u = _raw(tv, x_t, t, cond.negative_embeds)
        e_u = tv.schedule.convert(raw_u, x_t, t, "v_prediction", "epsilon")
        torch.testing.assert_close(tv.predict(x_t, t, cond, guidance_scale=4.0), e_u + 4.0 * (eps - e_u),
                                   rtol=1e-4, atol=1e-4)


def test_gradients_reach_images_but_never_teacher_params(teacher):
    imgs = _images(requires_grad=True)
    z = teacher.encode(imgs)
    cond = teacher.encode_prompt(["a red cube"])
    t = torch.tensor([300, 300])
    eps = torch.randn_like(z)
    pred = teacher.predict(teacher.schedule.add_noise(z, eps, t), t, cond, guidance_scale=5.0)
    (pred.square().mean() + z.square().mean()).backward()
    assert imgs.grad is not None and imgs.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # decode is differentiable w.r.t. latents too
    lat = torch.randn(1, 4, S, S, requires_grad=True)
    teacher.decode(lat).mean().backward()
    assert lat.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_prompt_cache_hits_and_negative_prompts(teacher, monkeypatch):
    calls = []
    original = type(teacher)._embed_texts

    def counting(self, texts):
        calls.append(list(texts))
        return original(self, texts)

    monkeypatch.setattr(type(teacher), "_embed_texts", counting)
    teacher.clear_prompt_cache()
    a = teacher.encode_prompt(["a purple torus", "a purple torus"])
    assert calls == [["a purple torus", ""]]  # each distinct text embedded once
    hits = teacher.cache_hits
    b = teacher.encode_prompt("a purple torus")
    assert len(calls) == 1 and teacher.cache_hits == hits + 2
    torch.testing.assert_close(a.embeds[0], b.embeds[0])
    torch.testing.assert_close(a.embeds[0], a.embeds[1])
    n = teacher.encode_prompt(["a purple torus"], negative="unrealistic, blurry, low quality")
    assert n.negative_texts == ["unrealistic, blurry, low quality"]
    assert not torch.allclose(n.negative_embeds, b.negative_embeds)
    torch.testing.assert_close(n.embeds, b.embeds)
    per_sample = teacher.encode_prompt(["a", "b"], negative=["x", "y"])
    assert per_sample.negative_texts == ["x", "y"]
    with pytest.raises(ValueError):
        teacher.encode_prompt(["a", "b"], negative=["x", "y", "z"])


def test_text_cond_indexing_cat_interpolate(teacher):
    c = teacher.encode_prompt(["a red cube", "a blue ball", "a green cone"])
    assert c[1].texts == ["a blue ball"] and c[1].embeds.shape[0] == 1
    assert c[torch.tensor([2, 0])].texts == ["a green cone", "a red cube"]
    assert c[1:].texts == ["a blue ball", "a green cone"]
    cat = TextCond.cat([c[0], c[2]])
    assert cat.texts == ["a red cube", "a green cone"] and len(cat) == 2
    mid = c[0].interpolate(c[1], 0.25)
    torch.testing.assert_close(mid.embeds, 0.75 * c[0].embeds + 0.25 * c[1].embeds)
    assert mid.texts == ["a red cube"]
    per = c[0].interpolate(c[1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(per.embeds[0], c[0].embeds[0])
    torch.testing.assert_close(per.embeds[1], c[1].embeds[0])
    assert c[0].expand(4).embeds.shape[0] == 4
    with pytest.raises(ValueError):
        c.expand(4)


def test_view_suffixes_follow_azimuth_convention():
    az = [0, 30, -44, 60, 90, -90, 134, 136, 180, -170, 350, 0]
    el = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 75]
    assert view_suffixes(az, el) == [
        "front view", "front view", "front view", "side view", "side view", "side view", "side view",
        "back view", "back view", "back view", "front view", "overhead view"]
    assert view_suffixes([90, -90, 0], mode="left_right") == ["right side view", "left side view", "front view"]
    assert view_suffixes([50], front_range=60) == ["front view"]
    assert view_prompts("a red cube", [0, 180]) == ["a red cube, front view", "a red cube, back view"]


def test_view_conditioned_discrete_and_interpolated(teacher):
    cond = view_conditioned(teacher, "a red cube", [0, 90, 180], [10, 10, 10], negative="blurry")
    assert cond.texts == ["a red cube, front view", "a red cube, side view", "a red cube, back view"]
    assert cond.negative_texts == ["blurry"] * 3
    anchors = teacher.encode_prompt(["a red cube, front view", "a red cube, side view", "a red cube, back view",
                                     "a red cube, overhead view"], negative="blurry")
    front, side, back, over = (anchors.embeds[i] for i in range(4))
    it = view_conditioned(teacher, "a red cube", [0, 45, 90, -135, 180, 30], [0, 0, 0, 0, 0, 80],
                          mode="interpolated", negative="blurry")
    assert torch.equal(it.embeds[0], front)  # azimuth 0 is exactly the front embedding
    torch.testing.assert_close(it.embeds[1], 0.5 * front + 0.5 * side)
    torch.testing.assert_close(it.embeds[2], side)
    torch.testing.assert_close(it.embeds[3], 0.5 * side + 0.5 * back)
    torch.testing.assert_close(it.embeds[4], back)
    torch.testing.assert_close(it.embeds[5], over)
    torch.testing.assert_close(it.negative_embeds, anchors.negative_embeds[:1].expand(6, -1, -1))
    assert it.texts[0] == "a red cube, front view" and it.texts[5] == "a red cube, overhead view"
    w = interpolation_weights([0, 45, 135], [0, 0, 0])
    torch.testing.assert_close(sum(w.values()), torch.ones(3, dtype=torch.float64))
    # guided prediction with an interpolated condition runs
    with torch.no_grad():
        x = torch.randn(6, 4, S, S)
        assert teacher.predict(x, 400, it, guidance_scale=7.5).shape == x.shape


def test_lora_load_changes_outputs(teacher, sd_path, tmp_path):
    lora_dir = make_tiny_lora(teacher.unet, tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(1, 4, S, S, generator=g)
    t = torch.tensor([400])
    with torch.no_grad():
        base = teacher.predict(x_t, t, teacher.encode_prompt("a red cube"))
    tl = load_teacher(str(sd_path), lora=str(lora_dir))
    assert tl.lora_adapters == {"default": 1.0}
    assert all(not p.requires_grad for p in tl.parameters())
    cond = tl.encode_prompt("a red cube")
    with torch.no_grad():
        with_lora = tl.predict(x_t, t, cond)
        assert not torch.allclose(with_lora, base, atol=1e-4)
        with tl.lora_disabled():
            torch.testing.assert_close(tl.predict(x_t, t, cond), base, rtol=1e-4, atol=1e-5)
        # leaving the context must not unfreeze the loaded (frozen) adapter: peft's enable_adapters() would
        assert all(not p.requires_grad for p in tl.parameters())
        tl.set_lora_scale(0.0)
        torch.testing.assert_close(tl.predict(x_t, t, cond), base, rtol=1e-4, atol=1e-5)
        tl.set_lora_scale(1.0)
        torch.testing.assert_close(tl.predict(x_t, t, cond), with_lora)
        tl.unload_lora()
        torch.testing.assert_close(tl.predict(x_t, t, cond), base, rtol=1e-4, atol=1e-5)
        # load_lora on a loaded teacher, from a single .safetensors file
        tl.load_lora(lora_dir / "pytorch_lora_weights.safetensors", adapter_name="style")
        torch.testing.assert_close(tl.predict(x_t, t, cond), with_lora, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="LoRA"):
        tl.load_lora(tmp_path / "no-such-lora")


def test_missing_or_unloadable_teachers_give_user_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="not found: give a local folder with model_index.json"):
        load_teacher(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        load_teacher(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    with pytest.raises(UserError):
        load_teacher(str(broken))
    with pytest.raises(UserError, match="registered teachers are"):
        load_teacher("no-such-teacher")
    # a hub id with HF_HUB_OFFLINE set (conftest) fails fast with the same clear message, no download
    with pytest.raises(UserError, match="downloads need network"):
        load_teacher("nobody-here/no-such-model-xyz")


def test_registry_register_list_and_resolve(teacher):
    register_teacher("test-dummy", lambda **kw: ("dummy", kw), "a dummy teacher for tests")
    try:
        assert list_teachers()["test-dummy"] == "a dummy teacher for tests"
        assert load_teacher("TEST-dummy", device="cpu") == ("dummy", {"device": "cpu"})
        with pytest.raises(UserError, match="test-dummy"):
            load_teacher("unknown-thing")
        with pytest.raises(ValueError):
            register_teacher("test-dummy", lambda **kw: None)
    finally:
        unregister_teacher("test-dummy")
    assert "test-dummy" not in list_teachers()
    assert "sd21-base" in list_teachers()
