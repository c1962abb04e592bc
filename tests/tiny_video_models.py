"""Architecture-true tiny *video* models with random weights, saved as complete pipeline folders.

Each builder writes what the real pipeline's ``save_pretrained`` writes (``model_index.json`` + component
folders), with tiny configs of the real diffusers / transformers classes, so that tests load them back **by
path** through ``load_teacher`` and run every line of the real-model code path offline:

* :func:`make_tiny_modelscope` -- ``TextToVideoSDPipeline``: ``UNet3DConditionModel`` + ``AutoencoderKL`` (factor
  2) + CLIP text encoder / tokenizer + ``DDIMScheduler``; 16 px, 4 frames.
* :func:`make_tiny_animatediff` -- ``AnimateDiffPipeline``: ``UNetMotionModel`` (the tiny SD UNet of
  :mod:`tiny_models` + a ``MotionAdapter``) + the same VAE / CLIP side + ``DDIMScheduler`` (linear betas).
  :func:`make_tiny_motion_adapter` saves a lone ``MotionAdapter`` that fits :func:`tiny_models.make_tiny_sd`.
* :func:`make_tiny_wan` -- ``WanPipeline``: ``WanTransformer3DModel`` + ``AutoencoderKLWan`` (causal, 4x time,
  4x space, non-trivial ``latents_mean`` / ``latents_std``) + ``UMT5EncoderModel`` + an offline T5 tokenizer +
  ``FlowMatchEulerDiscreteScheduler(shift=3)``; 16 px, 5 frames. ``pixel=True``: the pixel-space layout (no
  ``vae``, a 3-channel transformer with patch (1, 4, 4), a tiny CLIP text encoder), 16 px, 4 frames.

The temporal layers these models zero-initialise (ModelScope's temporal convolutions / attention outputs,
AnimateDiff's motion-module outputs) are given small random weights so that frames really interact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import TINY_WORDS, tiny_sd_components

from studio.teachers.diffusers_video import write_video_facts

T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def _wake_zero_params(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Give parameters that are exactly zero (zero-initialised output projections) small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _clip_side(path: Path, seed: int) -> dict:
    """The tiny SD components of :mod:`tiny_models` (UNet2D, VAE factor 2, CLIP encoder + tokenizer, scheduler)."""
    return tiny_sd_components(sample_size=8, seed=seed, tokenizer_dir=path.parent / f".{path.name}_tok")


def _ddim(beta_schedule: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def make_tiny_modelscope(path: str | Path, seed: int = 0, num_frames: int = 4) -> Path:
    """Save a tiny ``TextToVideoSDPipeline`` (latents 4 x 8 x 8 per frame, 16 px frames). Returns ``path``."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    path = Path(path)
    comps = _clip_side(path, seed)
    torch.manual_seed(seed + 10)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)
    _wake_zero_params(unet, seed + 11)
    pipe = TextToVideoSDPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                 unet=unet.eval(), scheduler=_ddim("scaled_linear"))
    pipe.save_pretrained(str(path))
    write_video_facts(path, num_frames=num_frames, frame_rate=8)
    return path


def tiny_motion_adapter(seed: int = 0):
    """A ``MotionAdapter`` fitting the tiny SD UNet (blocks 32, 64; one layer per block), random non-zero outputs."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    _wake_zero_params(adapter, seed + 1)
    return adapter.eval()


def make_tiny_motion_adapter(path: str | Path, seed: int = 20) -> Path:
    """Save a lone tiny ``MotionAdapter`` (to combine with ``make_tiny_sd(..., sample_size=8)``). Returns ``path``."""
    path = Path(path)
    tiny_motion_adapter(seed).save_pretrained(str(path))
    return path


def make_tiny_animatediff(path: str | Path, seed: int = 0, num_frames: int = 4) -> Path:
    """Save a tiny ``AnimateDiffPipeline`` (``unet/`` is the saved ``UNetMotionModel``). Returns ``path``."""
    from diffusers import AnimateDiffPipeline

    path = Path(path)
    comps = _clip_side(path, seed)
    adapter = tiny_motion_adapter(seed + 20)
    pipe = AnimateDiffPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                               unet=comps["unet"], motion_adapter=adapter, scheduler=_ddim("linear"))
    pipe.save_pretrained(str(path))
    write_video_facts(path, num_frames=num_frames, frame_rate=8)
    return path


def make_tiny_t5_tokenizer(folder: str | Path, words=TINY_WORDS, model_max_length: int = 512):
    """An offline T5-style tokenizer (``tokenizers`` Unigram with SentencePiece's metaspace, ``</s>`` appended,
    ``<pad>`` = 0) wrapped in transformers' fast ``T5Tokenizer`` and saved to ``folder``; every word outside
    ``words`` falls back to single characters (``<unk>`` for characters outside ASCII letters / digits /
    punctuation). Returns the loaded tokenizer."""
    import string

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import AutoTokenizer, T5TokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [("\u2581", -2.0)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    eos = T5_SPECIALS.index("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)
    folder = Path(folder)
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def make_tiny_wan(path: str | Path, pixel: bool = False, seed: int = 0, num_frames: int | None = None,
                  resolution: int = 16) -> Path:
    """Save a tiny ``WanPipeline`` folder (latent, or ``pixel=True`` pixel space). Returns ``path``.

    Latent: ``AutoencoderKLWan`` (z_dim 4, spatial 4x, temporal 4x, per-channel ``latents_mean`` / ``latents_std``
    far from 0 / 1), transformer patch (1, 2, 2), ``UMT5EncoderModel`` (d_model 32) + T5 tokenizer; 5 frames.
    Pixel: no VAE, transformer in/out 3 channels with patch (1, 4, 4), ``CLIPTextModel`` (32) + ``CLIPTokenizer``
    as its text side (the ShapeWorld teacher's choice); 4 frames. ``FlowMatchEulerDiscreteScheduler(shift=3)``.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    if pixel:
        comps = _clip_side(path, seed)
        text_encoder, tokenizer, vae = comps["text_encoder"], comps["tokenizer"], None
        channels, patch = 3, (1, 4, 4)
    else:
        tokenizer = make_tiny_t5_tokenizer(path.parent / f".{path.name}_t5tok")
        torch.manual_seed(seed + 30)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
        torch.manual_seed(seed + 31)
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[True, True], latents_mean=[0.3, -0.5, 0.1, 0.8],
                               latents_std=[1.7, 0.6, 2.4, 1.2], scale_factor_temporal=4,
                               scale_factor_spatial=4).eval()
        channels, patch = 4, (1, 2, 2)
    torch.manual_seed(seed + 32)
    transformer = WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=channels,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()
    _wake_zero_params(transformer, seed + 33)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(str(path))
    index = json.loads((path / "model_index.json").read_text())
    assert (index.get("vae") or [None])[0] is None if pixel else index["vae"][1] == "AutoencoderKLWan"
    write_video_facts(path, num_frames=num_frames or (4 if pixel else 5), native_resolution=resolution,
                      frame_rate=8)
    return path
