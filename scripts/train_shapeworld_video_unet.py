#!/usr/bin/env python
"""Train ``shapeworld-video-unet``: a tiny AnimateDiff-style text-to-video model of ShapeWorld video (issue 16).

Two stages, as AnimateDiff is built:

1. ``--stage image``: a tiny conv ``UNet2DConditionModel`` (pixel space, 3 channels) with a tiny
   ``CLIPTextModel`` trained on single *frames* of ShapeWorld clips, each captioned with its clip's prompt
   (shape, colour, background; the motion words are seen but cannot be learned from one frame).
2. ``--stage motion --init-from <image run>``: the UNet inflated into a ``UNetMotionModel`` with a fresh
   ``MotionAdapter`` (``UNetMotionModel.from_unet2d``; the motion modules' output projections are zeroed, so
   the inflated model starts as the image model applied frame by frame) and trained on clips: the motion
   modules at ``--lr``, the spatial layers and the text encoder at ``--lr * --spatial-lr-scale`` (0 freezes them).

Objective: rectified flow in pixel space, ``x_s = (1 - s) x0 + s eps`` with ``x0 = 2 video - 1``, timestep
``1000 s``, the network predicts the velocity ``eps - x0``; ``s`` logit-normal(``--s-mean``, 1). The caption is
dropped (empty string) with probability ``--p-empty`` for classifier-free guidance. The text is encoded by the
AnimateDiff teacher's own rule (CLIP ids padded to the tokenizer's ``model_max_length``, last hidden state).

The saved folder is an ``AnimateDiffPipeline`` layout (``unet/`` a ``UNetMotionModel``, ``vae: null`` = pixel
space, ``scheduler/`` a ``FlowMatchEulerDiscreteScheduler``, ``_studio`` clip facts), loaded by
``AnimateDiffTeacher.from_pretrained`` / ``load_teacher("shapeworld-video-unet")``. An image-stage folder holds
``unet/`` (a ``UNet2DConditionModel``), ``text_encoder/``, ``tokenizer/``.

Ablation switches (issue 16 part 2, "what blocks shape"): ``--prompts one|static|default|full``,
``--background plain`` (the stripes replaced by their mean grey), ``--radius-scale`` (larger objects, clipped
to the frame), ``--text fixed`` (a learned embedding per prompt instead of the text encoder; such runs are
read-outs only and are not saved as a loadable teacher). Read-outs (``--eval-every``): samples scored by
:func:`studio.world.video_metrics.evaluate_videos` (image stage: each sampled frame repeated into a still
clip, so only shape / colour are meaningful). Every read-out is appended to ``--log`` (JSON lines).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from studio.students.ema import EMA
from studio.train.tiny_teacher import save_grid, write_folder_atomically
from studio.world.clips import background, render_clips, sample_clip_specs, video_prompts

MAX_TOKENS = 16
#: parameter-name parts of the temporal layers (AnimateDiff's motion modules; ModelScope's temporal convolutions,
#: temporal transformers and the input temporal transformer)
TEMPORAL = ("motion_modules", "temp_convs", "temp_attentions", "transformer_in", "temporal_res_block", "time_mixer",
            "temporal_transformer_blocks", "time_pos_embed")
FRAME_RATE = 8


# ------------------------------------------------------------------------------------------------ data
def prompt_set(name: str) -> list[str]:
    if name == "one":
        return ["a red ball moving left"]
    if name == "signs":  # probe: one object, the two directions of each axis (what the teacher confuses)
        return ["a red ball moving left", "a red ball moving right", "a red ball moving up", "a red ball moving down"]
    if name == "pair":  # probe: the direction tied to a colour every frame shows (left = red, right = blue)
        return ["a red ball moving left", "a blue ball moving right"]
    if name == "static":
        return video_prompts(cameras=["static"])
    if name == "static-full":
        return video_prompts(full=True, cameras=["static"])
    if name == "default":
        return video_prompts()
    return video_prompts(full=True)


def make_clips(prompts: list[str], seed: int, frames: int, res: int, *, plain: bool = False,
               radius_scale: float = 1.0) -> dict:
    specs = sample_clip_specs(prompts, len(prompts), seed, frames)
    if radius_scale != 1.0:
        specs = [dataclasses.replace(s, radius=s.radius * radius_scale) for s in specs]
    out = render_clips(specs, frames, res)
    if plain:  # remove the stripes: the object layer over the stripes' mean grey
        bg = background(out["camera_x"].double(), torch.tensor([s.bg_phase for s in specs], dtype=torch.float64),
                        res)[:, :, None]
        out["video"] = (out["video"] - bg + 0.88).clamp(0, 1)
    return out


# ---------------------------------------------------------------------------------------------- models
def make_tokenizer(folder: Path, max_tokens: int = MAX_TOKENS):
    from studio.teachers.offline_tokenizer import make_clip_tokenizer

    words = {"a", "an", "the", "camera", "static", "video", "of"}
    for p in video_prompts(full=True):
        words.update(p.replace(",", " ").split())
    return make_clip_tokenizer(folder, sorted(words), max_tokens)


def build_text_encoder(tokenizer, seed: int, max_tokens: int = MAX_TOKENS):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_unet2d(res: int, width: int, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=res, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, use_linear_projection=True)


def inflate(unet2d, frames: int, seed: int):
    """``UNetMotionModel.from_unet2d`` with a fresh ``MotionAdapter``; motion-module outputs zeroed."""
    from diffusers import MotionAdapter, UNetMotionModel

    torch.manual_seed(seed)
    ch = tuple(unet2d.config.block_out_channels)
    adapter = MotionAdapter(block_out_channels=ch, motion_layers_per_block=unet2d.config.layers_per_block,
                            motion_num_attention_heads=4, motion_norm_num_groups=16,
                            motion_max_seq_length=max(32, frames), use_motion_mid_block=True)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    for name, mod in unet.named_modules():
        if "motion_modules" in name and name.endswith("proj_out") and isinstance(mod, torch.nn.Linear):
            torch.nn.init.zeros_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    return unet


def inflate_3d(spatial, seed: int):
    """A ModelScope-class ``UNet3DConditionModel`` carrying ``spatial``'s 2-D weights (a ``UNet2DConditionModel``
    image stage, or the spatial layers of a ``UNetMotionModel`` / ``UNet3DConditionModel``); the temporal layers
    (``transformer_in``, ``temp_convs``, ``temp_attentions``) fresh, their outputs zeroed (the temporal convolutions
    zero their last layer by construction; the temporal transformers' ``proj_out`` is zeroed here), so the model
    starts as the image model applied frame by frame.

    Why this class (issue 16): the temporal convolutions (kernel 3 over frames, zero-padded) are order-aware in the
    *values* they pass on, so a text-derived feature can be turned into a direction of motion by a convolution;
    AnimateDiff's motion modules see frame order only through positions added to the attention input.
    The spatial names are the same in the three classes (``down_blocks.i.resnets / attentions / downsamplers``,
    ``mid_block``, ``up_blocks``, ``conv_in / conv_out``, ``time_embedding``), so the weights map by name; a
    missing or unexpected spatial key raises.
    """
    from diffusers import UNet3DConditionModel

    c = spatial.config
    n = len(c.block_out_channels)
    attn_ch = set(c.block_out_channels[1:])  # the cross-attention blocks (the first block has none)
    if spatial.__class__.__name__ == "UNet3DConditionModel":
        head_dim = c.attention_head_dim
    else:
        # UNet3DConditionModel builds its attention as (channels // attention_head_dim) heads of attention_head_dim
        # (the positional order of Transformer2DModel's arguments), the 2-D classes as attention_head_dim heads
        heads = c.get("num_attention_heads") or c.get("attention_head_dim")
        if len(attn_ch) != 1 or next(iter(attn_ch)) % heads:
            raise ValueError(f"inflate_3d: the attention blocks' channels {sorted(attn_ch)} must be one number "
                             f"divisible by the {heads} heads to keep the same heads in a UNet3DConditionModel")
        head_dim = next(iter(attn_ch)) // heads
    torch.manual_seed(seed)
    net = UNet3DConditionModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        layers_per_block=c.layers_per_block, block_out_channels=tuple(c.block_out_channels),
        down_block_types=("DownBlock3D",) + ("CrossAttnDownBlock3D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock3D",) * (n - 1) + ("UpBlock3D",),
        cross_attention_dim=c.cross_attention_dim, attention_head_dim=head_dim, norm_num_groups=c.norm_num_groups)
    temporal = ("temp_convs", "temp_attentions", "transformer_in")
    sd = {k: v for k, v in spatial.state_dict().items()
          if "motion_modules" not in k and not any(t in k for t in temporal)}
    res = net.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not any(t in k for t in temporal)]
    if missing or res.unexpected_keys:
        raise ValueError(f"inflate_3d: spatial weights do not map: missing {missing[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    for name, mod in net.named_modules():
        if (name.endswith("proj_out") and ("temp_attentions" in name or name.startswith("transformer_in"))
                and isinstance(mod, torch.nn.Linear)):
            torch.nn.init.zeros_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    return net


def inflate_svd(spatial, frames: int, seed: int):
    """A ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion's class) carrying ``spatial``'s 2-D weights,
    used as a *text*-to-video model: its temporal transformer blocks cross-attend to the prompt with queries that
    carry the frame's position (``time_pos_embed``), the one diffusers UNet class where a word and a frame index
    meet in one bilinear attention logit. Measured need (issue 16): in AnimateDiff's and ModelScope's classes the
    prompt reaches the temporal layers only as a frame-independent feature, and neither learned "left" vs "right"
    (the loss with the direction word swapped equals the loss with the right word) although knowing the direction
    lowers the Bayes error by 9-16 % at noise 0.8-0.9.

    Mapping: ``resnets.j.*`` -> ``resnets.j.spatial_res_block.*``; attentions, samplers, ``conv_in / out`` and the
    time embedding by name. New parts start as the identity: the temporal resnets' ``conv2``, the temporal
    transformer blocks' output layers (``ff_in``, both attentions, ``ff``) and ``time_pos_embed.linear_2`` zeroed,
    so the model starts as the image model frame by frame. SVD's ``added_time_ids`` (fps, motion bucket, noise
    augmentation) have no meaning here: ``add_embedding.linear_2`` is zeroed and frozen and the ids are zeros.
    This use of the class (text context, 3-channel pixel input, no image latent) is the studio's choice, not SVD's.
    """
    from diffusers import UNetSpatioTemporalConditionModel

    c = spatial.config
    n = len(c.block_out_channels)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim")
    torch.manual_seed(seed)
    net = UNetSpatioTemporalConditionModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        down_block_types=("DownBlockSpatioTemporal",) + ("CrossAttnDownBlockSpatioTemporal",) * (n - 1),
        up_block_types=("CrossAttnUpBlockSpatioTemporal",) * (n - 1) + ("UpBlockSpatioTemporal",),
        block_out_channels=tuple(c.block_out_channels), addition_time_embed_dim=c.block_out_channels[0],
        projection_class_embeddings_input_dim=3 * c.block_out_channels[0], layers_per_block=c.layers_per_block,
        cross_attention_dim=c.cross_attention_dim, num_attention_heads=(heads,) * n, num_frames=frames)
    sd = {}
    for k, v in spatial.state_dict().items():
        if "motion_modules" in k or any(t in k for t in ("temp_convs", "temp_attentions", "transformer_in")):
            continue
        parts = k.split(".")
        if "resnets" in parts:
            i = parts.index("resnets") + 2
            parts.insert(i, "spatial_res_block")
        sd[".".join(parts)] = v
    res = net.load_state_dict(sd, strict=False)
    new_parts = ("temporal_res_block", "time_mixer", "temporal_transformer_blocks", "time_pos_embed", "add_embedding")
    missing = [k for k in res.missing_keys if not any(t in k for t in new_parts)]
    if missing or res.unexpected_keys:
        raise ValueError(f"inflate_svd: spatial weights do not map: missing {missing[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    zero = ("temporal_res_block.conv2", "ff_in.net.2", "attn1.to_out.0", "attn2.to_out.0", "ff.net.2",
            "time_pos_embed.linear_2", "add_embedding.linear_2")
    for name, mod in net.named_modules():
        if any(name.endswith(z) for z in zero) and ("temporal" in name or "time_pos" in name or "add_emb" in name):
            torch.nn.init.zeros_(mod.weight)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
    net.add_embedding.requires_grad_(False)
    return net


def denoise(net, x, t, ctx):
    """One call of any of the three video classes on ``x [B,C,F,H,W]`` with the per-clip context ``ctx [B,L,D]``."""
    kind = type(net).__name__
    if kind == "UNetMotionModel":  # frames folded into the batch: one context per frame
        return net(x, t, encoder_hidden_states=ctx.repeat_interleave(x.shape[2], dim=0), return_dict=False)[0]
    if kind == "UNetSpatioTemporalConditionModel":  # [B,F,C,H,W]; text-to-video: no added time ids
        ids = torch.zeros(x.shape[0], 3, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() else t.repeat(x.shape[0])
        out = net(x.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=ctx, added_time_ids=ids, return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)
    return net(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


def folds_frames(net) -> bool:
    """``UNetMotionModel`` takes one text context per frame; ``UNet3DConditionModel`` repeats it itself."""
    return type(net).__name__ == "UNetMotionModel"


def encode_text(text_encoder, tokenizer, texts: list[str]):
    """The AnimateDiff teacher's rule (``DiffusersTeacher._embed_texts``): ids padded to ``model_max_length``."""
    ids = tokenizer(texts, padding="max_length", max_length=int(tokenizer.model_max_length), truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


class TextAttributeHeads(torch.nn.Module):
    """``--text-aux``: cosine heads reading a prompt's shape, colour, motion and camera words back from the text
    context the UNet sees (the encoder's last hidden state, averaged over tokens and normalised; logits = 10 x
    cosine, so a word is read back only if its contexts differ in *direction*, not by a tiny offset a large head
    weight could amplify), trained with the diffusion loss (cross-entropy on prompts drawn from the full set).

    Why (issue 16, measured): trained by the diffusion loss alone, the tiny text encoder collapses the words a
    single frame cannot show -- after the image stage "moving up" and "moving down" are 1.1 apart in its output
    (a random encoder: 8.6; shape / colour words: 18-27), and the motion stage does not separate them again (the
    video model ignores a difference it cannot see, so no gradient grows it). Real video models sit on text
    encoders pretrained on text (CLIP, T5) that keep every word distinct; these heads are the tiny stand-in for
    that pretraining (a reconstructed choice, not from a paper). Training-only: the heads are not saved.
    """

    def __init__(self, dim: int = 64):
        from studio.world.clips import CAMERAS, COLORS, MOTIONS, SHAPES

        super().__init__()
        self.vocab = {"shape": list(SHAPES), "color": list(COLORS), "motion": list(MOTIONS), "camera": list(CAMERAS)}
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v), bias=False) for k, v in self.vocab.items()})
        self.scale = 10.0

    def loss(self, text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
        from studio.world.clips import parse_video_prompt

        pooled = torch.nn.functional.normalize(encode_text(text_encoder, tokenizer, prompts).mean(1), dim=-1)
        words = [parse_video_prompt(p) for p in prompts]
        total = pooled.new_zeros(())
        for j, (k, vocab) in enumerate(self.vocab.items()):
            target = torch.tensor([vocab.index(w[j]) for w in words])
            w = torch.nn.functional.normalize(self.heads[k].weight, dim=-1)
            total = total + torch.nn.functional.cross_entropy(self.scale * pooled @ w.T, target)
        return total


class FixedText(torch.nn.Module):
    """Ablation: a learned ``[L, 64]`` context per prompt (index 0 = the empty prompt)."""

    def __init__(self, prompts: list[str], length: int = 4):
        super().__init__()
        self.index = {"": 0, **{p: i + 1 for i, p in enumerate(prompts)}}
        self.table = torch.nn.Parameter(torch.randn(len(self.index), length, 64) * 0.5)

    def forward(self, texts: list[str]):
        return self.table[torch.tensor([self.index[t] for t in texts])]


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(net, text_fn, prompts: list[str], shape: tuple, steps: int, cfg: float, seed: int, *, video: bool):
    """Flow Euler from pure noise with CFG; ``shape`` = per-sample ``(3, H, W)`` or ``(3, F, H, W)``."""
    gen = torch.Generator().manual_seed(seed)
    B = len(prompts)
    x = torch.randn((B, *shape), generator=gen)
    cond, unc = text_fn(prompts), text_fn([""] * B)
    ctx = torch.cat([cond, unc])
    sig = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        s = sig[i]
        t = torch.full((2 * B,), float(s) * 1000)
        v = (denoise(net, torch.cat([x, x]), t, ctx) if video else
             net(torch.cat([x, x]), t, encoder_hidden_states=ctx, return_dict=False)[0])
        vc, vu = v.chunk(2)
        x = x + (sig[i + 1] - s) * (vu + cfg * (vc - vu))
    return ((x + 1) / 2).clamp(0, 1)


SWAP = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swap_direction(prompt: str) -> str:
    """The prompt with its direction of motion reversed (left <-> right, up <-> down; camera words kept)."""
    words = prompt.split(" ")
    i = words.index("moving") if "moving" in words else -1
    if i >= 0 and i + 1 < len(words) and words[i + 1].rstrip(",") in SWAP:
        w = words[i + 1]
        words[i + 1] = SWAP[w.rstrip(",")] + ("," if w.endswith(",") else "")
    return " ".join(words)


@torch.no_grad()
def direction_gap(net, text_fn, prompts: list[str], frames: int, res: int, n: int = 48, seed: int = 99,
                  levels=(0.85, 0.9)) -> dict:
    """Does the model read the direction word? The flow loss on clips of the directional prompts among
    ``prompts`` with the caption's direction swapped minus the loss with the right caption, same clips and
    noise, per noise level. 0 = the word is ignored (time-reversal pairs at chance); for the red-ball clips the
    Bayes-optimal denoiser's velocity loss gains 0.0064 / 0.0056 at s = 0.85 / 0.9 from knowing it
    (``docs/notes/issue16_readouts/bayes_direction_gap.py``)."""
    directional = [p for p in prompts if swap_direction(p) != p]
    if not directional:
        return {}
    ps = [directional[i % len(directional)] for i in range(n)]
    x0 = make_clips(ps, seed, frames, res)["video"].permute(0, 2, 1, 3, 4) * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    right, swapped = text_fn(ps), text_fn([swap_direction(p) for p in ps])
    out = {}
    for s in levels:
        x_s = (1 - s) * x0 + s * eps
        t = torch.full((n,), s * 1000.0)
        err = [(denoise(net, x_s, t, c) - (eps - x0)).square().mean().item() for c in (right, swapped)]
        out[str(s)] = round(err[1] - err[0], 5)
    return out


def readout(net, text_fn, prompts: list[str], args, seed: int, cfgs=(1.0, 2.0, 4.0), steps: int = 25) -> dict:
    from studio.world.video_metrics import evaluate_videos

    video = args.stage == "motion"
    shape = (3, args.frames, args.res, args.res) if video else (3, args.res, args.res)
    out = {}
    net.eval()
    for cfg in cfgs:
        x = sample(net, text_fn, prompts, shape, steps, cfg, seed, video=video)
        clips = x.permute(0, 2, 1, 3, 4) if video else x[:, None].expand(-1, args.frames, -1, -1, -1)
        m = evaluate_videos(clips.contiguous(), prompts)
        keys = ("shape_accuracy", "color_accuracy") if not video else (
            "motion_accuracy", "object_motion_accuracy", "shape_accuracy", "color_accuracy", "object_accuracy",
            "motion_class_accuracy", "frame_error_vs_floor", "still_fraction", "diversity_ratio")
        out[str(cfg)] = {k: round(float(m[k]), 3) for k in keys}
        if cfg == cfgs[-1]:
            out["_last"] = clips
    if video:
        out["direction_gap"] = direction_gap(net, text_fn, sorted(set(prompts)), args.frames, args.res)
    net.train()
    return out


# ---------------------------------------------------------------------------------------------- saving
def save_folder(out: Path, net, text_encoder, tokenizer, info: dict, args, samples=None) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    import diffusers

    def write(tmp: Path) -> None:
        net.save_pretrained(tmp / "unet")
        text_encoder.save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(tmp / "scheduler")
        pipeline = "AnimateDiffPipeline" if folds_frames(net) or net.__class__.__name__ == "UNet2DConditionModel" \
            else "TextToVideoSDPipeline"
        index = {
            "_class_name": pipeline, "_diffusers_version": diffusers.__version__,
            "_studio": {"num_frames": args.frames, "resolution": args.res, "frame_rate": FRAME_RATE,
                        "note": "pixel-space (no vae): the UNet denoises video*2-1; rectified flow, velocity output"},
            "unet": ["diffusers", type(net).__name__],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "vae": [None, None],
        }
        if pipeline == "AnimateDiffPipeline":
            index.update({"motion_adapter": [None, None], "feature_extractor": [None, None]})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        if samples is not None:
            save_grid(samples.flatten(0, 1), tmp / "samples.png", ncol=samples.shape[1], scale=4)

    write_folder_atomically(out, write)


def param_groups(net, text_mod, stage: str, spatial_scale: float, xattn_scale: float | None = None):
    """Optimizer groups ``[{"params", "scale"}]`` (lr = ``--lr * scale``) and the motion-module parameters.

    Motion stage: three rates. The motion modules (temporal self-attention, no text input) can learn a prompt's
    motion only from what the spatial layers pass them; the image stage never needed the motion words (one
    frame cannot show them), so the text path to the motion modules -- the spatial cross-attention (``attn2``)
    and the text encoder -- gets its own rate ``xattn_scale`` (default: ``spatial_scale``). AnimateDiff freezes
    it; here that leaves the motion modules blind to the motion words (measured, docs/notes/issue16.md). A
    group at scale 0 is frozen (``requires_grad`` off). Image stage: one group, everything at scale 1.
    """
    motion_p, xattn_p, spatial_p = [], [], []
    for name, p in net.named_parameters():
        if stage == "motion" and any(t in name for t in TEMPORAL):
            motion_p.append(p)
        elif stage == "motion" and ".attn2." in name:
            xattn_p.append(p)
        else:
            spatial_p.append(p)
    if stage == "motion":
        xattn_p += list(text_mod.parameters())
        scale, xscale = spatial_scale, (spatial_scale if xattn_scale is None else xattn_scale)
    else:
        spatial_p += list(text_mod.parameters())
        scale = xscale = 1.0
    groups = []
    for group, sc in ((motion_p, 1.0), (xattn_p, xscale), (spatial_p, scale)):
        if not group:
            continue
        if sc > 0:
            groups.append({"params": group, "scale": sc})
        else:
            for p in group:
                p.requires_grad_(False)
    return groups, motion_p


# ---------------------------------------------------------------------------------------------- training
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("image", "motion"), required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--arch", choices=("animatediff", "modelscope", "svd"), default="animatediff",
                    help="motion stage: the video class the image stage is inflated into: AnimateDiff's "
                         "UNetMotionModel (+ MotionAdapter) or ModelScope's UNet3DConditionModel (temporal "
                         "convolutions + temporal attention); an AnimateDiff folder's spatial layers can seed a "
                         "ModelScope run")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="image stage: continue; motion stage: an image-stage folder (inflated) or a motion folder")
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32, help="images (image stage) or clips (motion stage) per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--spatial-lr-scale", type=float, default=0.1,
                    help="motion stage: lr of the spatial layers and text encoder relative to --lr (0 = frozen)")
    ap.add_argument("--xattn-lr-scale", type=float, default=None,
                    help="motion stage: lr of the spatial cross-attention (attn2) and the text encoder relative to "
                         "--lr (default: --spatial-lr-scale; 0 = frozen)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-empty", type=float, default=0.1)
    ap.add_argument("--s-mean", type=float, default=0.0, help="mean of the logit-normal noise-level density")
    ap.add_argument("--prompts", choices=("one", "signs", "pair", "static", "static-full", "default", "full"), default="static")
    ap.add_argument("--background", choices=("stripes", "plain"), default="stripes")
    ap.add_argument("--radius-scale", type=float, default=1.0)
    ap.add_argument("--text", choices=("clip", "fixed"), default="clip")
    ap.add_argument("--text-aux", type=float, default=0.0,
                    help="weight of the text encoder's word read-back loss (TextAttributeHeads; 0 = off): keeps the "
                         "motion words distinct in the text encoder's output")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-prompts", type=int, default=2, help="samples per prompt in a read-out")
    ap.add_argument("--eval-cfg", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    ap.add_argument("--eval-steps", type=int, default=25, help="Euler steps of a read-out")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this wall time")
    ap.add_argument("--log", type=Path, default=None, help="append read-outs here (JSON lines)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = make_tokenizer(Path(tempfile.mkdtemp(prefix="swvu_tok_")))
    text_encoder = build_text_encoder(tokenizer, args.seed)
    history: list = []
    init = args.init_from
    if args.stage == "image":
        from diffusers import UNet2DConditionModel

        if init is not None:
            net = UNet2DConditionModel.from_pretrained(str(init / "unet"))
        else:
            net = build_unet2d(args.res, args.width, args.seed)
    else:
        from diffusers import UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

        if init is None:
            raise SystemExit("--stage motion needs --init-from (an image-stage folder, or a motion folder)")
        kind = json.loads((init / "unet" / "config.json").read_text())["_class_name"]
        from diffusers import UNetSpatioTemporalConditionModel

        cls = {"UNetMotionModel": UNetMotionModel, "UNet3DConditionModel": UNet3DConditionModel,
               "UNetSpatioTemporalConditionModel": UNetSpatioTemporalConditionModel}.get(kind, UNet2DConditionModel)
        src_net = cls.from_pretrained(str(init / "unet"))
        want = {"animatediff": "UNetMotionModel", "modelscope": "UNet3DConditionModel",
                "svd": "UNetSpatioTemporalConditionModel"}[args.arch]
        if kind == want:
            net = src_net  # continue
            if args.arch == "svd":
                net.add_embedding.requires_grad_(False)
        elif args.arch == "svd":
            net = inflate_svd(src_net, args.frames, args.seed)
        elif args.arch == "modelscope":
            net = inflate_3d(src_net, args.seed)  # an image stage, or an AnimateDiff run's spatial layers
        elif kind == "UNet2DConditionModel":
            net = inflate(src_net, args.frames, args.seed)
        else:
            raise SystemExit(f"--arch animatediff needs an image-stage or UNetMotionModel folder, got a {kind}")
    if init is not None:
        text_encoder = CLIPTextModel.from_pretrained(str(init / "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(str(init / "tokenizer"))
        if (init / "training.json").is_file():
            history = json.loads((init / "training.json").read_text()).get("rounds", [])
    prompts = prompt_set(args.prompts)
    fixed = FixedText(prompts) if args.text == "fixed" else None
    text_mod = fixed if fixed is not None else text_encoder
    text_fn = (lambda t: fixed(t)) if fixed is not None else (lambda t: encode_text(text_encoder, tokenizer, t))

    groups, motion_p = param_groups(net, text_mod, args.stage, args.spatial_lr_scale, args.xattn_lr_scale)
    aux = None
    if args.text_aux > 0:
        if fixed is not None or not any(p.requires_grad for p in text_encoder.parameters()):
            raise SystemExit("--text-aux needs a trainable CLIP text encoder (--text clip, text path not frozen)")
        aux = TextAttributeHeads(text_encoder.config.hidden_size)
        groups.append({"params": list(aux.parameters()), "scale": 1.0})
        aux_prompts = video_prompts(full=True)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA([net, text_mod], args.ema)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{args.stage}: {type(net).__name__} {n_params / 1e6:.2f} M params, motion {sum(p.numel() for p in motion_p) / 1e6:.2f} M, "
          f"{len(prompts)} prompts", file=sys.stderr, flush=True)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    eval_base = prompts if args.prompts in ("one", "signs", "pair") else prompt_set("static")  # read-outs: the 21 static prompts
    eval_prompts = [p for p in eval_base for _ in range(args.eval_prompts)]
    if len(eval_prompts) < 8:
        eval_prompts = [p for p in prompts for _ in range(8)]
    gen = torch.Generator().manual_seed(args.seed + 17)
    readouts, losses, aux_losses, t0 = [], [], [], time.time()

    def do_readout(step: int) -> dict:
        te = time.time()
        ema.swap()
        r = readout(net, text_fn, eval_prompts, args, seed=1234, cfgs=tuple(args.eval_cfg), steps=args.eval_steps)
        ema.swap()
        clips = r.pop("_last")
        row = {"tag": args.tag, "stage": args.stage, "step": step, "train_minutes": round((te - t0) / 60, 2),
               "loss_last50": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5), "readout": r,
               "config": {k: str(v) for k, v in vars(args).items() if k not in ("log", "out")}}
        readouts.append(row)
        print(json.dumps({k: row[k] for k in ("tag", "step", "train_minutes", "loss_last50", "readout")}),
              file=sys.stderr, flush=True)
        if args.log is not None:
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        t_eval[0] += time.time() - te
        return clips

    t_eval = [0.0]
    clips_last = None
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
        idx = torch.randint(len(prompts), (args.batch,), generator=gen).tolist()
        bp = [prompts[i] for i in idx]
        frames = args.frames
        clips = make_clips(bp, args.seed * 1_000_003 + step, frames, args.res, plain=args.background == "plain",
                           radius_scale=args.radius_scale)["video"]  # [B,F,3,H,W]
        if args.stage == "image":
            pick = torch.randint(frames, (args.batch,), generator=gen)
            x0 = clips[torch.arange(args.batch), pick] * 2 - 1                 # [B,3,H,W]
        else:
            x0 = clips.permute(0, 2, 1, 3, 4) * 2 - 1                          # [B,3,F,H,W]
        drop = torch.rand(args.batch, generator=gen) < args.p_empty
        captions = ["" if d else p for d, p in zip(drop.tolist(), bp)]
        s = torch.sigmoid(args.s_mean + torch.randn(args.batch, generator=gen)).clamp(1e-3, 1.0)
        eps = torch.randn(x0.shape, generator=gen)
        sv = s.view(-1, *([1] * (x0.dim() - 1)))
        x_s = (1 - sv) * x0 + sv * eps
        ctx = text_fn(captions)
        v = (denoise(net, x_s, s * 1000, ctx) if args.stage == "motion" else
             net(x_s, s * 1000, encoder_hidden_states=ctx, return_dict=False)[0])
        loss = (v - (eps - x0)).square().mean()
        total = loss
        if aux is not None:
            pick_aux = torch.randint(len(aux_prompts), (64,), generator=gen).tolist()
            aux_loss = aux.loss(text_encoder, tokenizer, [aux_prompts[i] for i in pick_aux])
            total = loss + args.text_aux * aux_loss
            aux_losses.append(aux_loss.item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            el = time.time() - t0 - t_eval[0]
            aux_txt = f" text-aux {sum(aux_losses[-25:]) / 25:.3f}" if aux_losses else ""
            print(f"[{args.tag}] step {step + 1}/{args.steps} loss {sum(losses[-25:]) / 25:.4f}{aux_txt} "
                  f"{el / (step + 1):.2f}s/step", file=sys.stderr, flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            clips_last = do_readout(step + 1)
        if args.save_every and args.out and (step + 1) % args.save_every == 0 and fixed is None:
            ema.swap()
            save_folder(args.out.parent / f"{args.out.name}.partial", net, text_encoder, tokenizer,
                        {"partial_step": step + 1, "rounds": history}, args)
            ema.swap()
        if args.max_minutes and (time.time() - t0) / 60 > args.max_minutes:
            print(f"[{args.tag}] stopping at step {step + 1}: --max-minutes {args.max_minutes}", file=sys.stderr)
            break
    steps_done = step + 1
    wall = time.time() - t0
    clips_last = do_readout(steps_done)
    ema.copy_to()
    curve = [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 5) for i in range(0, len(losses), 50)]
    rnd = {"stage": args.stage, "args": {k: str(v) for k, v in vars(args).items()}, "steps_done": steps_done,
           "wall_seconds": round(wall, 1), "loss_every_50": curve, "readouts": readouts,
           "command": " ".join(["python", "scripts/train_shapeworld_video_unet.py"]
                               + (sys.argv[1:] if argv is None else list(argv)))}
    if args.out is not None and fixed is None:
        info = {"model": "shapeworld-video-unet", "num_frames": args.frames, "resolution": args.res,
                "rounds": history + [rnd]}
        save_folder(args.out, net, text_encoder, tokenizer, info, args, samples=clips_last[:: max(1, len(clips_last) // 12)][:12])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
