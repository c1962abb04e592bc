"""The shipped ``shapeworld-unet`` teacher (tier 2) and the pixel-space path of DiffusersTeacher."""
import json

import pytest
import torch

from studio.cameras import orbit_cameras
from studio.errors import UserError
from studio.teachers import list_teachers, load_teacher
from studio.teachers.diffusers_sd import DiffusersTeacher
from studio.teachers.shapeworld_unet import ddim_sample, foreground_mean, shapeworld_unet_path
from studio.world.objects import get_object, list_objects
from studio.world.references import render_gaussian_views


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("shapeworld-unet", device="cpu")


@pytest.fixture(scope="module")
def object_renders():
    """Renders of every object at 8 azimuths x 2 elevations, 32x32: ``([R,3,32,32], owner index per render)``."""
    az = torch.arange(8).float().repeat(2) * 45.0
    el = torch.tensor([0.0, 25.0]).repeat_interleave(8)
    cams = orbit_cameras(el, az, 3.2, 40.0, 64, 64)
    refs, owner = [], []
    for i, o in enumerate(list_objects()):
        img = render_gaussian_views(o.gaussians(6000), cams)["images"].permute(0, 3, 1, 2)
        refs.append(torch.nn.functional.interpolate(img, size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1))
        owner += [i] * img.shape[0]
    return torch.cat(refs), owner


@pytest.fixture(scope="module")
def object_colours():
    """Mean foreground colour of every object over 4 azimuths (the renders the model was trained on)."""
    cams = orbit_cameras(torch.full((4,), 15.0), torch.tensor([0.0, 90.0, 180.0, -90.0]), 3.2, 40.0, 64, 64)
    out = []
    for o in list_objects():
        img = render_gaussian_views(o.gaussians(6000), cams)["images"].permute(0, 3, 1, 2)
        img = torch.nn.functional.interpolate(img, size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
        out.append(foreground_mean(img).mean(0))
    return torch.stack(out)


def test_registered_and_loads_as_pixel_space_diffusers_teacher(teacher):
    assert "shapeworld-unet" in list_teachers()
    assert isinstance(teacher, DiffusersTeacher) and teacher.name == "shapeworld-unet"
    assert teacher.vae is None and not teacher.is_latent
    assert teacher.latent_channels == 3 and teacher.vae_scale_factor == 1 and teacher.native_resolution == 32
    assert teacher.schedule.prediction_type == "epsilon" and teacher.schedule.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in teacher.parameters())


def test_assets_are_safetensors_and_small():
    path = shapeworld_unet_path()
    files = [f for f in path.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert {f.parent.name for f in files if f.suffix == ".safetensors"} == {"unet", "text_encoder"}
    assert sum(f.stat().st_size for f in files) < 20 * 2 ** 20
    index = json.loads((path / "model_index.json").read_text())
    assert "vae" not in index and {"unet", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    info = json.loads((path / "training.json").read_text())
    assert info["resolution"] == 32 and info["final_loss_last200"] < 0.1


def test_encode_decode_predict_with_cfg_shapes(teacher):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64, generator=g, requires_grad=True)
    x0 = teacher.encode(imgs)  # resized to the native 32x32, x = image * 2 - 1
    assert x0.shape == (2, 3, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    x0.sum().backward()
    assert imgs.grad is not None and imgs.grad.abs().sum() > 0
    small = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(teacher.encode(small), small * 2 - 1)
    assert torch.allclose(teacher.decode(small * 2 - 1), small, atol=1e-6)

    cond = teacher.encode_prompt(["a red cube, front view", "a snowman with an orange carrot nose, back view"])
    x_t = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([500, 900])
    e1 = teacher.predict(x_t, t, cond)
    e4 = teacher.predict(x_t, t, cond, guidance_scale=4.0)
    x0_hat = teacher.predict(x_t, t, cond, guidance_scale=4.0, output="sample")
    uncond, cnd = teacher.predict_branches(x_t, t, cond)
    for e in (e1, e4, x0_hat, uncond, cnd):
        assert e.shape == x_t.shape and torch.isfinite(e).all()
    assert torch.allclose(cnd, e1, atol=1e-5)
    assert torch.allclose(e4, uncond + 4.0 * (cnd - uncond), atol=1e-4)
    assert (e4 - e1).abs().mean() > 1e-3  # the text matters


PROMPTS = {
    "red_cube": "a red cube, front view",
    "blue_ball": "a blue ball, side view",
    "green_torus": "a green torus, front view",
    "yellow_cone": "a yellow cone, back view",
    "purple_cylinder": "a purple cylinder",
    "orange_pyramid": "an orange pyramid, front view",
}


def test_samples_look_like_the_prompted_objects(teacher, object_renders):
    """DDIM + CFG samples (started from the white prior mean, as the model was trained on white) are nearest
    (pixel L2 over renders of all 14 objects) to the prompted object for at least 5 of 6 prompts; chance is
    1/14, and random or untrained weights give noise and fail. The training script's own check over every
    object x view prompt is in ``assets/shapeworld-unet/training.json`` ("quality")."""
    names = [o.name for o in list_objects()]
    imgs = ddim_sample(teacher, list(PROMPTS.values()), steps=30, guidance_scale=4.0, seed=0, prior_mean=1.0)
    assert imgs.shape == (len(PROMPTS), 3, 32, 32)
    refs, owner = object_renders
    d = torch.cdist(imgs.flatten(1), refs.flatten(1))  # [P, R]
    got = [names[owner[i]] for i in d.argmin(1).tolist()]
    hits = sum(g == want for g, want in zip(got, PROMPTS))
    assert hits >= 5, got


def test_front_and_back_prompts_differ(teacher):
    """The two-tone box: red front, blue back -- the view phrase steers the sample."""
    imgs = ddim_sample(teacher, ["a white box with a red front and a blue back, front view",
                                 "a white box with a red front and a blue back, back view"],
                       steps=15, guidance_scale=4.0, seed=1)
    col = foreground_mean(imgs)
    red_minus_blue = col[:, 0] - col[:, 2]
    assert red_minus_blue[0] > red_minus_blue[1] + 0.1, col
    assert get_object("two_tone_box").front_back_differ


def test_missing_assets_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_ASSETS", str(tmp_path))
    with pytest.raises(UserError, match="train_shapeworld_unet"):
        load_teacher("shapeworld-unet")


def _save_pixel_model(path, **kw):
    from tiny_models import make_tiny_pixel_sd

    return make_tiny_pixel_sd(path, **kw)


def test_any_pixel_space_folder_loads_by_path(tmp_path):
    t = load_teacher(str(_save_pixel_model(tmp_path / "pix")))
    assert not t.is_latent and t.vae is None and t.native_resolution == 16 and t.latent_size(16) == (16, 16)
    x = t.encode(torch.rand(1, 3, 40, 40))
    assert x.shape == (1, 3, 16, 16)
    eps = t.predict(torch.randn(1, 3, 16, 16), 10, t.encode_prompt("a red cube"), guidance_scale=3.0)
    assert eps.shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match="no vae"):
        load_teacher(str(_save_pixel_model(tmp_path / "latent4", in_channels=4)))
