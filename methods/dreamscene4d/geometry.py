"""DreamScene4D's geometry, as pure functions (spec sections 2, 3.3, 4.7, 5, 6, 9, 11).

* **Object-centric crop** (spec 2) in pixel units (the spec's advice for non-square frames): a square window of
  ``side`` pixels centred on the mask box centre, resampled to ``size x size``; :func:`crop_sides` picks the
  sides (``s0 = ext / 0.65`` at the lift frame, ``s_t = max(s0, ext_t / 0.975)``); :func:`crop` /
  :func:`uncrop` resample images, :func:`frame_to_crop` / :func:`crop_to_frame` map points (exact inverses).
* **Object-to-world placement** (spec 3.3 / 4.7, generalised to any pinhole camera and to camera motion): the
  crop camera sits at distance ``r_c`` on the object's +z axis; a point ``x`` of the object is placed in the
  world at ``S_t A x + p_t`` with ``A`` the rotation from the crop camera's frame to the world camera's
  (frame 0) and ``S_t = D_t side_t f_c / (size r_c f_t)`` so its projected size matches the crop at depth
  ``D_t``; ``p_t`` starts on the ray through the box centre at depth ``D_t`` (:func:`init_placement`). Exact
  for points on the object's centre plane, off by perspective elsewhere (as the paper's).
* **Composition** (spec 5): scaling about the camera centre ``c + rho (x - c)`` (:func:`scale_about`), the
  closed-form depth ratio and the 1-D search (:func:`depth_ratio`, :func:`search_rho`).
* **Losses** (spec 2): the balanced mask loss; the local rigidity and scale regularisers (spec 4.5).
* **Tracks and metrics** (spec 6, 9): query association, EPE and delta_avg.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from studio.cameras import Cameras, orbit_cameras
from studio.render.gaussians import quat_to_rotmat
from studio.world.primitives import rotmat_to_quat

FILL_LIFT = 0.65
FILL_TRACK = 0.975


# ------------------------------------------------------------------------------------------------ boxes, crops
def mask_boxes(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tight boxes of ``masks [T,H,W]`` (bool): centres ``[T,2]`` (x, y pixels, pixel centres at +0.5), extents
    ``[T]`` (the larger box side in pixels) and ``valid [T]`` (non-empty). Empty frames copy the nearest valid
    frame's box."""
    T, H, W = masks.shape
    m = masks.bool()
    valid = m.flatten(1).any(1)
    centers = torch.zeros(T, 2)
    ext = torch.zeros(T)
    cols = torch.arange(W, dtype=torch.float32)
    rows = torch.arange(H, dtype=torch.float32)
    for t in range(T):
        if not valid[t]:
            continue
        xs = cols[m[t].any(0)]
        ys = rows[m[t].any(1)]
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()) + 1, float(ys.min()), float(ys.max()) + 1
        centers[t] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2])
        ext[t] = max(x1 - x0, y1 - y0)
    if not bool(valid.any()):
        raise ValueError("an object's mask track is empty in every frame")
    idx = torch.arange(T)
    good = idx[valid]
    for t in range(T):
        if not valid[t]:
            j = good[(good - t).abs().argmin()]
            centers[t], ext[t] = centers[j], ext[j]
    return centers, ext, valid


def crop_sides(ext: Tensor, lift_frame: int = 0, fill_lift: float = FILL_LIFT, fill_track: float = FILL_TRACK) -> Tensor:
    """Crop window sides ``[T]`` in pixels: ``s0 = ext[lift] / fill_lift`` at every frame unless the object would
    fill more than ``fill_track`` of it, then ``ext_t / fill_track`` (spec 2, stage 2 rule)."""
    s0 = ext[lift_frame] / fill_lift
    return torch.maximum(torch.full_like(ext, float(s0)), ext / fill_track)


def _theta(centers: Tensor, sides: Tensor, H: int, W: int) -> Tensor:
    """``affine_grid`` matrices mapping crop coordinates in [-1, 1] to frame coordinates in [-1, 1]."""
    T = centers.shape[0]
    th = torch.zeros(T, 2, 3)
    th[:, 0, 0] = sides / W
    th[:, 1, 1] = sides / H
    th[:, 0, 2] = 2 * centers[:, 0] / W - 1
    th[:, 1, 2] = 2 * centers[:, 1] / H - 1
    return th


def crop(images: Tensor, centers: Tensor, sides: Tensor, size: int, *, mode: str = "bilinear",
         fill: float = 1.0) -> Tensor:
    """``images [T,C,H,W]`` -> ``[T,C,size,size]`` windows (outside the frame: ``fill``)."""
    T, C, H, W = images.shape
    grid = F.affine_grid(_theta(centers, sides, H, W).to(images), (T, C, size, size), align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(images[:, :1]), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + (1 - inside) * fill


def uncrop(patches: Tensor, centers: Tensor, sides: Tensor, H: int, W: int, *, mode: str = "bilinear",
           fill: float = 0.0) -> Tensor:
    """The inverse resampling: ``patches [T,C,s,s]`` back into ``[T,C,H,W]`` frames (outside the window: ``fill``)."""
    th = _theta(centers, sides, H, W)
    A = th[:, :, :2]
    inv = torch.zeros_like(th)
    inv[:, :, :2] = torch.linalg.inv(A)
    inv[:, :, 2] = -(inv[:, :, :2] @ th[:, :, 2:])[..., 0]
    T, C = patches.shape[:2]
    grid = F.affine_grid(inv.to(patches), (T, C, H, W), align_corners=False)
    out = F.grid_sample(patches, grid, mode=mode, padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(patches[:, :1]), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + (1 - inside) * fill


def frame_to_crop(points: Tensor, center: Tensor, side: Tensor, size: int) -> Tensor:
    """Frame pixels ``[...,2]`` -> crop pixels (``center [...,2]`` / ``side [...]`` broadcast)."""
    return (points - center) * (size / side)[..., None] + size / 2


def crop_to_frame(points: Tensor, center: Tensor, side: Tensor, size: int) -> Tensor:
    """Crop pixels -> frame pixels; the exact inverse of :func:`frame_to_crop`."""
    return (points - size / 2) * (side / size)[..., None] + center


# ------------------------------------------------------------------------------------------------ quaternions
def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of w-x-y-z quaternions (broadcast)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


# ------------------------------------------------------------------------------------------------ cameras, placement
def crop_camera(size: int, radius: float = 2.0, fovy: float = 49.1) -> Cameras:
    """The object-centric reference camera: elevation 0, azimuth 0 (on +z), looking at the origin."""
    return orbit_cameras(0.0, 0.0, radius, fovy, size, size)


def object_rotation(crop_cam: Cameras, world_cam0: Cameras) -> Tensor:
    """``A [3,3]``: object-centric axes -> world axes, so that the object seen by the world camera of frame 0 looks
    as it does in the crop camera (``A = R0^T Rc``)."""
    return world_cam0.viewmats[0, :3, :3].T @ crop_cam.viewmats[0, :3, :3]


def init_placement(centers: Tensor, sides: Tensor, cams: Cameras, crop_cam: Cameras, size: int,
                   radius: float = 2.0, depth0: float | None = None) -> tuple[Tensor, Tensor]:
    """Scales ``S [T]`` and world positions ``p [T,3]`` of the object's origin from its box track (spec 3.3 / 4.7).

    Frame 0's origin is put at depth ``depth0`` (default ``radius``, the paper's choice; with a moving camera the
    caller passes a metric depth so the camera's translation gives the right parallax) on the ray through the box
    centre; later frames at the depth that point has in their camera, on their own box-centre rays. ``S_t`` makes the
    projected size match the crop at that depth.
    """
    T = centers.shape[0]
    f_c = float(crop_cam.Ks[0, 0, 0])
    c2w = torch.linalg.inv(cams.viewmats)
    K = cams.Ks
    rays = torch.stack([(centers[:, 0] - K[:, 0, 2]) / K[:, 0, 0], (centers[:, 1] - K[:, 1, 2]) / K[:, 1, 1],
                        torch.ones(T)], -1)  # camera-frame rays with z = 1
    p0_cam = rays[0] * (radius if depth0 is None else float(depth0))
    p0 = c2w[0, :3, :3] @ p0_cam + c2w[0, :3, 3]
    depth = (cams.viewmats[:, :3, :3] @ p0 + cams.viewmats[:, :3, 3])[:, 2].clamp_min(1e-3)  # D_t
    p_cam = rays * depth[:, None]
    p = (c2w[:, :3, :3] @ p_cam[..., None])[..., 0] + c2w[:, :3, 3]
    S = depth * sides * f_c / (size * radius * K[:, 1, 1])
    return S, p


def place(g: dict, S: Tensor | float, p: Tensor, A: Tensor, qA: Tensor) -> dict:
    """Object-centric Gaussians -> world: means ``S A x + p``, scales ``S s``, rotations ``qA * q``."""
    out = dict(g)
    out["means"] = S * (g["means"] @ A.T) + p
    out["scales"] = g["scales"] * S
    out["quats"] = quat_multiply(qA.expand_as(g["quats"]), g["quats"])
    return out


def rotation_quat(A: Tensor) -> Tensor:
    return rotmat_to_quat(A[None])[0]


def scale_about(points: Tensor, center: Tensor, rho) -> Tensor:
    """``c + rho (x - c)``: each point slides along its camera ray (projection unchanged, depth times rho)."""
    return center + rho * (points - center)


# ------------------------------------------------------------------------------------------------ losses
def balanced_loss(pred: Tensor, target: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """``mean_{M=1} (P-Y)^2 + mean_{M=0} (P-Y)^2`` over pixels (channels averaged); an empty region drops its
    term. ``valid`` (optional) excludes pixels from both terms (e.g. where other objects hide this one)."""
    err = (pred - target).pow(2)
    if err.dim() == mask.dim() + 1:
        err = err.mean(-1)
    m = mask.bool()
    v = torch.ones_like(m) if valid is None else valid.bool()
    loss = err.new_zeros(())
    for region in (m & v, ~m & v):
        if bool(region.any()):
            loss = loss + err[region].mean()
    return loss


def knn_graph(points: Tensor, k: int = 16) -> tuple[Tensor, Tensor]:
    """Neighbour indices ``[N,k]`` (the point itself included) and weights ``exp(-10 d)`` (spec 4.4)."""
    k = min(k, points.shape[0])
    d = torch.cdist(points.detach(), points.detach())
    dist, idx = torch.topk(d, k, dim=1, largest=False)
    return idx, torch.exp(-10.0 * dist)


def rigidity_loss(x_prev: Tensor, x_now: Tensor, q_prev: Tensor, q_now: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """Local rigidity (Luiten et al.): ``mean sqrt(w ||(x_j - x_i)_{t-1} - R_{t-1} R_t^{-1} (x_j - x_i)_t||^2)``."""
    R_prev = quat_to_rotmat(q_prev)
    R_now = quat_to_rotmat(q_now)
    R_rel = R_prev @ R_now.transpose(-1, -2)
    off_prev = x_prev[idx] - x_prev[:, None]
    off_now = x_now[idx] - x_now[:, None]
    rot = (R_rel[:, None] @ off_now[..., None])[..., 0]
    return torch.sqrt(w * (off_prev - rot).pow(2).sum(-1) + 1e-20).mean()


def scale_smoothness(d_logs: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    return torch.sqrt(w * (d_logs[idx] - d_logs[:, None]).pow(2).sum(-1) + 1e-20).mean()


def sds_timestep(progress: float, t_min: int = 20, t_max: int = 980, T: int = 1000) -> int:
    """DreamGaussian's deterministic anneal ``clip(round((1 - r) T), t_min, t_max)`` (spec 3.2 / 4.5)."""
    return int(min(max(round((1.0 - progress) * T), t_min), t_max))


# ------------------------------------------------------------------------------------------------ composition
def depth_ratio(mono_obj: Tensor, mono_ref: Tensor, rend_obj: Tensor, rend_ref: Tensor) -> float:
    """Closed-form ``rho_k = (D_k / D_ref) (d_ref / d_k)`` from medians of depth samples (spec 5.3)."""
    return float((mono_obj.median() / mono_ref.median()) * (rend_ref.median() / rend_obj.median()))


def search_rho(target: Tensor, render_fn, rho0: float, lo: float = 0.65, step: float = 0.00085,
               n: int = 1000, decimals: int | None = 2) -> float:
    """The 1-D search of spec 5.4: the candidate (``rho0``, then ``lo + step i``) with the lowest L1 between
    ``render_fn(rho)`` and ``target`` (both normalised depth samples); the official code rounds the loss to 2
    decimals (``decimals``; None = exact), so the first candidate within that rounding of the best wins."""
    def loss(r: float) -> float:
        v = float((render_fn(r) - target).abs().mean())
        return round(v, decimals) if decimals is not None else v

    best, best_loss = rho0, loss(rho0)
    for i in range(n):
        r = lo + step * i
        v = loss(r)
        if v < best_loss:
            best, best_loss = r, v
    return best


def erode(mask: Tensor, k: int = 7) -> Tensor:
    """Binary erosion of ``[H,W]`` with a ``k x k`` square."""
    m = mask.float()[None, None]
    return (-F.max_pool2d(-m, k, stride=1, padding=k // 2))[0, 0] > 0.5


# ------------------------------------------------------------------------------------------------ tracks, metrics
def associate(queries: Tensor, proj: Tensor, candidates: Tensor, max_dist: float = 4.0) -> tuple[Tensor, Tensor]:
    """Nearest candidate Gaussian (2D, ``proj [N,2]`` at the query frame, ``candidates [N]`` bool) of each query
    ``[Q,2]``: indices ``[Q]`` and ``accepted [Q]`` (distance < ``max_dist`` px)."""
    cand = candidates.nonzero(as_tuple=True)[0]
    if cand.numel() == 0:
        return torch.zeros(queries.shape[0], dtype=torch.long), torch.zeros(queries.shape[0], dtype=torch.bool)
    d = torch.cdist(queries, proj[cand])
    dist, j = d.min(1)
    return cand[j], dist < max_dist


def epe(pred: Tensor, gt: Tensor, select: Tensor | None = None) -> float | None:
    """Mean end-point error over the selected (query, frame) pairs; None when none is selected."""
    err = (pred - gt).norm(dim=-1)
    if select is not None:
        err = err[select.bool()]
    return float(err.mean()) if err.numel() else None


def delta_avg(pred: Tensor, gt: Tensor, visible: Tensor, H: int, W: int) -> float | None:
    """TAP-Vid's delta_avg at 256 x 256: the fraction within {1,2,4,8,16} px, averaged, over visible points."""
    s = torch.tensor([256.0 / W, 256.0 / H])
    err = ((pred - gt) * s).norm(dim=-1)[visible.bool()]
    if not err.numel():
        return None
    return float(sum((err < d).float().mean() for d in (1, 2, 4, 8, 16)) / 5)


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return 99.0 if mse <= 1e-10 else -10.0 * math.log10(mse)
