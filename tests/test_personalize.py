"""DreamBooth-LoRA personalisation (studio.train.personalize) on architecture-true tiny models loaded by path."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_sd

from studio.errors import UserError
from studio.train.personalize import (
    LORA_WEIGHT_NAME,
    META_NAME,
    DreamBoothConfig,
    DreamBoothStage,
    dreambooth_lora,
    dreambooth_loss,
    prepare_instance_data,
)
from studio.teachers.registry import load_teacher

PROMPT = "a red cube"
#: a fast test configuration: same loop and loss as the defaults, fewer steps, a larger lr
FAST = {"steps": 40, "lr": 1e-2, "batch_size": 2, "seed": 0}


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("db") / "sd", sample_size=16)


@pytest.fixture(scope="module")
def sd_v_path(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("dbv") / "sdv", prediction_type="v_prediction", sample_size=16)


def _save_pixel_model(path, **kw):
    from tiny_models import make_tiny_pixel_sd

    return make_tiny_pixel_sd(path, **kw)


@pytest.fixture(scope="module")
def pixel_path(tmp_path_factory):
    return _save_pixel_model(tmp_path_factory.mktemp("dbp") / "pix")


def _images(n=2, size=48):
    """Fixed, smooth, distinct instance images in [0,1] (not at the native size, so resizing runs)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        r = 0.5 + 0.5 * torch.sin(6.0 * xx + i)
        g = 0.5 + 0.5 * torch.cos(5.0 * yy - 2 * i)
        b = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1 * (i + 1)).float()
        out.append(torch.stack([r, g, b]))
    return torch.stack(out)


def _eval_set(teacher, images, cfg=None):
    """Fixed (x0, embeds, t, noise) covering the whole t range for every image."""
    x0, _, emb = prepare_instance_data(teacher, images, PROMPT, cfg)
    ts = torch.tensor([50, 250, 450, 650, 850, 999])
    x0r = x0.repeat_interleave(len(ts), 0)
    t = ts.repeat(x0.shape[0])
    noise = torch.randn(x0r.shape, generator=torch.Generator().manual_seed(123))
    return x0r, emb, t, noise


@torch.no_grad()
def _eval_loss(teacher, ev):
    return float(dreambooth_loss(teacher, *ev))


@torch.no_grad()
def _preds(teacher, seed=7):
    g = torch.Generator().manual_seed(seed)
    shape = (2, teacher.latent_channels, *teacher.latent_size(teacher.native_resolution))
    x = torch.randn(shape, generator=g)
    cond = teacher.encode_prompt([PROMPT])
    return torch.cat([teacher.predict(x, torch.tensor([100, 700]), cond, guidance_scale=1.0),
                      teacher.predict(x, torch.tensor([300, 900]), cond, guidance_scale=4.0)])


def _base_state(teacher):
    """Every non-LoRA tensor of the teacher, keyed by the un-wrapped (pre-peft) name."""
    out = {}
    for n, p in teacher.named_parameters():
        if "lora_" in n:
            continue
        out[n.replace(".base_layer", "")] = p.detach().clone()
    return out


def test_lora_at_init_leaves_predictions_unchanged(sd_path):
    teacher = load_teacher(str(sd_path))
    before = _preds(teacher)
    stage = DreamBoothStage(teacher, _images(), PROMPT, DreamBoothConfig(**FAST))
    assert teacher.lora_adapters == {"personal": 1.0}
    names = list(stage.parameters)
    assert names and all(".lora_A.personal." in n or ".lora_B.personal." in n for n in names)
    assert {n.split(".")[-4] for n in names} <= {"to_q", "to_k", "to_v", "0"}
    assert all(float(p.detach().abs().max()) == 0 for n, p in stage.parameters.items() if "lora_B" in n)
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable == {f"unet.{n}" for n in names}
    assert torch.equal(_preds(teacher), before)
    stage.finish()
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("path_fixture", ["sd_path", "sd_v_path", "pixel_path"])
def test_training_lowers_the_loss_and_changes_only_the_lora(path_fixture, request):
    path = request.getfixturevalue(path_fixture)
    teacher = load_teacher(str(path))
    expected_type = "v_prediction" if path_fixture == "sd_v_path" else "epsilon"
    assert teacher.schedule.prediction_type == expected_type
    assert teacher.is_latent == (path_fixture != "pixel_path")
    images = _images()
    ev = _eval_set(teacher, images)
    base = _base_state(teacher)
    loss0 = _eval_loss(teacher, ev)
    preds0 = _preds(teacher)
    records = []
    summary = dreambooth_lora(teacher, images, PROMPT, DreamBoothConfig(**FAST), progress=records.append)
    loss1 = _eval_loss(teacher, ev)
    assert loss1 < 0.97 * loss0, (loss0, loss1)
    # the summary and the progress records
    assert summary["steps"] == FAST["steps"] and summary["resumed"] is False and summary["out"] is None
    assert summary["prediction_type"] == expected_type and summary["num_images"] == 2
    assert summary["resolution"] == teacher.native_resolution and summary["seconds"] > 0
    assert summary["loss_last_mean"] < summary["loss_first_mean"]
    assert [r["step"] for r in records] == list(range(1, FAST["steps"] + 1))
    assert records[0]["loss"] == summary["loss_first"] and records[-1]["loss"] == summary["loss_last"]
    # base weights bitwise unchanged, the LoRA trained, everything frozen again, LoRA active at scale 1
    after = _base_state(teacher)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)
    lora_b = [p for n, p in teacher.unet.named_parameters() if "lora_B.personal" in n]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p.grad is not None for p in teacher.parameters())
    assert teacher.lora_adapters == {"personal": 1.0}
    preds1 = _preds(teacher)
    assert not torch.allclose(preds1, preds0)
    with teacher.lora_disabled():  # the base model is still there underneath
        assert torch.allclose(_preds(teacher), preds0, atol=1e-6)


def test_only_lora_params_get_gradients_and_steps(sd_path):
    teacher = load_teacher(str(sd_path))
    stage = DreamBoothStage(teacher, _images(), PROMPT, DreamBoothConfig(**FAST))
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    out = stage.train_step(0, 0.0)
    out.loss.backward()
    with_grad = {n for n, p in teacher.named_parameters() if p.grad is not None}
    assert with_grad == {f"unet.{n}" for n in stage.parameters if "lora_B" in n} | \
        {f"unet.{n}" for n in stage.parameters if "lora_A" in n}
    stage.optimizer.step()
    changed = {n for n, p in teacher.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {f"unet.{n}" for n in stage.parameters}
    stage.finish()


def test_saved_lora_reproduces_the_trained_teacher_and_resumes(sd_path, tmp_path):
    from safetensors import safe_open

    from studio.teachers.diffusers_sd import DiffusersTeacher

    images = _images()
    cfg = DreamBoothConfig(**dict(FAST, steps=12))
    out = tmp_path / "lora"
    trained = load_teacher(str(sd_path))
    summary = dreambooth_lora(trained, images, PROMPT, cfg, out=out)
    assert summary["out"] == str(out)
    f = out / LORA_WEIGHT_NAME
    assert f.is_file() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    with safe_open(str(f), framework="pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4
    assert json.loads((out / META_NAME).read_text())["complete"] is True
    ref = _preds(trained)
    # the diffusers-format file loads through the ordinary teacher loader
    fresh = DiffusersTeacher.from_pretrained(str(sd_path), lora=str(out))
    assert torch.allclose(_preds(fresh), ref, atol=1e-5)
    fresh_file = load_teacher(str(sd_path), lora=str(f))
    assert torch.allclose(_preds(fresh_file), ref, atol=1e-5)
    # resume: the finished run is loaded, not retrained
    again = load_teacher(str(sd_path))
    s2 = dreambooth_lora(again, images, PROMPT, cfg, out=out, resume=True)
    assert s2["resumed"] is True and s2["loss_last"] == summary["loss_last"]
    assert again.lora_adapters == {"personal": 1.0}
    assert torch.allclose(_preds(again), ref, atol=1e-5)
    # another prompt does not reuse it
    other = load_teacher(str(sd_path))
    with pytest.warns(RuntimeWarning, match="from scratch"):
        s3 = dreambooth_lora(other, images, "a blue ball", DreamBoothConfig(**dict(FAST, steps=2)), out=tmp_path / "lora",
                             resume=True)
    assert s3["resumed"] is False


def test_unfinished_run_continues_from_its_checkpoint(sd_path, tmp_path):
    images = _images()
    cfg = DreamBoothConfig(**dict(FAST, steps=8, checkpoint_every=4))
    straight = load_teacher(str(sd_path))
    dreambooth_lora(straight, images, PROMPT, cfg)
    ref = {n: p.detach().clone() for n, p in straight.unet.named_parameters() if "lora_" in n}

    out = tmp_path / "run"
    first = load_teacher(str(sd_path))
    base_preds = _preds(first)
    with pytest.raises(Exception, match="cancelled"):
        dreambooth_lora(first, images, PROMPT, cfg, out=out, progress=lambda r: r["step"] < 5)
    # a cancelled run leaves the teacher as it was (the partial LoRA lives on in the checkpoint)
    assert not any(p.requires_grad for p in first.parameters())
    assert first.lora_adapters == {} and torch.equal(_preds(first), base_preds)
    assert (out / "checkpoints" / "last.safetensors").is_file() and not (out / LORA_WEIGHT_NAME).exists()
    second = load_teacher(str(sd_path))
    s = dreambooth_lora(second, images, PROMPT, cfg, out=out, resume=True)
    assert s["resumed"] is False and (out / LORA_WEIGHT_NAME).is_file()
    got = {n: p for n, p in second.unet.named_parameters() if "lora_" in n}
    assert all(torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)


def test_same_seed_same_lora_with_flips(sd_path):
    cfg = DreamBoothConfig(**dict(FAST, steps=4, flip=True, seed=3))
    res = []
    for _ in range(2):
        t = load_teacher(str(sd_path))
        dreambooth_lora(t, _images(3), PROMPT, cfg)
        res.append({n: p.detach().clone() for n, p in t.unet.named_parameters() if "lora_" in n})
    assert res[0].keys() == res[1].keys()
    assert all(torch.equal(res[0][k], res[1][k]) for k in res[0])


def test_bad_inputs_raise_user_errors(sd_path):
    teacher = load_teacher(str(sd_path))
    img = _images()
    bad_images = [torch.zeros(0, 3, 32, 32), torch.rand(3, 32, 32), torch.rand(2, 4, 32, 32), img * 255,
                  img * 2 - 1, (img * 255).to(torch.uint8), img.numpy()]
    for bad in bad_images:
        with pytest.raises(UserError):
            dreambooth_lora(teacher, bad, PROMPT, DreamBoothConfig(**FAST))
    for kw in ({"steps": 0}, {"steps": -3}, {"batch_size": 0}, {"rank": 0}, {"lr": 0.0},
               {"resolution": 31}, {"target_modules": ("no_such_module",)}):
        with pytest.raises(UserError):
            dreambooth_lora(teacher, img, PROMPT, DreamBoothConfig(**dict(FAST, **kw)))
    with pytest.raises(UserError, match="prompt"):
        dreambooth_lora(teacher, img, "  ", DreamBoothConfig(**FAST))
    with pytest.raises(UserError, match="no diffusers UNet"):
        dreambooth_lora(load_teacher("shapeworld-exact"), img, PROMPT, DreamBoothConfig(**FAST))
    # none of the failures left an adapter behind or unfroze anything
    assert teacher.lora_adapters == {}
    assert not any(p.requires_grad for p in teacher.parameters())
    dreambooth_lora(teacher, img, PROMPT, DreamBoothConfig(**dict(FAST, steps=1)))
    with pytest.raises(UserError, match="already has a LoRA"):
        dreambooth_lora(teacher, img, PROMPT, DreamBoothConfig(**dict(FAST, steps=1)))


def test_shipped_shapeworld_unet_personalises_when_present(tmp_path):
    from studio.assets import assets_dir

    if not (assets_dir() / "shapeworld-unet" / "model_index.json").is_file():
        pytest.skip("shapeworld-unet weights not in assets/")
    teacher = load_teacher("shapeworld-unet")
    assert not teacher.is_latent
    images, cfg = _images(), DreamBoothConfig(**dict(FAST, steps=12, lr=1e-3))
    ev = _eval_set(teacher, images)
    loss0 = _eval_loss(teacher, ev)
    dreambooth_lora(teacher, images, PROMPT, cfg, out=tmp_path / "sw")
    assert _eval_loss(teacher, ev) < loss0
    fresh = load_teacher("shapeworld-unet", lora=str(tmp_path / "sw"))
    assert torch.allclose(_preds(fresh), _preds(teacher), atol=1e-5)


def test_an_already_loaded_lora_stays_active_and_frozen(sd_path, tmp_path):
    from tiny_models import make_tiny_lora

    base = load_teacher(str(sd_path))
    make_tiny_lora(base.unet, tmp_path / "style", std=0.05)
    teacher = load_teacher(str(sd_path), lora=str(tmp_path / "style"), lora_scale=0.5)
    before = {n: p.detach().clone() for n, p in teacher.unet.named_parameters() if ".default." in n}
    preds0 = _preds(teacher)
    stage = DreamBoothStage(teacher, _images(), PROMPT, DreamBoothConfig(**FAST))
    assert teacher.lora_adapters == {"default": 0.5, "personal": 1.0}
    assert torch.equal(_preds(teacher), preds0)  # both adapters active, the new one still zero
    stage.finish()
    teacher.unload_lora("personal")
    dreambooth_lora(teacher, _images(), PROMPT, DreamBoothConfig(**dict(FAST, steps=3)))
    assert teacher.lora_adapters == {"default": 0.5, "personal": 1.0}
    after = {n: p for n, p in teacher.unet.named_parameters() if ".default." in n}
    assert before and all(torch.equal(after[n], before[n]) for n in before)
