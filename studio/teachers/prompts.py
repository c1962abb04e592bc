"""View-dependent prompting (DreamFusion / threestudio conventions).

Angles follow :mod:`studio.cameras`: world y-up, azimuth measured around +y from +z towards +x, so
azimuth 0 looks at the object's front, +-180 at its back, +90 at the side on +x (called the "right"
side, as seen by a viewer facing the front), and elevation > 0 looks down from above.

Discrete labels (``view_suffixes``), with ``a = |azimuth|`` wrapped to [0, 180]:

* ``"overhead view"`` if ``elevation > overhead_threshold`` (takes precedence);
* ``"front view"`` if ``a <= front_range``;
* ``"back view"`` if ``a >= 180 - back_range``;
* ``"side view"`` otherwise (``mode="left_right"``: ``"right side view"`` for azimuth > 0, i.e. the
  +x side, ``"left side view"`` for azimuth < 0).

Interpolated embeddings (``view_conditioned(..., mode="interpolated")``, PlacidDreamer /
Perp-Neg style): with ``E_front``, ``E_side``, ``E_back``, ``E_overhead`` the embeddings of
``"<prompt>, front view"`` etc.::

    a in [0, 90]:    E = (1 - a/90) E_front + (a/90) E_side
    a in (90, 180]:  E = (1 - (a-90)/90) E_side + ((a-90)/90) E_back
    elevation > overhead_threshold:  E = E_overhead

(in ``"interpolated_left_right"`` mode the side embedding is the left or right one by the sign of
the azimuth). So azimuth 0 gives exactly ``E_front``, +-90 exactly the side and +-180 exactly the
back embedding; ``front_range`` / ``back_range`` only affect the discrete modes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import ImageTeacher, TextCond

VIEW_MODES = ("discrete", "left_right")
CONDITION_MODES = ("discrete", "left_right", "interpolated", "interpolated_left_right", "none")


def _angles(azimuth_deg, elevation_deg) -> tuple[Tensor, Tensor]:
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64).detach().cpu().reshape(-1)
    if elevation_deg is None:
        el = torch.zeros_like(az)
    else:
        el = torch.as_tensor(elevation_deg, dtype=torch.float64).detach().cpu().reshape(-1)
    az, el = torch.broadcast_tensors(az, el)
    return az, el


def wrap_azimuth(azimuth_deg) -> Tensor:
    """Wrap azimuths (degrees) to (-180, 180]."""
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64)
    out = torch.remainder(az + 180.0, 360.0) - 180.0
    return torch.where(out == -180.0, torch.full_like(out, 180.0), out)


def view_suffixes(azimuth_deg, elevation_deg=None, mode: str = "discrete", overhead_threshold: float = 60.0,
                  front_range: float = 45.0, back_range: float = 45.0) -> list[str]:
    """Per-sample view labels (``"front view"``, ``"side view"``, ``"back view"``, ``"overhead view"``;
    ``mode="left_right"`` splits the side into ``"left side view"`` / ``"right side view"``). See module doc."""
    if mode not in VIEW_MODES:
        raise ValueError(f"unknown view mode {mode!r}; expected one of {VIEW_MODES}")
    if front_range < 0 or back_range < 0 or front_range + back_range > 180:
        raise ValueError("need front_range, back_range >= 0 and front_range + back_range <= 180")
    az, el = _angles(azimuth_deg, elevation_deg)
    az = wrap_azimuth(az)
    out = []
    for a, e in zip(az.tolist(), el.tolist()):
        if e > overhead_threshold:
            out.append("overhead view")
        elif abs(a) <= front_range:
            out.append("front view")
        elif abs(a) >= 180.0 - back_range:
            out.append("back view")
        elif mode == "left_right":
            out.append("right side view" if a > 0 else "left side view")
        else:
            out.append("side view")
    return out


def with_suffix(prompt: str, suffix: str) -> str:
    """``"<prompt>, <suffix>"`` (no suffix for an empty one)."""
    prompt = prompt.rstrip().rstrip(",")
    return f"{prompt}, {suffix}" if suffix else prompt


def view_prompts(prompt: str, azimuth_deg, elevation_deg=None, mode: str = "discrete", **kw) -> list[str]:
    """Per-sample texts ``"<prompt>, <view> view"``."""
    return [with_suffix(prompt, s) for s in view_suffixes(azimuth_deg, elevation_deg, mode, **kw)]


def interpolation_weights(azimuth_deg, elevation_deg=None, overhead_threshold: float = 60.0) -> dict[str, Tensor]:
    """The blend weights of the interpolated mode: ``{"front", "side", "back", "overhead"}`` -> ``[B]``
    tensors summing to 1 per sample (see module doc)."""
    az, el = _angles(azimuth_deg, elevation_deg)
    a = wrap_azimuth(az).abs()
    w_front = torch.where(a <= 90, 1 - a / 90, torch.zeros_like(a))
    w_back = torch.where(a > 90, (a - 90) / 90, torch.zeros_like(a))
    w_side = 1 - w_front - w_back
    over = el > overhead_threshold
    zero = torch.zeros_like(a)
    return {
        "front": torch.where(over, zero, w_front), "side": torch.where(over, zero, w_side),
        "back": torch.where(over, zero, w_back), "overhead": over.to(a.dtype),
    }


def view_conditioned(teacher: ImageTeacher, prompt: str, azimuth_deg, elevation_deg=None, mode: str = "discrete",
                     negative: str | Sequence[str] | None = None, overhead_threshold: float = 60.0,
                     front_range: float = 45.0, back_range: float = 45.0) -> TextCond:
    """A :class:`TextCond` with one view-dependent prompt per camera.

    ``mode``: ``"discrete"`` / ``"left_right"`` (suffix per view, see :func:`view_suffixes`),
    ``"interpolated"`` / ``"interpolated_left_right"`` (azimuth-weighted blend of the front / side / back
    embeddings, see module doc), ``"none"`` (the plain prompt). ``negative``: negative prompt(s) for
    the unconditional branch (default: the empty prompt). Embeddings come from the teacher's cache.
    """
    if mode not in CONDITION_MODES:
        raise ValueError(f"unknown view-conditioning mode {mode!r}; expected one of {CONDITION_MODES}")
    az, el = _angles(azimuth_deg, elevation_deg)
    B = az.numel()
    if mode == "none":
        return teacher.encode_prompt([prompt] * B, negative)
    if mode in ("discrete", "left_right"):
        texts = view_prompts(prompt, az, el, mode, overhead_threshold=overhead_threshold,
                             front_range=front_range, back_range=back_range)
        return teacher.encode_prompt(texts, negative)

    # interpolated: encode the anchors once (cached), blend per sample
    left_right = mode == "interpolated_left_right"
    names = ["front", "back", "overhead"] + (["left side", "right side"] if left_right else ["side"])
    anchors = teacher.encode_prompt([with_suffix(prompt, f"{n} view") for n in names],
                                    negative if isinstance(negative, str) or negative is None else negative[0])
    idx = {n: i for i, n in enumerate(names)}
    w = interpolation_weights(az, el, overhead_threshold)
    signed = wrap_azimuth(az)
    side_idx = [idx["right side"] if s > 0 else idx["left side"] for s in signed.tolist()] if left_right \
        else [idx["side"]] * B

    weights = torch.zeros(B, len(names), dtype=torch.float64)
    rows = torch.arange(B)
    weights[rows, idx["front"]] = w["front"]
    weights[rows, idx["back"]] = w["back"]
    weights[rows, idx["overhead"]] = w["overhead"]
    weights[rows, torch.as_tensor(side_idx)] += w["side"]
    wt = weights.to(device=anchors.device, dtype=anchors.dtype)

    def blend(E: Tensor) -> Tensor:  # [N, ...] anchors -> [B, ...]
        return torch.einsum("bn,n...->b...", wt, E)

    nearest = weights.argmax(1).tolist()
    texts = [anchors.texts[k] for k in nearest]
    if negative is None or isinstance(negative, str):
        neg_emb, neg_texts = blend(anchors.negative_embeds), [anchors.negative_texts[0]] * B
    else:
        neg = teacher.encode_prompt(texts, negative)
        neg_emb, neg_texts = neg.negative_embeds, neg.negative_texts
    cond = TextCond(blend(anchors.embeds), neg_emb, texts, neg_texts)
    # exact anchors where one weight is 1 (keeps azimuth 0 bit-identical to the front embedding)
    for b, k in enumerate(nearest):
        if weights[b, k] == 1.0:
            cond.embeds[b] = anchors.embeds[k]
    return cond
