"""Metrics against ShapeWorld ground truth: image, silhouette, geometry, colour and Janus measures.

Every metric is a pure function of tensors. Images are **channel-last** as the renderer returns them:
``[H,W,C]`` or ``[B,H,W,C]`` in [0,1]; alphas / masks ``[...,H,W,1]`` or ``[...,H,W]``.
``evaluate_gaussians`` ties them together for a Gaussian student of a ShapeWorld object.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["psnr", "ssim", "silhouette_iou", "chamfer_to_surface", "saturation_gap", "janus_score",
           "evaluate_gaussians", "evaluate_mesh", "sample_mesh_surface"]


def _batched(img: Tensor) -> Tensor:
    if img.dim() == 3:
        img = img[None]
    if img.dim() != 4:
        raise ValueError(f"images must be [H,W,C] or [B,H,W,C] (channel-last), got shape {tuple(img.shape)}")
    return img.float()


def _check_same(pred: Tensor, gt: Tensor, what: str = "pred and gt") -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"{what} must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")


def psnr(pred: Tensor, gt: Tensor, max_val: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB: per image ``10 log10(max^2 / MSE)``, averaged over the batch
    (``inf`` for identical images)."""
    _check_same(pred, gt)
    p, g = _batched(pred), _batched(gt)
    mse = ((p - g) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(max_val**2 / mse)).mean()


def ssim(pred: Tensor, gt: Tensor, window_size: int = 11, max_val: float = 1.0) -> Tensor:
    """Mean structural similarity (``kornia.metrics.ssim``, Gaussian window, 'same' padding)."""
    import kornia

    _check_same(pred, gt)
    p, g = _batched(pred).permute(0, 3, 1, 2), _batched(gt).permute(0, 3, 1, 2)
    small = min(p.shape[-2:])
    ws = window_size if small > window_size else max(1, ((small - 1) // 2) * 2 - 1)  # odd, below the image size
    return kornia.metrics.ssim(p.contiguous(), g.contiguous(), ws, max_val=max_val).mean()


def _mask(m: Tensor) -> Tensor:
    return m[..., 0] if m.dim() >= 3 and m.shape[-1] == 1 else m


def silhouette_iou(pred_alpha: Tensor, gt_alpha: Tensor, thresh: float = 0.5) -> Tensor:
    """Intersection over union of the silhouettes ``alpha > thresh`` over all pixels of the batch
    (1 when both are empty)."""
    _check_same(pred_alpha, gt_alpha, "pred_alpha and gt_alpha")
    p, g = _mask(pred_alpha) > thresh, _mask(gt_alpha) > thresh
    union = (p | g).sum()
    if union == 0:
        return torch.tensor(1.0)
    return (p & g).sum().float() / union.float()


def _nn_dist(a: Tensor, b: Tensor, chunk: int) -> Tensor:
    """Nearest-neighbour distance of each row of ``a`` in ``b``: the neighbour by (fast, matmul-based)
    ``cdist``, its distance recomputed exactly (so identical points give exactly 0)."""
    out = []
    for s in range(0, a.shape[0], chunk):
        blk = a[s: s + chunk]
        idx = torch.cdist(blk, b).argmin(dim=1)
        out.append((blk - b[idx]).norm(dim=-1))
    return torch.cat(out)


def chamfer_to_surface(points: Tensor, surface_points: Tensor, *, chunk: int = 2048) -> dict[str, Tensor]:
    """Chamfer distance between a point set ``[P,3]`` and a dense sample of the true surface ``[S,3]``.

    Returns ``precision`` (mean distance of each point to its nearest surface sample: are the points on the
    surface?), ``completeness`` (mean distance of each surface sample to its nearest point: is the surface
    covered?) and ``chamfer = (precision + completeness) / 2`` (symmetric, in world units, not squared).
    Nearest neighbours by chunked ``torch.cdist``. An empty point set gives ``inf``.
    """
    if points.dim() != 2 or points.shape[-1] != 3 or surface_points.dim() != 2 or surface_points.shape[-1] != 3:
        raise ValueError(f"points and surface_points must be [P,3] / [S,3], got {tuple(points.shape)}, "
                         f"{tuple(surface_points.shape)}")
    if points.shape[0] == 0 or surface_points.shape[0] == 0:
        inf = torch.tensor(math.inf)
        return {"chamfer": inf, "precision": inf, "completeness": inf}
    a, b = points.detach().float(), surface_points.detach().float().to(points.device)
    prec = _nn_dist(a, b, chunk).mean()
    comp = _nn_dist(b, a, chunk).mean()
    return {"chamfer": 0.5 * (prec + comp), "precision": prec, "completeness": comp}


def saturation_gap(pred_rgb: Tensor, gt_rgb: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean HSV saturation of ``pred`` minus that of ``gt`` over the foreground ``mask`` (bool or alpha
    > 0.5; all pixels if ``None``). Negative = washed out / greyer than the truth (the usual SDS failure),
    positive = oversaturated. Uses ``kornia.color.rgb_to_hsv``."""
    import kornia

    _check_same(pred_rgb, gt_rgb, "pred_rgb and gt_rgb")
    p, g = _batched(pred_rgb).clamp(0, 1), _batched(gt_rgb).clamp(0, 1)
    sp = kornia.color.rgb_to_hsv(p.permute(0, 3, 1, 2).contiguous())[:, 1]
    sg = kornia.color.rgb_to_hsv(g.permute(0, 3, 1, 2).contiguous())[:, 1]
    if mask is None:
        m = torch.ones_like(sp, dtype=torch.bool)
    else:
        m = _mask(mask)
        m = (m > 0.5) if m.dtype != torch.bool else m
        m = m.reshape(sp.shape)
    if m.sum() == 0:
        return torch.tensor(0.0)
    return sp[m].mean() - sg[m].mean()


def janus_score(pred_front: Tensor, pred_back: Tensor, gt_front: Tensor, gt_back: Tensor, *,
                allow_flip: bool = True, return_details: bool = False):
    """Front/back confusion of a student: 0 for a faithful one, 1 for a fully Janus one.

    Inputs are ``P`` paired views ``[P,H,W,3]``: view ``i`` of ``*_back`` looks at the object from the
    opposite side of view ``i`` of ``*_front`` (``references.front_back_cameras``). With ``d`` the per-image
    MSE, a back view is *confused* when it is closer to the front truth than to its own,
    ``d(pred_back, gt_front) < d(pred_back, gt_back)`` (likewise for front views). With ``allow_flip`` the
    opposite side also counts when matched after a horizontal flip, since a face seen from behind through
    a copied front is mirrored. Returns ``max(back_confusion, front_confusion)``, the fractions of
    confused back and front views: a two-faced student (its back a copy of its front) scores 1, one with
    front and back swapped also 1, and the truth against itself 0. ``return_details=True`` returns a dict
    with ``score``, ``back_confusion``, ``front_confusion`` and the per-pair distances.
    """
    for name, t in (("pred_back", pred_back), ("gt_front", gt_front), ("gt_back", gt_back)):
        _check_same(pred_front, t, f"pred_front and {name}")
    pf, pb, gf, gb = (_batched(t) for t in (pred_front, pred_back, gt_front, gt_back))

    def d(x: Tensor, y: Tensor) -> Tensor:
        return ((x - y) ** 2).flatten(1).mean(1)

    def d_opp(x: Tensor, y: Tensor) -> Tensor:
        return torch.minimum(d(x, y), d(x.flip(-2), y)) if allow_flip else d(x, y)

    back_own, back_opp = d(pb, gb), d_opp(pb, gf)
    front_own, front_opp = d(pf, gf), d_opp(pf, gb)
    back_conf = (back_opp < back_own).float().mean()
    front_conf = (front_opp < front_own).float().mean()
    score = torch.maximum(back_conf, front_conf)
    if not return_details:
        return float(score)
    return {"score": float(score), "back_confusion": float(back_conf), "front_confusion": float(front_conf),
            "back_own": back_own, "back_opposite": back_opp, "front_own": front_own, "front_opposite": front_opp}


# ------------------------------------------------------------------------------------------- evaluation

def _activated(gaussians: Any, sh_degree: int | None) -> tuple[dict[str, Tensor], int | None]:
    """Activated parameters of a dict (``means, quats, scales, opacities, colors``) or of an object with
    those attributes (``GaussianModel``); the SH degree from the argument, ``gaussians["sh_degree"]``,
    ``.active_sh_degree`` or the coefficient count of ``colors [N,K,3]``."""
    keys = ("means", "quats", "scales", "opacities", "colors")
    if isinstance(gaussians, Mapping):
        missing = [k for k in keys if k not in gaussians]
        if missing:
            raise ValueError(f"gaussians lacks {missing}; pass activated means, quats, scales, opacities, colors")
        g = {k: gaussians[k] for k in keys}
        deg = gaussians.get("sh_degree", None)
    else:
        g = {k: getattr(gaussians, k) for k in keys}
        deg = getattr(gaussians, "active_sh_degree", getattr(gaussians, "sh_degree", None))
    g = {k: v.detach().float().cpu() for k, v in g.items()}
    if sh_degree is None and g["colors"].dim() == 3:
        K = g["colors"].shape[1]
        sh_degree = int(deg) if deg is not None else int(round(math.sqrt(K))) - 1
    elif g["colors"].dim() == 2:
        sh_degree = None
    return g, sh_degree


@torch.no_grad()
def evaluate_gaussians(obj, gaussians: Any, size: int = 64, n_views: int = 8, backend: str = "auto", *,
                       sh_degree: int | None = None, seed: int = 0, n_reference: int | None = None,
                       n_surface: int = 10000, opacity_threshold: float = 0.1, background=(1.0, 1.0, 1.0),
                       janus: bool = True, janus_elevations=(0.0, 20.0), janus_azimuth_offsets=(-20.0, 0.0, 20.0),
                       cache: bool = True, cache_path=None, azimuth_sector=None) -> dict[str, Any]:
    """Score a Gaussian student of ShapeWorld object ``obj`` against the ground truth.

    Renders the student and the reference Gaussians at ``n_views`` held-out views
    (``references.held_out_cameras(n_views, size, seed)``) over ``background`` and returns python numbers:
    ``psnr``, ``ssim``, ``iou`` (silhouettes at alpha 0.5), ``saturation_gap`` (over the true foreground),
    ``chamfer`` / ``chamfer_precision`` / ``chamfer_completeness`` (centres of Gaussians with opacity >
    ``opacity_threshold`` against ``obj.surface(n_surface, seed=1)``), ``janus`` (``janus_score`` on the
    ``front_back_cameras`` pairs for objects whose front and back differ, else ``None``; ``janus=False``
    skips it and gives ``None``; ``janus_elevations`` / ``janus_azimuth_offsets`` choose the pairs), plus
    ``n_views``,
    ``size`` and ``n_gaussians``. ``gaussians``: a dict of activated parameters (colours RGB ``[N,3]`` or SH
    ``[N,K,3]``) or a ``GaussianModel``. ``n_reference`` sets the reference set's size (default
    ``REFERENCE_N_GAUSSIANS``). ``azimuth_sector = (start, end)``: the views are
    ``references.sector_cameras(azimuth_sector, n_views, size, seed)`` instead, inside the sector the run kept
    out of training (named in ``views``).
    """
    from .objects import get_object
    from .references import (REFERENCE_N_GAUSSIANS, front_back_cameras, render_gaussian_views,
                             render_reference)

    obj = get_object(obj)
    g, deg = _activated(gaussians, sh_degree)
    n_ref = REFERENCE_N_GAUSSIANS if n_reference is None else n_reference
    ref_kw = dict(background=background, n_gaussians=n_ref, seed=0, backend=backend, cache=cache, cache_path=cache_path)

    views = _eval_views(n_views, size, seed, azimuth_sector)
    gt = render_reference(obj, views.cameras, **ref_kw)
    pred = render_gaussian_views(g, views.cameras, background=background, sh_degree=deg, backend=backend)
    fg = gt["alphas"] > 0.5
    out: dict[str, Any] = {
        "psnr": float(psnr(pred["images"], gt["images"])),
        "ssim": float(ssim(pred["images"], gt["images"])),
        "iou": float(silhouette_iou(pred["alphas"], gt["alphas"])),
        "saturation_gap": float(saturation_gap(pred["images"], gt["images"], fg)),
    }
    keep = g["opacities"] > opacity_threshold
    ch = chamfer_to_surface(g["means"][keep], obj.surface(n_surface, seed=1).points)
    out.update(chamfer=float(ch["chamfer"]), chamfer_precision=float(ch["precision"]),
               chamfer_completeness=float(ch["completeness"]))
    if obj.front_back_differ and janus:
        front, back = front_back_cameras(size, elevations=janus_elevations, azimuth_offsets=janus_azimuth_offsets)
        gf, gb = render_reference(obj, front.cameras, **ref_kw), render_reference(obj, back.cameras, **ref_kw)
        pf = render_gaussian_views(g, front.cameras, background=background, sh_degree=deg, backend=backend)
        pb = render_gaussian_views(g, back.cameras, background=background, sh_degree=deg, backend=backend)
        out["janus"] = janus_score(pf["images"], pb["images"], gf["images"], gb["images"])
    else:
        out["janus"] = None
    out.update(n_views=n_views, size=size, n_gaussians=int(g["means"].shape[0]), views=_views_name(azimuth_sector))
    return out


def _sector_on(azimuth_sector) -> bool:
    return azimuth_sector is not None and (float(azimuth_sector[1]) - float(azimuth_sector[0])) % 360.0 != 0.0


def _eval_views(n_views: int, size: int, seed: int, azimuth_sector):
    from .references import held_out_cameras, sector_cameras

    if not _sector_on(azimuth_sector):
        return held_out_cameras(n_views, size, seed)
    return sector_cameras(azimuth_sector, n_views, size, seed)


def _views_name(azimuth_sector) -> str:
    if not _sector_on(azimuth_sector):
        return "ring gaps (inside the training camera distribution)"
    return f"held-out azimuth sector [{float(azimuth_sector[0]):g}, {float(azimuth_sector[1]):g}) deg"


def sample_mesh_surface(verts: Tensor, faces: Tensor, n: int = 10000, seed: int = 0) -> Tensor:
    """``n`` points uniform over the area of a triangle mesh ``verts [V,3]``, ``faces [F,3]``: ``[n,3]``
    (faces drawn with probability proportional to area, then uniform barycentrics ``(1 - sqrt(u), sqrt(u)(1 - v),
    sqrt(u) v)``). An empty or zero-area mesh gives ``[0,3]``."""
    v, f = verts.detach().float(), faces.long()
    if f.shape[0] == 0:
        return v.new_zeros((0, 3))
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * torch.linalg.cross(b - a, c - a).norm(dim=-1)
    if float(area.sum()) <= 0:
        return v.new_zeros((0, 3))
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(area.cpu(), n, replacement=True, generator=g).to(v.device)
    u, w = torch.rand(n, 1, generator=g).to(v), torch.rand(n, 1, generator=g).to(v)
    su = u.sqrt()
    return (1 - su) * a[idx] + su * (1 - w) * b[idx] + su * w * c[idx]


@torch.no_grad()
def evaluate_mesh(obj, verts: Tensor, faces: Tensor, texture=None, size: int = 64, n_views: int = 8, *,
                  seed: int = 0, n_surface: int = 10000, background=(1.0, 1.0, 1.0), backend: str = "auto",
                  cache: bool = True, azimuth_sector=None) -> dict[str, Any]:
    """Score a triangle mesh student of ShapeWorld object ``obj`` against the ground truth.

    At ``n_views`` held-out views (``references.held_out_cameras``): ``iou`` (silhouettes), ``normal_error_deg``
    (mean angle between the mesh's rendered vertex normals and the true normals, world frame, over pixels
    covered by both), and with a colour ``texture`` (``points [P,3] -> rgb``) ``psnr`` and ``saturation_gap``
    (over the true foreground). ``chamfer`` / ``chamfer_precision`` / ``chamfer_completeness``: ``n_surface``
    area-uniform mesh samples against ``obj.surface(n_surface, seed=1)``. ``azimuth_sector``: evaluate at
    views inside it (as :func:`evaluate_gaussians`)."""
    from ..render.mesh import render_mesh
    from ..render.mesh_field import render_mesh_field
    from .objects import get_object
    from .references import render_reference

    obj = get_object(obj)
    views = _eval_views(n_views, size, seed, azimuth_sector)
    gt = render_reference(obj, views.cameras, background=background, backend=backend, cache=cache)
    v, f = verts.detach().float(), faces.long()
    out: dict[str, Any] = {"n_views": n_views, "size": size, "n_verts": int(v.shape[0]), "n_faces": int(f.shape[0]),
                           "views": _views_name(azimuth_sector)}
    ch = chamfer_to_surface(sample_mesh_surface(v, f, n_surface, seed), obj.surface(n_surface, seed=1).points)
    out.update(chamfer=float(ch["chamfer"]), chamfer_precision=float(ch["precision"]),
               chamfer_completeness=float(ch["completeness"]))
    if f.shape[0] == 0:
        out.update(iou=0.0, normal_error_deg=None, psnr=None, saturation_gap=None)
        return out
    bg = torch.tensor(background, dtype=torch.float32)
    if texture is not None:
        r = render_mesh_field(v, f, views.cameras, texture, background=bg, normals=True, backend=backend)
    else:
        r = render_mesh(v, f, views.cameras, normals=True, background=bg, backend=backend)
    out["iou"] = float(silhouette_iou(r["alpha"], gt["alphas"]))
    both = r["mask"] & (_mask(gt["alphas"]) > 0.5)
    if bool(both.any()):
        cos = (torch.nn.functional.normalize(r["normal"], dim=-1)
               * torch.nn.functional.normalize(gt["normals"].float(), dim=-1)).sum(-1).clamp(-1, 1)
        out["normal_error_deg"] = float(torch.rad2deg(torch.acos(cos))[both].mean())
    else:
        out["normal_error_deg"] = None
    if texture is not None:
        img = r["rgb"][..., :3].clamp(0, 1)
        out["psnr"] = float(psnr(img, gt["images"]))
        out["saturation_gap"] = float(saturation_gap(img, gt["images"], gt["alphas"] > 0.5))
    return out
