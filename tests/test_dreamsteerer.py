"""DreamSteerer (issue 21) beyond its distillation parts (tests/test_dreamsteerer_parts.py covers spec 11's
properties 1-15 on the pure functions): the three personalisation baselines on a tiny real SD pipeline loaded by
path and on ``shapeworld-unet`` with a personal ShapeWorld concept, their saved formats (read back by diffusers),
the DDS-SM mask function, the steering stage's stop-gradients (property 7 with a real personalisation), DDS-S with
Textual Inversion (property 4 on the real path), edit metrics, and ``studio edit`` end to end on the embedded
default (determinism, property 14, on the whole method)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_sd

from studio.distill.dds import attention_subject_mask, dds, token_indices
from studio.teachers.registry import load_teacher
from studio.train.personalize import (DEFAULT_TOKENS, PersonalizeConfig, cross_attention_kv, load_personalization,
                                      personalize)
from studio.world.concepts import concept_views, edit_pair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _refs(n=3, size=32):
    return concept_views("striped_cube", n, size=size)


def _eps(teacher, prompt, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, r = teacher.latent_channels, teacher.native_resolution // teacher.vae_scale_factor
    x = torch.randn(1, c, r, r, generator=g)
    with torch.no_grad():
        return teacher.predict(x, torch.tensor([500]), teacher.encode_prompt(prompt), guidance_scale=3.0,
                               output="epsilon")


@pytest.mark.parametrize("method", ["textual-inversion", "dreambooth-lora", "custom-diffusion"])
def test_baselines_on_a_tiny_pipeline_by_path(sd_path, tmp_path, method):
    teacher = load_teacher(str(sd_path))
    ref = load_teacher(str(sd_path))  # an untouched copy: the pretrained model
    unet0 = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    token = DEFAULT_TOKENS[method]
    prompt = f"a {token} cube"
    p = personalize(teacher, _refs(), prompt, PersonalizeConfig(method=method, steps=3, lr=1e-2), out=tmp_path / "p")
    assert p.summary["loss_first_mean"] is not None and p.summary["trainable_parameters"] > 0
    # what each baseline trains
    unet1 = teacher.unet.state_dict()
    changed = {k for k in unet0 if k in unet1 and not torch.equal(unet0[k], unet1[k])}
    if method == "textual-inversion":
        assert not changed  # the UNet is untouched
        emb = teacher.text_encoder.get_input_embeddings().weight
        emb0 = ref.text_encoder.get_input_embeddings().weight
        assert torch.equal(emb[:emb0.shape[0]], emb0)  # only the new row exists / moved
    elif method == "custom-diffusion":
        assert changed and all(".attn2.to_k" in k or ".attn2.to_v" in k for k in changed)
    # the pretrained view is exactly the pretrained model; the personalised one differs on the token prompt
    with p.pretrained():
        torch.testing.assert_close(_eps(teacher, "a red cube"), _eps(ref, "a red cube"), rtol=0, atol=0)
    if method != "textual-inversion":
        assert not torch.equal(_eps(teacher, "a red cube"), _eps(ref, "a red cube"))
    # saved and loaded into a fresh teacher: the same personalised predictions
    fresh = load_teacher(str(sd_path))
    q = load_personalization(fresh, tmp_path / "p")
    assert q.method == method and q.token == token
    torch.testing.assert_close(_eps(fresh, prompt), _eps(teacher, prompt), rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "p" / "personalization.json").read_text())
    assert meta["complete"] and meta["prompt"] == prompt


def test_saved_formats_load_in_diffusers(sd_path, tmp_path):
    """TI's learned_embeds and CD's K/V + token files are what diffusers' loaders read."""
    from diffusers import StableDiffusionPipeline

    teacher = load_teacher(str(sd_path))
    p = personalize(teacher, _refs(), "a <new1> cube", PersonalizeConfig(method="custom-diffusion", steps=2, lr=1e-2),
                    out=tmp_path / "cd")
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_path), safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "cd" / "new1.safetensors"), token="<new1>")
    from safetensors.torch import load_file

    # the official script's .bin also holds empty entries for the self-attention processors (safetensors cannot
    # store them), and diffusers 0.42 installs the processors only when _pipeline is given
    state = load_file(str(tmp_path / "cd" / "pytorch_custom_diffusion_weights.safetensors"))
    state.update({n: torch.empty(0) for n in pipe.unet.attn_processors if ".attn1." in n})
    pipe.unet.load_attn_procs(state, _pipeline=pipe)
    assert type(pipe.unet.attn_processors[next(k for k in state if ".attn2." in k).split(".processor")[0]
                                          + ".processor"]).__name__ == "CustomDiffusionAttnProcessor"
    ids = pipe.tokenizer("a <new1> cube", return_tensors="pt").input_ids
    ours = teacher.tokenizer("a <new1> cube", return_tensors="pt").input_ids
    assert torch.equal(ids, ours)
    tid = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[tid],
                               teacher.text_encoder.get_input_embeddings().weight[tid])
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([300])
    emb = teacher.encode_prompt("a <new1> cube").embeds
    with torch.no_grad():
        a = pipe.unet(x, t, encoder_hidden_states=emb).sample
        b = teacher.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert p.method == "custom-diffusion"


@pytest.mark.parametrize("method", ["dreambooth-lora", pytest.param("textual-inversion", marks=pytest.mark.slow),
                                    pytest.param("custom-diffusion", marks=pytest.mark.slow)])
def test_personalisation_learns_the_shapeworld_concept(method):
    """shapeworld-unet + the striped cube (a pattern it never saw): after each baseline the denoising loss on the
    reference renders with the instance prompt is lower than before, at fixed t / noise."""
    from studio.train.personalize import dreambooth_loss

    teacher = load_teacher("shapeworld-unet")
    refs = _refs(4)
    x0 = teacher.encode(refs)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(100, 700, (8,), generator=g)
    noise = torch.randn((8, *x0.shape[1:]), generator=g)
    x0 = x0.repeat(2, 1, 1, 1)

    prompt = f"a {DEFAULT_TOKENS[method]} cube"
    lr = {"dreambooth-lora": 2e-3, "textual-inversion": 2e-2, "custom-diffusion": 5e-4}[method]

    def loss():
        with torch.no_grad():
            return float(dreambooth_loss(teacher, x0, teacher.encode_prompt(prompt).embeds, t, noise))

    before = loss() if method == "dreambooth-lora" else None
    p = personalize(teacher, refs, prompt, PersonalizeConfig(method=method, steps=40, lr=lr))
    after = loss()
    if before is None:  # TI / CD: the token exists only now; "before" = its initial row (the class noun's), pretrained
        tid = teacher.tokenizer.convert_tokens_to_ids(DEFAULT_TOKENS[method])
        emb = teacher.text_encoder.get_input_embeddings().weight
        learned = emb[tid].clone()
        with torch.no_grad():
            ids = teacher.tokenizer("cube", add_special_tokens=False)["input_ids"]
            emb[tid] = emb[ids].mean(0)
        teacher.clear_prompt_cache()
        with p.pretrained():
            before = loss()
        with torch.no_grad():
            emb[tid] = learned
        teacher.clear_prompt_cache()
    assert after < 0.8 * before, (after, before)


def test_textual_inversion_token_rules(sd_path):
    from studio.errors import UserError

    teacher = load_teacher(str(sd_path))
    with pytest.raises(UserError, match="already a word"):
        personalize(teacher, _refs(), "a cube cube", PersonalizeConfig(method="textual-inversion", token="cube", steps=1))
    with pytest.raises(UserError, match="must contain the concept token"):
        personalize(teacher, _refs(), "a red cube", PersonalizeConfig(method="textual-inversion", steps=1))
    with pytest.raises(UserError, match="unknown personalisation method"):
        personalize(teacher, _refs(), "a <v*> cube", PersonalizeConfig(method="lora", steps=1))


def test_dds_s_with_textual_inversion_is_exactly_the_pretrained_source_branch(sd_path):
    """Property 4 on the real path: TI leaves the UNet alone and the source prompt has no new token, so the
    corrected (pretrained) source branch equals the personalised one bit for bit."""
    teacher = load_teacher(str(sd_path))
    p = personalize(teacher, _refs(), "a <v*> cube", PersonalizeConfig(method="textual-inversion", steps=2, lr=1e-2))
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    y, ys = teacher.encode_prompt("a <v*> cube"), teacher.encode_prompt("a red cube")
    kw = dict(noise=torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4)))
    a = dds(teacher, z0 + 0.1, z0, y, ys, torch.tensor([400]), source_teacher=p.source_teacher(), **kw)
    b = dds(teacher, z0 + 0.1, z0, y, ys, torch.tensor([400]), **kw)
    assert torch.equal(a.grad, b.grad) and float(a.grad.abs().max()) > 0


def test_attention_subject_mask_is_pure_and_finds_the_subject():
    teacher = load_teacher("shapeworld-unet")
    pair = edit_pair("striped_cube", 30.0)
    x = teacher.encode(pair["source"])
    ys = teacher.encode_prompt("a red cube")
    before = _eps(teacher, "a red cube")
    procs = dict(teacher.unet.attn_processors)
    mask, maps = attention_subject_mask(teacher, x, ys, token_indices(teacher.tokenizer, "a red cube", "cube"),
                                        threshold=0.5, dilate=0, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (1, 1, 32, 32) and maps.shape == mask.shape
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert dict(teacher.unet.attn_processors) == procs and torch.equal(_eps(teacher, "a red cube"), before)
    gt = pair["mask"]
    iou = float((mask * gt).sum() / (mask + gt).clamp(max=1).sum())
    assert iou > 0.6, iou
    soft, _ = attention_subject_mask(teacher, x, ys, [3], threshold=None, dilate=0,
                                     generator=torch.Generator().manual_seed(0))
    assert float(soft.min()) == 0.0 and float(soft.max()) == 1.0


def test_steering_stage_stop_gradients_with_a_dreambooth_personalisation():
    """Property 7 with a real personalisation: after backward of L_EDSD + L_MS only the steering LoRA has gradients
    (the DreamBooth LoRA, base UNet and text encoder none); a fresh steering LoRA leaves predictions unchanged."""
    from studio.train.edit_stages import SteerStage

    teacher = load_teacher("shapeworld-unet")
    p = personalize(teacher, _refs(), "a sks cube", PersonalizeConfig(method="dreambooth-lora", steps=2, lr=1e-3))
    before = _eps(teacher, "a sks cube")
    pair = edit_pair("striped_cube", 30.0)
    z = teacher.encode(pair["source"])
    y, ys = teacher.encode_prompt("a sks cube"), teacher.encode_prompt("a red cube")
    stage = SteerStage(teacher, p.source_teacher(), z, y, ys, steps=1, guided=z.clone(), seed=0)
    assert torch.equal(_eps(teacher, "a sks cube"), before)
    out = stage.train_step(0, 0.0)
    out.loss.backward()
    grads = {n for n, q in teacher.named_parameters() if q.grad is not None}
    assert grads and grads == set(f"unet.{n}" for n in stage.parameters)
    assert "mode_shift_loss" in out.logs and not torch.equal(stage.z, z)  # the edited latent was refreshed
    stage.remove()
    torch.testing.assert_close(_eps(teacher, "a sks cube"), before, rtol=0, atol=0)


def test_edit_metrics_limits():
    from studio.world.edit_metrics import background_error, concept_error, masked_ssim, palette_distance

    pair = edit_pair("striped_cube", 30.0)
    src, tgt, m = pair["source"], pair["target"], pair["mask"]
    assert float(concept_error(tgt, tgt, m)) == 0.0
    # the concept keeps the silhouette; only edge pixels with alpha < 0.5 (outside the mask) blend object colours
    assert float(background_error(tgt, src, m)) < 0.05
    assert float(masked_ssim(src, src, m)) == pytest.approx(1.0, abs=1e-5)
    assert float(concept_error(src, tgt, m)) > 0.2 and float(background_error(1 - src, src, m)) > 0.5
    # palette: exact colours score ~0 (cdist's float32 error), the source's red far, a 50/50 blend in between
    assert float(palette_distance(tgt, tgt, m)) < 1e-3
    assert float(palette_distance(src, tgt, m)) > float(palette_distance(0.5 * (src + tgt), tgt, m)) > 0.1


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=64, max_position_embeddings=16),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(path)
    return path


def test_clip_scorer_with_a_tiny_real_clip_by_path(tmp_path):
    from studio.teachers.clip_image import ClipImageScorer

    s = ClipImageScorer.from_pretrained(_tiny_clip(tmp_path / "clip"))
    pair = edit_pair("striped_cube", 30.0)
    a, b = pair["source"], pair["target"]
    assert float(s.clip_i(a, a)) == pytest.approx(1.0, abs=1e-5)
    assert float(s.clip_i(a, torch.cat([a, b]))) < 1.0
    assert float(s.feature_distance(a, a)) == 0.0 and float(s.feature_distance(a, b)) > 0


TINY = ["--personalize-steps", "2", "--steer-steps", "2", "--edit-steps", "3", "--guided-samples", "1",
        "--guided-steps", "2", "--num-references", "3"]


def _studio(*args):
    """``studio ...`` in process (the CLI's main; user errors exit 2): returns the exit code."""
    from studio.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_studio_edit_end_to_end_on_the_embedded_default(tmp_path):
    """`studio edit` on the ShapeWorld default with tiny settings writes the edit, mask, steered LoRA,
    personalisation and metrics."""
    assert _studio("edit", "shapeworld:striped_cube@30", "--out", str(tmp_path / "a"), *TINY) == 0
    run = tmp_path / "a" / "striped-cube-30"
    for f in ("edited.png", "source.png", "mask.png", "comparison.png", "metrics.json", "config.yaml",
              "steered/pytorch_lora_weights.safetensors", "personalization/personalization.json"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    for k in ("concept_fidelity_exact", "source_error", "ssim_outside_mask", "nr_denoise_error", "mask_iou"):
        assert isinstance(m[k], float), k
    assert m["steered"] and m["mode_shift"] and m["target_prompt"] == "a sks cube"


@pytest.mark.slow
def test_studio_edit_is_deterministic_and_reuses_a_saved_concept(tmp_path):
    """Property 14 on the whole method (same seed, same edit, byte for byte); a saved personalisation and an image
    file as the source (the path a user with their own photo takes)."""
    for d in ("a", "b"):
        assert _studio("edit", "shapeworld:striped_cube@30", "--out", str(tmp_path / d), *TINY) == 0
    run = tmp_path / "a" / "striped-cube-30"
    assert (run / "edited.png").read_bytes() == (tmp_path / "b" / "striped-cube-30" / "edited.png").read_bytes()
    assert _studio("edit", str(run / "source.png"), "--source-prompt", "a red cube", "--concept",
                   str(run / "personalization"), "--preset", "db", "--out", str(tmp_path / "c"), *TINY) == 0
    m = json.loads((tmp_path / "c" / "source" / "metrics.json").read_text())
    assert not m["steered"] and m["personalization"] == "dreambooth-lora" and "concept_error" not in m


def test_studio_edit_user_errors(tmp_path, capsys):
    assert _studio("edit", str(tmp_path / "missing.png"), "--source-prompt", "a cat", "--out", str(tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _studio("edit", "shapeworld:dragon", "--out", str(tmp_path)) == 2
    assert "unknown ShapeWorld concept" in capsys.readouterr().err
    assert _studio("edit", "shapeworld:striped_cube", "--preset", "xx", "--out", str(tmp_path)) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert _studio("edit", "shapeworld:striped_cube", "--concept", str(tmp_path / "nope"), "--out", str(tmp_path)) == 2
    assert "neither a folder nor a ShapeWorld concept" in capsys.readouterr().err


def test_app_has_an_image_editing_tab_whose_form_takes_a_source_path(tmp_path):
    """The generated app tab (from the registry): the source is the primary input (a path / ShapeWorld spec in the
    form's text box), the form builds a valid DreamSteererConfig."""
    pytest.importorskip("gradio")
    from studio.app import build_app
    from studio.app.core import AppSettings

    (tmp_path / "models").mkdir()
    app = build_app(AppSettings(out=tmp_path / "out", models_dir=tmp_path / "models"))
    tab = app.studio_tabs["image-edit"]
    assert "dreamsteerer" in tab.classes and "source" in tab.primary
    values = {c: c.value for c in tab.form_components}
    values[tab.primary["source"]] = "shapeworld:checker_ball@0"
    method, cfg = tab.config_from(values)
    assert method == "dreamsteerer" and cfg.source == "shapeworld:checker_ball@0" and cfg.concept == "striped_cube"


def test_studio_edit_on_a_tiny_sd_pipeline_by_path_with_an_image_and_reference_folder(sd_path, tmp_path):
    """The real-model path (tier 1): an image file, a folder of reference images, an SD-class teacher folder,
    Custom Diffusion + steering, CLIP-I through a tiny real CLIPModel by path."""
    from studio.io import write_png

    (tmp_path / "refs").mkdir()
    for i, im in enumerate(concept_views("striped_cube", 3, size=64)):
        write_png(tmp_path / "refs" / f"{i}.png", im.permute(1, 2, 0))
    write_png(tmp_path / "src.png", edit_pair("striped_cube", 30.0, size=64)["source"][0].permute(1, 2, 0))
    code = _studio("edit", str(tmp_path / "src.png"), "--source-prompt", "a red cube", "--concept",
                   str(tmp_path / "refs"), "--teacher", str(sd_path), "--baseline", "custom-diffusion",
                   "--clip-model", str(_tiny_clip(tmp_path / "clip")), "--out", str(tmp_path / "out"), *TINY)
    assert code == 0
    m = json.loads((tmp_path / "out" / "src" / "metrics.json").read_text())
    assert m["personalization"] == "custom-diffusion" and m["steered"] and m["target_prompt"] == "a red <new1> cube"
    assert -1.0 <= m["clip_i"] <= 1.0 and m["feature_distance_outside"] >= 0.0
    assert (tmp_path / "out" / "src" / "personalization" / "pytorch_custom_diffusion_weights.safetensors").is_file()
