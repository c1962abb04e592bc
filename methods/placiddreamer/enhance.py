"""PlacidDreamer's enhanced multi-view images: the Latent-Plane applied *inside* the novel-view sampling,
and a measurement of how consistent a set of ring views is.

Spec 2.2 stage 1 / 2.3: the official pipeline hooks the coarse + fine planes into Zero123-XL's UNet
(``up_blocks[2]``, conditional branch, first 45 of 50 steps); the fine plane rewrites the 8 views' features
with features volume-rendered from one shared density, which is what makes the 8 generated views agree
("enhanced multi-view images"), and those views personalise the text-to-image teacher (DreamBooth-LoRA).

Two hosts, one sampler:

* a plane that reads **UNet features** (``host == "unet"``, the official checkpoints) is hooked into the
  UNet (:func:`~.prepare.hooked_views`; the fine plane is what enhances);
* the shipped ShapeWorld plane reads **ring images** (``host == "images"``: RGB + fixed random-conv channels,
  :class:`~.latent_plane.networks.ShapeWorldFeatures`). It is applied inside the DDIM loop of *any*
  novel-view teacher (``shapeworld-nv-exact``, ``shapeworld-nv-unet``, a Zero123 folder): at each of the first
  ``active_steps`` steps the guided clean-image prediction ``x0`` of the 8 views is read by the plane (coarse
  density, then the fine plane's ``f_out = f_in (1 - occ) + f_rendered``) and its RGB channels replace ``x0``
  (the change is computed at the plane's resolution and added to ``x0`` at the teacher's); the DDIM step then
  continues from the rewritten ``x0`` (:class:`PlaneEnhancedTeacher`). This is our reconstruction of the hook
  for a plane that reads images: the plane was trained (``scripts/train_latent_plane.py``) to map noisy ring
  features to clean, mutually consistent ones, and the predicted ``x0`` is the image-space counterpart of the
  UNet's intermediate features. It acts on the guided prediction (the ShapeWorld teachers have no separate
  conditional feature pass to hook).

Consistency (:func:`view_consistency`), measured without and with ground truth:

* ``silhouette_iou``: carve the visual hull of all 8 views' foreground masks (white background) on a voxel
  grid, project it back into each view and take the IoU with that view's own mask, averaged. A set of views
  of one object at the stated cameras scores ~1; views that disagree about the shape carve each other away.
* with ``gt`` (true renders at the same cameras): ``gt_psnr`` (all views) and ``gt_psnr_sector`` (views whose
  azimuth lies in a held-out sector).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from studio.cameras import Cameras, azimuth_in_sector, orbit_cameras

from .latent_plane.ring import RING_N


class PlaneEnhancedTeacher:
    """A novel-view teacher whose guided ``x0`` predictions (``predict(..., output="sample")``) of groups of 8
    ring views pass through an image-reading Latent-Plane while :attr:`active` is True. Everything else is
    delegated to the wrapped teacher, so :func:`studio.teachers.novel_view.sample_novel_views` runs on it
    unchanged. ``plane_time``: ``"step"`` feeds the DDIM timestep as the plane's time input, ``"zero"`` feeds
    0 (the plane then reads ``x0`` as clean features)."""

    def __init__(self, teacher, plane, features, resolution: int, plane_time: str = "zero") -> None:
        if plane.fine is None:
            raise ValueError("view enhancement needs a Latent-Plane with a fine plane")
        self._teacher, self.plane, self.features, self.resolution = teacher, plane, features, int(resolution)
        self.plane_time = plane_time
        self.active = True
        self.calls = 0  # how many predictions the plane rewrote

    def __getattr__(self, name):
        return getattr(self._teacher, name)

    @torch.no_grad()
    def enhance_images(self, img: Tensor, t: float = 0.0) -> Tensor:
        """``img [8k,3,H,W]`` in [0,1] -> enhanced images (same shape): the fine plane's rewritten RGB, as a
        change at the plane's resolution added back at ``H x W``."""
        N, _, H, W = img.shape
        if N % RING_N:
            raise ValueError(f"view enhancement needs groups of {RING_N} ring views, got {N}")
        r = self.resolution
        small = F.interpolate(img.float(), size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        feats = self.features(small).reshape(N // RING_N, RING_N, -1, r, r)
        out = []
        for g in range(N // RING_N):
            c = self.plane.coarse(feats[g:g + 1], t=t)
            rgb = self.plane.fine(feats[g:g + 1], c["sigma"])["sample"][0, :, :3]
            out.append(rgb)
        delta = torch.cat(out) - small
        if (H, W) != (r, r):
            delta = F.interpolate(delta, size=(H, W), mode="bilinear", align_corners=False)
        return (img + delta.to(img)).clamp(0, 1)

    def predict(self, x_t, t, cond, *args, output: str = "eps", **kwargs):
        out = self._teacher.predict(x_t, t, cond, *args, output=output, **kwargs)
        if not self.active or output != "sample" or out.shape[0] % RING_N:
            return out
        tt = float(torch.as_tensor(t).float().reshape(-1)[0]) if self.plane_time == "step" else 0.0
        img = self._teacher.decode(out)
        new = self.enhance_images(img, tt)
        self.calls += 1
        return self._teacher.encode(new).to(out)


def enhanced_sample(nv, cond, plane, features, lp_cfg, *, steps: int = 50, guidance_scale: float = 2.0,
                    seed: int = 0, active_steps: int = 45, every: int = 1, n_samples: int | None = None,
                    plane_time: str = "zero") -> tuple[Tensor, int]:
    """The 8 ring views sampled with the image-reading plane active in the first ``active_steps`` of ``steps``
    DDIM steps (official: 45 of 50). ``every > 1`` runs the plane only at every ``every``-th step of that
    window, counted back from its last step (a CPU budget: one coarse + fine pass over the 8 x 32 x 32 ring
    rays costs ~10-50 s on 2 cores). ``n_samples``: samples per ray of both planes for this call (the shipped
    plane was trained with 16, the official inference uses 32; None keeps the plane's). Returns
    ``(views [8,3,H,W], number of rewritten predictions)``."""
    from studio.teachers.novel_view import sample_novel_views

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    wrapped = PlaneEnhancedTeacher(nv, plane, features, lp_cfg.resolution, plane_time=plane_time)

    def switch(k: int, t: int) -> None:
        wrapped.active = k < active_steps and (active_steps - 1 - k) % every == 0

    old = (plane.coarse.n_samples, plane.fine.n_samples)
    if n_samples is not None:
        plane.coarse.n_samples = plane.fine.n_samples = int(n_samples)
    try:
        views = sample_novel_views(wrapped, cond, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                   callback=switch)
    finally:
        plane.coarse.n_samples, plane.fine.n_samples = old
    return views, wrapped.calls


# ------------------------------------------------------------------------------------------ consistency
def ring_view_cameras(nv, d_polar: Tensor, d_azimuth: Tensor, d_radius: Tensor, size: int) -> Cameras:
    """World cameras of views generated at relative poses from a teacher whose reference camera is known
    (``shapeworld-nv-exact`` / ``shapeworld-nv-unet``: ``reference_elevation`` etc.)."""
    return orbit_cameras(nv.reference_elevation - d_polar, nv.reference_azimuth + d_azimuth,
                         nv.reference_radius + d_radius, nv.fovy, size, size)


def foreground_masks(views: Tensor, threshold: float = 0.1) -> Tensor:
    """``[V,H,W]`` bool: pixels differing from white by more than ``threshold`` in some channel."""
    return (1.0 - views.float()).amax(1) > threshold


@torch.no_grad()
def silhouette_iou(views: Tensor, cameras: Cameras, *, grid_res: int = 64, extent: float = 1.0,
                   threshold: float = 0.1) -> Tensor:
    """Per-view IoU ``[V]`` between each view's mask and the projection of the visual hull of all views.

    The hull is carved on a ``grid_res^3`` grid over ``[-extent, extent]^3``: a voxel centre is kept iff it
    projects into every view's foreground (nearest pixel; outside the frame counts as background). Kept
    centres are splatted back into each view (nearest pixel; the default grid spacing, 0.03 world units, is
    finer than a pixel of ShapeWorld's 32-64 px views, so the splat leaves no holes)."""
    V, _, H, W = views.shape
    if len(cameras) != V:
        raise ValueError(f"{V} views but {len(cameras)} cameras")
    cams = cameras.resized(W, H) if (cameras.width, cameras.height) != (W, H) else cameras
    masks = foreground_masks(views, threshold)
    lin = torch.linspace(-extent, extent, grid_res)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    pix, z = cams.project(pts)  # [V,P,2], [V,P]
    ij = pix.floor().long()
    inside = (z > 0) & (ij[..., 0] >= 0) & (ij[..., 0] < W) & (ij[..., 1] >= 0) & (ij[..., 1] < H)
    flat = ij[..., 1].clamp(0, H - 1) * W + ij[..., 0].clamp(0, W - 1)
    hit = torch.gather(masks.reshape(V, -1), 1, flat) & inside
    keep = hit.all(0)
    ious = []
    for v in range(V):
        proj = torch.zeros(H * W, dtype=torch.bool)
        proj[flat[v][keep & inside[v]]] = True
        proj = proj.reshape(H, W)
        inter = (proj & masks[v]).sum()
        union = (proj | masks[v]).sum()
        ious.append(inter.float() / union.clamp_min(1).float())
    return torch.stack(ious)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [0,1] ``[V,3,H,W]``."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def view_consistency(views: Tensor, cameras: Cameras, gt: Tensor | None = None, *, azimuths: Tensor | None = None,
                     sector=None) -> dict:
    """Consistency of a set of views at known cameras (module doc): ``silhouette_iou`` (mean over views) and,
    with ``gt [V,3,H,W]``, ``gt_psnr`` and, with ``azimuths`` and ``sector``, ``gt_psnr_sector`` (views in the
    sector; absent when none is) and ``gt_psnr_outside``."""
    out = {"silhouette_iou": float(silhouette_iou(views, cameras).mean())}
    if gt is not None:
        g = gt
        if g.shape[-2:] != views.shape[-2:]:
            g = F.interpolate(g.float(), size=views.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        p = psnr(views, g)
        out["gt_psnr"] = float(p.mean())
        if azimuths is not None and sector is not None:
            ins = azimuth_in_sector(torch.as_tensor(azimuths, dtype=torch.float32), sector)
            if ins.any():
                out["gt_psnr_sector"] = float(p[ins].mean())
            if (~ins).any():
                out["gt_psnr_outside"] = float(p[~ins].mean())
    return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}

