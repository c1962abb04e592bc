"""Video reward models behind one protocol (Stream-R1's VideoReward role; spec ``video_methods.md`` 3.2-3.3).

A :class:`RewardModel` scores pixel videos ``[B,F,3,H,W]`` in [0, 1] against prompts on three axes,
:data:`AXES` = ``("vq", "mq", "ta")`` (visual quality, motion quality, text alignment):

* :meth:`RewardModel.logits` -- raw per-axis scores ``[B,3]``, differentiable w.r.t. the pixels;
* :meth:`RewardModel.scores` -- z-normalised with the means / stds of the model's **own config**
  (``config["use_norm"]`` and ``VQ_mean`` / ``VQ_std`` / ``MQ_mean`` / ... as VideoReward stores them;
  :func:`norm_stats` finds them at any nesting depth of a config dict);
* :meth:`RewardModel.saliency` -- ``[B,3,F,H,W]``: per axis, the L2 norm over RGB of
  ``d logit_m / d pixel`` (samples are independent, so one backward per axis serves the batch), detached.
  Stream-R1 takes the gradient w.r.t. the Qwen2-VL processor's patches and averages per patch cell; a
  model whose preprocessing is differentiable from the pixels gives the same information at pixel
  resolution (resize onto the latent grid with ``studio.distill.reward_weighting.saliency_to_latent_grid``).

The reward is frozen: its parameters never require grad and it stays in eval mode. Scores are *used as
numbers* by the weighting (no gradient path into a generator; the weighting detaches them).

Implementations:

* :class:`ShapeWorldReward` -- the embedded default: soft, differentiable versions of the ShapeWorld
  ground-truth checks (``studio.world.video_metrics``), no learned weights. With the chroma-based object
  maps of :meth:`ShapeWorldReward.object_maps` (the ShapeWorld background is achromatic):

  - ``vq``: ``log`` of (object present: mass fraction in every frame between ~1 % and ~30 %) x (edges
    sharp: ``sum |grad m|^2 / sum |grad m|``, the mean edge steepness, high for crisp antialiased edges and
    low for blurred ones) x (temporally stable: frame-to-frame change of object mass and mean colour small);
  - ``mq``: ``log`` of the prompted motion read from the ``m``-weighted centroid trajectory (directional
    motions: least-squares displacement along the prompt's direction beyond ~0.06 of the frame and little
    drift across it; ``speeding up``: rightward and a faster second half; ``bouncing``: both up- and
    downward travel; ``rotating``: centroid still and the shape's angular moment turning) x smooth
    trajectory (small second differences, except for ``bouncing``). The camera is not estimated: a
    panning camera's expected screen shift (0.12 of the frame over the clip, the middle of ShapeWorld's
    range) is added back to the object's x;
  - ``ta``: ``log`` of ``p(colour) p(shape)``: softmax over the palette of the cosine between the object's
    mean-removed mean colour and each palette entry's, and softmax over shapes from the solid map's
    3- and 4-fold angular-moment ratios ``nu_3``, ``nu_4``.

  Its config holds z-statistics calibrated by :func:`calibrate_shapeworld_reward` (a fixed mixture of
  right, wrong-prompt, still and blurred ShapeWorld clips).
* :class:`VideoAlignReward` -- the real VideoReward / VideoAlign class (Qwen2-VL + a reward head on the
  hidden states of the special tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``), loaded by
  path (see its doc).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..world.clips import COLORS, MOTIONS, SHAPES, check_video, parse_video_prompt

AXES: tuple[str, ...] = ("vq", "mq", "ta")
_CONFIG_KEYS = ("VQ", "MQ", "TA")


def norm_stats(config: Mapping) -> tuple[Tensor, Tensor] | None:
    """``(mean [3], std [3])`` from ``VQ_mean``, ``VQ_std``, ``MQ_mean``, ... anywhere in ``config`` (the
    first dict that has all six), or ``None``."""
    if not isinstance(config, Mapping):
        return None
    keys = [f"{a}_{s}" for a in _CONFIG_KEYS for s in ("mean", "std")]
    if all(k in config for k in keys):
        mean = torch.tensor([float(config[f"{a}_mean"]) for a in _CONFIG_KEYS], dtype=torch.float64)
        std = torch.tensor([float(config[f"{a}_std"]) for a in _CONFIG_KEYS], dtype=torch.float64)
        if (std <= 0).any():
            raise ValueError(f"reward config has non-positive stds {std.tolist()}")
        return mean, std
    for v in config.values():
        found = norm_stats(v) if isinstance(v, Mapping) else None
        if found is not None:
            return found
    return None


class RewardModel(torch.nn.Module):
    """The reward protocol (see the module doc). Subclasses implement :meth:`logits`."""

    axes = AXES
    name = "reward"

    def __init__(self, config: Mapping | None = None):
        super().__init__()
        self.config: dict = dict(config or {})

    # frozen
    def train(self, mode: bool = True) -> "RewardModel":
        return super().train(False)

    def freeze(self) -> "RewardModel":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def logits(self, videos: Tensor, prompts: str | Sequence[str]) -> Tensor:
        raise NotImplementedError

    def _prompts(self, prompts: str | Sequence[str], B: int) -> list[str]:
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        if len(prompts) != B:
            raise UserError(f"{self.name}: got {len(prompts)} prompts for {B} videos; pass one per video")
        return prompts

    def normalize(self, logits: Tensor) -> Tensor:
        """z-scores with the config's statistics when ``use_norm`` (default true if statistics exist)."""
        stats = norm_stats(self.config)
        if stats is None or not self.config.get("use_norm", True):
            return logits
        mean, std = (s.to(logits.device, logits.dtype) for s in stats)
        return (logits - mean) / std

    def scores(self, videos: Tensor, prompts: str | Sequence[str]) -> Tensor:
        """z-normalised per-axis scores ``[B,3]`` (differentiable w.r.t. ``videos``)."""
        return self.normalize(self.logits(videos, prompts))

    def forward(self, videos: Tensor, prompts: str | Sequence[str]) -> Tensor:
        return self.scores(videos, prompts)

    def saliency(self, videos: Tensor, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(scores [B,3], saliency [B,3,F,H,W])``, both detached: the per-pixel L2 norm over RGB of each
        axis' logit gradient w.r.t. the pixels."""
        v = check_video(videos).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            raw = self.logits(v, prompts)
            maps = []
            for m in range(raw.shape[-1]):
                (g,) = torch.autograd.grad(raw[:, m].sum(), v, retain_graph=m < raw.shape[-1] - 1)
                maps.append(g.norm(dim=2))
        return self.normalize(raw.detach()), torch.stack(maps, 1).detach()


# ------------------------------------------------------------------------------------------ ShapeWorld
_PALETTE = torch.tensor([COLORS[c] for c in COLORS], dtype=torch.float64)
_DIRS = {"moving left": (-1.0, 0.0), "moving right": (1.0, 0.0), "moving up": (0.0, -1.0),
         "moving down": (0.0, 1.0), "speeding up": (1.0, 0.0)}
_CAM_SHIFT = 0.12
_EPS = 1e-6

#: z-statistics of :class:`ShapeWorldReward` (``calibrate_shapeworld_reward()`` reproduces them)
SHAPEWORLD_REWARD_CONFIG: dict = {
    "use_norm": True,
    "VQ_mean": -1.8732, "VQ_std": 3.1617, "MQ_mean": -2.3624, "MQ_std": 4.0045, "TA_mean": -2.0919, "TA_std": 4.2664,
}


def _sig(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _moments(mp: Tensor, xs: Tensor, ys: Tensor):
    """Centroid ``cx, cy [B,F]`` (frame units, y down) of the map ``mp [B,F,H,W]`` and, about it (pixels,
    y up), ``(Re z^k, Im z^k, |z|^k)`` for k = 2, 3, 4."""
    H, W = mp.shape[-2:]
    mass = mp.sum((-2, -1)).clamp_min(_EPS)
    cx = (mp * xs).sum((-2, -1)) / mass
    cy = (mp * ys[:, None]).sum((-2, -1)) / mass
    dx = (xs - cx[..., None, None]) * W
    dy = -(ys[:, None] - cy[..., None, None]) * H
    r2 = dx * dx + dy * dy
    re2, im2 = dx * dx - dy * dy, 2 * dx * dy
    re3, im3 = re2 * dx - im2 * dy, re2 * dy + im2 * dx
    re4, im4 = re2 * re2 - im2 * im2, 2 * re2 * im2
    return cx, cy, [(re2, im2, r2), (re3, im3, r2 * r2.sqrt()), (re4, im4, r2 * r2)]


class ShapeWorldReward(RewardModel):
    """Differentiable soft ShapeWorld reward (see the module doc); no parameters."""

    name = "shapeworld-reward"

    def __init__(self, config: Mapping | None = None):
        super().__init__(SHAPEWORLD_REWARD_CONFIG if config is None else config)

    @staticmethod
    def object_maps(v: Tensor) -> tuple[Tensor, Tensor]:
        """Coverage map ``o`` and solid map ``m`` ``[B,F,H,W]`` from the chroma ``c = max RGB - min RGB``
        relative to the frame's largest chroma ``c_ref`` (at least 0.2), as ``studio.world.video_metrics``
        reads clips: ``o = clamp((c - 0.1) / (c_ref - 0.1))`` (about 0.5 on the ball's stripe),
        ``m = clamp((c - 0.1) / (0.45 c_ref - 0.1))`` (stripe included)."""
        c = v.amax(2) - v.amin(2)
        cref = c.flatten(2).amax(-1).clamp_min(0.2)[..., None, None]
        o = ((c - 0.1) / (cref - 0.1)).clamp(0, 1)
        m = ((c - 0.1) / (0.45 * cref - 0.1)).clamp(0, 1)
        return o, m

    def components(self, videos: Tensor, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        """Every soft check in [0, 1], ``[B]`` each (differentiable w.r.t. ``videos``)."""
        v = check_video(videos)
        B, Fr, _, H, W = v.shape
        words = [parse_video_prompt(p) for p in self._prompts(prompts, B)]
        v = v.clamp(0, 1)
        o, m = self.object_maps(v)                                          # [B,F,H,W]
        mass = m.sum((-2, -1))                                              # [B,F]
        frac = mass / (H * W)
        present = (_sig((frac - 0.01) / 0.003) * _sig((0.3 - frac) / 0.03)).amin(1)
        # edge steepness
        gx = o[..., :, 1:] - o[..., :, :-1]
        gy = o[..., 1:, :] - o[..., :-1, :]
        g2 = (gx ** 2).sum((1, 2, 3)) + (gy ** 2).sum((1, 2, 3))
        g1 = (gx.abs()).sum((1, 2, 3)) + (gy.abs()).sum((1, 2, 3))
        steep = g2 / (g1 + _EPS)
        sharp = _sig((steep - 0.42) / 0.03)
        # colour and temporal stability
        msafe = mass.clamp_min(_EPS)
        col = (v * m[:, :, None]).sum((-2, -1)) / msafe[..., None]          # [B,F,3]
        if Fr > 1:
            dmass = ((mass[:, 1:] - mass[:, :-1]).abs() / msafe[:, :-1]).mean(1)
            dcol = (col[:, 1:] - col[:, :-1]).abs().mean((1, 2))
            stable = torch.exp(-(dmass / 0.3 + dcol / 0.1))
        else:
            stable = torch.ones(B, dtype=v.dtype, device=v.device)
        # text alignment: colour and shape
        mc = col.mean(1)
        pal = _PALETTE.to(v.device, v.dtype)
        cos = F.normalize(mc - mc.mean(-1, keepdim=True), dim=-1) @ F.normalize(pal - pal.mean(-1, keepdim=True), dim=-1).T
        p_col = torch.softmax(cos / 0.1, -1)
        xs = (torch.arange(W, dtype=v.dtype, device=v.device) + 0.5) / W
        ys = (torch.arange(H, dtype=v.dtype, device=v.device) + 0.5) / H
        cx, cy, zo = _moments(o, xs, ys)                                    # trajectory, rotation: o
        _, _, zm = _moments(m, xs, ys)                                      # shape: the solid map

        def nu(mp, z):
            re, im, rk = z
            a, b = (mp * re).sum((-2, -1)), (mp * im).sum((-2, -1))
            return torch.sqrt(a * a + b * b + _EPS) / (mp * rk).sum((-2, -1)).clamp_min(_EPS)

        nu3 = nu(m, zm[1]).mean(1)
        nu4 = nu(m, zm[2]).mean(1)
        shape_logits = torch.stack([(0.15 - torch.maximum(nu3, nu4)) / 0.04,       # ball
                                    (nu4 - 0.22) / 0.04 - torch.relu(nu3 - nu4) / 0.04,  # cube
                                    (nu3 - 0.3) / 0.04 - torch.relu(nu4 - nu3) / 0.04], -1)  # triangle
        p_shape = torch.softmax(shape_logits, -1)
        idx = torch.arange(B)
        color_ok = p_col[idx, torch.tensor([list(COLORS).index(w[1]) for w in words])]
        shape_ok = p_shape[idx, torch.tensor([SHAPES.index(w[0]) for w in words])]
        # motion
        cam = torch.tensor([{"static": 0.0, "panning left": -1.0, "panning right": 1.0}[w[3]] for w in words],
                           dtype=v.dtype, device=v.device)
        tau = torch.linspace(0, 1, Fr, dtype=v.dtype, device=v.device) if Fr > 1 else torch.zeros(1, dtype=v.dtype)
        wx = cx + cam[:, None] * _CAM_SHIFT * tau                                   # world x (expected pan)
        motion_ok = torch.stack([self._motion(wx[b], cy[b], o[b], [tuple(t[b] for t in z) for z in zo],
                                              words[b][0], words[b][2]) for b in range(B)])
        return {"present": present, "sharp": sharp, "stable": stable, "color": color_ok, "shape": shape_ok,
                "motion": motion_ok}

    @staticmethod
    def _motion(x: Tensor, y: Tensor, o: Tensor, z: list, shape: str, motion: str) -> Tensor:
        Fr = x.shape[0]
        if Fr < 2:
            return x.new_tensor(0.5)
        tau = torch.linspace(0, 1, Fr, dtype=x.dtype, device=x.device)
        tc = tau - tau.mean()

        def slope(s):  # least-squares displacement over the clip
            return (tc * (s - s.mean())).sum() / (tc * tc).sum()

        ddx, ddy = x[2:] - 2 * x[1:-1] + x[:-2], y[2:] - 2 * y[1:-1] + y[:-2]
        jerk = (ddx.abs() + ddy.abs()).mean() if Fr > 2 else x.new_tensor(0.0)
        smooth = torch.exp(-jerk / 0.02)
        if motion in _DIRS:
            ux, uy = _DIRS[motion]
            along = slope(x) * ux + slope(y) * uy
            across = slope(x) * uy - slope(y) * ux
            s = _sig((along - 0.08) / 0.015) * _sig((0.05 - across.abs()) / 0.015)
            if motion == "speeding up":
                h = Fr // 2
                d1, d2 = x[h] - x[0], x[-1] - x[h]
                s = s * _sig(((d2 - d1) / (d2.abs() + d1.abs() + _EPS) - 0.15) / 0.05)
            else:
                s = s * smooth
            return s
        if motion == "bouncing":
            dy = y[1:] - y[:-1]
            up, down = torch.relu(-dy).sum(), torch.relu(dy).sum()
            xr = x.amax() - x.amin()
            return _sig((torch.minimum(up, down) - 0.05) / 0.015) * _sig((0.05 - xr) / 0.015)
        if motion == "rotating":
            k = {"ball": 2, "cube": 4, "triangle": 3}[shape]
            re, im, _ = z[k - 2]
            a, b = (o * re).sum((-2, -1)), (o * im).sum((-2, -1))          # [F] complex moment
            cr = a[1:] * a[:-1] + b[1:] * b[:-1]
            ci = b[1:] * a[:-1] - a[1:] * b[:-1]
            step = torch.atan2(ci, cr) / k                                   # rotation per frame
            turn = step.sum().abs()
            dev = torch.sqrt((x - x.mean()) ** 2 + (y - y.mean()) ** 2 + _EPS).amax()
            return _sig((turn - 0.5) / 0.1) * _sig((0.03 - dev) / 0.008)
        raise UserError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")

    def logits(self, videos: Tensor, prompts: str | Sequence[str]) -> Tensor:
        c = self.components(videos, prompts)
        vq = torch.log(c["present"] * c["sharp"] * c["stable"] + _EPS)
        mq = torch.log(c["present"] * c["motion"] + _EPS)
        ta = torch.log(c["present"] * c["color"] * c["shape"] + _EPS)
        return torch.stack([vq, mq, ta], -1)


def calibrate_shapeworld_reward(n: int = 32, seed: int = 0, num_frames: int = 8, size: int = 32) -> dict:
    """z-statistics for :class:`ShapeWorldReward` from a fixed mixture: ``n`` right clips, the same clips
    with a wrong prompt (another colour / shape / motion), frozen (still) and blurred, static camera."""
    from ..world.clips import gaussian_blur, sample_clips, video_prompt, video_prompts

    gen = torch.Generator().manual_seed(seed)
    prompts = video_prompts(cameras=["static"])
    pick = [prompts[int(i)] for i in torch.randint(len(prompts), (n,), generator=gen)]
    clips = sample_clips(n, seed=seed, prompts=pick, num_frames=num_frames, size=size)
    v = clips["video"]
    wrong = []
    for i, p in enumerate(pick):
        s, c, mo, cam = parse_video_prompt(p)
        k = i % 3
        if k == 0:
            c = list(COLORS)[(list(COLORS).index(c) + 1) % len(COLORS)]
        elif k == 1:
            s = SHAPES[(SHAPES.index(s) + 1) % len(SHAPES)]
        else:
            mo = MOTIONS[(MOTIONS.index(mo) + 1) % len(MOTIONS)]
        wrong.append(video_prompt(s, c, mo, cam))
    still = v[:, :1].expand_as(v).contiguous()
    blurred = gaussian_blur(v.reshape(-1, *v.shape[-2:]), 1.5).reshape(v.shape)
    model = ShapeWorldReward(config={"use_norm": False})
    with torch.no_grad():
        raw = torch.cat([model.logits(v, pick), model.logits(v, wrong), model.logits(still, pick),
                         model.logits(blurred, pick)]).to(torch.float64)
    mean, std = raw.mean(0), raw.std(0).clamp_min(1e-3)
    out = {"use_norm": True}
    for i, a in enumerate(_CONFIG_KEYS):
        out[f"{a}_mean"], out[f"{a}_std"] = round(float(mean[i]), 4), round(float(std[i]), 4)
    return out


# ------------------------------------------------------------------------------------------ VideoAlign
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")


class VideoAlignReward(RewardModel):
    """VideoReward / VideoAlign: a transformers ``Qwen2VLForConditionalGeneration`` whose last hidden
    states at the three reward tokens go through a linear reward head (``hidden -> 1``), giving the
    [VQ, MQ, TA] logits.

    Folder layout (``path``): the Qwen2-VL model (``save_pretrained``), ``reward_head.safetensors``
    (``weight [1, hidden]``, ``bias [1]``), ``model_config.json`` with the z-statistics (``VQ_mean`` ...
    at any depth, ``use_norm``) and ``reward_token_ids`` (three ids) unless the tokenizer knows
    :data:`REWARD_TOKENS`. A tokenizer in the folder encodes the prompt; without one (tiny test models)
    prompt bytes map to ids ``3 + byte mod (vocab - 8)``.

    Pixels -> patches is written in torch so the saliency is a true pixel gradient: frames are resized
    (bilinear) to multiples of ``patch_size * spatial_merge_size``, padded to a multiple of the temporal
    patch by repeating the last frame, normalised with CLIP's mean / std and flattened in the Qwen2-VL
    processor's patch order ``(t, h/m, w/m, m, m, C, tp, p, p)``.
    """

    name = "videoalign"

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file
        from transformers import Qwen2VLForConditionalGeneration

        path = Path(path)
        cfg_file = path / "model_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        super().__init__(config)
        try:
            self.model = Qwen2VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device)
        except OSError as e:
            raise UserError(f"cannot load a VideoReward (Qwen2-VL) model from {str(path)!r} ({e}); pass a folder "
                            f"holding the model, reward_head.safetensors and model_config.json") from e
        head_file = path / "reward_head.safetensors"
        if not head_file.is_file():
            raise UserError(f"{str(path)!r} has no reward_head.safetensors (the VideoReward head: weight [1, hidden], "
                            f"bias [1])")
        sd = load_file(str(head_file))
        hidden = sd["weight"].shape[1]
        self.head = torch.nn.Linear(hidden, sd["weight"].shape[0]).to(device, dtype)
        self.head.load_state_dict(sd)
        self.tokenizer = None
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception:  # noqa: BLE001 - tiny test folders have no tokenizer
            self.tokenizer = None
        ids = config.get("reward_token_ids")
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        if ids is None or len(ids) != 3:
            raise UserError(f"{str(path)!r}: cannot find the three reward token ids (model_config.json "
                            f"'reward_token_ids' or tokens {REWARD_TOKENS} in the tokenizer)")
        self.reward_token_ids = [int(i) for i in ids]
        self.freeze()

    def _text_ids(self, prompt: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        vocab = self.model.config.text_config.vocab_size
        return [3 + b % (vocab - 8) for b in prompt.encode("utf-8")]

    def patches(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """One clip ``[F,3,H,W]`` in [0, 1] -> flattened patches ``[N, 3 tp p p]`` and ``grid_thw [1,3]``."""
        vc = self.model.config.vision_config
        p, tp, ms = int(vc.patch_size), int(vc.temporal_patch_size), int(vc.spatial_merge_size)
        Fr, C, H, W = video.shape
        unit = p * ms
        h, w = max(unit, round(H / unit) * unit), max(unit, round(W / unit) * unit)
        x = video if (h, w) == (H, W) else F.interpolate(video, size=(h, w), mode="bilinear", align_corners=False)
        if Fr % tp:
            x = torch.cat([x, x[-1:].expand(tp - Fr % tp, -1, -1, -1)])
        mean = torch.tensor(_CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(_CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
        x = (x - mean) / std
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        x = x.reshape(gt, tp, C, gh // ms, ms, p, gw // ms, ms, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, C * tp * p * p), torch.tensor([[gt, gh, gw]])

    def logits(self, videos: Tensor, prompts: str | Sequence[str]) -> Tensor:
        v = check_video(videos)
        prompts = self._prompts(prompts, v.shape[0])
        cfg = self.model.config
        ms = int(cfg.vision_config.spatial_merge_size)
        out = []
        for b in range(v.shape[0]):
            pix, thw = self.patches(v[b].to(self.head.weight.dtype))
            n_tok = int(thw.prod()) // (ms * ms)
            ids = ([cfg.vision_start_token_id] + [cfg.video_token_id] * n_tok + [cfg.vision_end_token_id]
                   + self._text_ids(prompts[b]) + self.reward_token_ids)
            ids_t = torch.tensor([ids], device=pix.device)
            types = (ids_t == cfg.video_token_id).long() * 2
            res = self.model(input_ids=ids_t, mm_token_type_ids=types, pixel_values_videos=pix,
                             video_grid_thw=thw.to(pix.device), output_hidden_states=True)
            hs = res.hidden_states[-1][0, -3:]
            out.append(self.head(hs)[:, 0])
        return torch.stack(out)


# ------------------------------------------------------------------------------------------ loading
REWARD_NAMES = ("shapeworld",)


def load_reward(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> RewardModel:
    """A frozen reward model by name or folder: ``shapeworld`` (:class:`ShapeWorldReward`, the embedded default)
    or a VideoReward / VideoAlign folder (:class:`VideoAlignReward`; a Hugging Face id works once downloaded)."""
    spec = str(spec).strip()
    if spec in REWARD_NAMES or spec == ShapeWorldReward.name:
        return ShapeWorldReward().freeze()
    if not spec:
        raise UserError("--reward is empty; use shapeworld or the folder of a VideoReward (VideoAlign) model")
    return VideoAlignReward(spec, device=device, dtype=dtype)
