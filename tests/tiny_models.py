"""Architecture-true tiny models with random weights, built offline and saved with ``save_pretrained``.

Tests load them back by path through the user-facing loaders (``load_teacher(str(path))``), so the
real diffusers / transformers code path runs without downloading anything.

* :func:`make_tiny_clip_tokenizer` -- a byte-level BPE CLIP tokenizer from a vocab.json / merges.txt
  written here (all 256 byte symbols, their end-of-word forms and merges for a small word list).
* :func:`make_tiny_sd` -- a ``StableDiffusionPipeline`` layout (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, CLIPTokenizer, DDPMScheduler) of a few hundred kB.
* :func:`make_tiny_lora` -- a peft LoRA on that UNet with non-zero weights, saved in diffusers format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.teachers.offline_tokenizer import make_clip_tokenizer, write_clip_bpe_vocab

#: words that get whole-word BPE merges in the tiny vocabulary (others fall back to byte symbols)
TINY_WORDS = (
    "a an the of and with on in red green blue yellow white black purple orange cube ball sphere cone "
    "torus cylinder box chair car dog cat house tree front side back left right overhead view views "
    "photo high quality blurry low unrealistic bouncing rolling spinning"
).split()



def write_tiny_clip_vocab(folder: str | Path, words=TINY_WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for a tiny CLIP BPE tokenizer; returns their paths."""
    return write_clip_bpe_vocab(folder, words)


def make_tiny_clip_tokenizer(folder: str | Path, model_max_length: int = 77):
    return make_clip_tokenizer(folder, TINY_WORDS, model_max_length)


def tiny_vae(latent_size: int, seed: int):
    """A tiny ``AutoencoderKL`` (factor 2, 4 latent channels) built after ``torch.manual_seed(seed)``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=32,
        sample_size=latent_size * 2,
    )


def tiny_sd_components(prediction_type: str = "epsilon", sample_size: int = 32, seed: int = 0,
                       tokenizer_dir: str | Path | None = None, text_max_length: int = 77):
    """The five components of a tiny SD pipeline (random weights, seeded)."""
    import tempfile

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(4, 8), norm_num_groups=32, use_linear_projection=True,
    )
    vae = tiny_vae(sample_size, seed + 1)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(tempfile.mkdtemp(prefix="tiny_clip_tok_"))
    tokenizer = make_tiny_clip_tokenizer(tok_dir, model_max_length=text_max_length)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=text_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, clip_sample=False,
                              steps_offset=1)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler)


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon", sample_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` to ``path`` (UNet latents ``sample_size``², VAE factor 2,
    so the native image size is ``2 * sample_size``). Returns ``path``."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    comps = tiny_sd_components(prediction_type, sample_size, seed, tokenizer_dir=path.parent / f".{path.name}_tok")
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def make_tiny_lora(unet, path: str | Path, rank: int = 4, seed: int = 0, std: float = 0.5) -> Path:
    """Add a random (non-zero) peft LoRA to a *copy* of ``unet``'s attention projections and save it in
    diffusers' LoRA format (``pytorch_lora_weights.safetensors`` with ``unet.`` keys) under ``path``."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet).to(torch.float32)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    state = get_peft_model_state_dict(model)
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=state, safe_serialization=True)
    return path


def make_tiny_zero123(path: str | Path, sample_size: int = 8, seed: int = 0, prediction_type: str = "epsilon",
                      projection_key: str = "clip_camera_projection", pixel: bool = False) -> Path:
    """Save a tiny random Zero123 layout (as ``bennyguo/zero123-xl-diffusers``) to ``path``.

    Components: ``unet`` (UNet2DConditionModel, 8 input channels = noisy latent + reference latent,
    cross-attention 32), ``vae`` (AutoencoderKL, factor 2, so the native image size is ``2 * sample_size``),
    ``image_encoder`` (CLIPVisionModelWithProjection, 32x32 input, projection 32), ``feature_extractor``
    (CLIPImageProcessor at 32 px), ``clip_camera_projection`` (CLIPCameraProjection 32 + 4 -> 32; or the
    community ``cc_projection`` / CCProjection layout with ``projection_key="cc_projection"``) and
    ``scheduler`` (DDIMScheduler, SD's scaled_linear betas), with a hub-like ``model_index.json``.
    ``pixel=True``: the pixel-space variant (as ``shapeworld-nv-unet``): no ``vae`` (folder and index entry),
    a 6-channel UNet (noisy image + reference image), 3 output channels; native size ``sample_size``.
    """
    import diffusers
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from studio.teachers.novel_view import CCProjection, CLIPCameraProjection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=6 if pixel else 8, out_channels=3 if pixel else 4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(4, 8), norm_num_groups=32,
    )
    vae = tiny_vae(sample_size, seed + 1)
    torch.manual_seed(seed + 2)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=32,
    ))
    torch.manual_seed(seed + 3)
    if projection_key == "clip_camera_projection":
        projection, proj_cls = CLIPCameraProjection(embedding_dim=32, additional_embeddings=4), "CLIPCameraProjection"
    else:
        projection, proj_cls = CCProjection(in_channel=36, out_channel=32), "CCProjection"
    with torch.no_grad():  # a visible dependence on the pose
        for p in projection.parameters():
            p.normal_(0, 0.3)
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(str(path / "unet"))
    if not pixel:
        vae.save_pretrained(str(path / "vae"))
    image_encoder.save_pretrained(str(path / "image_encoder"))
    projection.save_pretrained(str(path / projection_key))
    feature_extractor.save_pretrained(str(path / "feature_extractor"))
    scheduler.save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "Zero123Pipeline", "_diffusers_version": diffusers.__version__,
        projection_key: ["zero123", proj_cls],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if pixel:
        del index["vae"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def make_tiny_pixel_sd(path: str | Path, sample_size: int = 16, in_channels: int = 3, seed: int = 3) -> Path:
    """Save a tiny pixel-space (no ``vae/``) SD layout: a ``in_channels``-channel UNet, CLIP text encoder,
    tokenizer and DDPM scheduler (the layout of ``shapeworld-unet``). Returns ``path``."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    comps = tiny_sd_components(sample_size=sample_size, tokenizer_dir=path.parent / f".{path.name}_tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(4, 8),
        norm_num_groups=32, use_linear_projection=True)
    unet.save_pretrained(path / "unet")
    for k in ("text_encoder", "tokenizer", "scheduler"):
        comps[k].save_pretrained(path / k)
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    return path
