"""PlacidDreamer's Latent-Plane: a 3D-aware plug-in for an 8-view multi-view diffusion UNet.

Spec: ``specs/placiddreamer_dreampolish.md`` sections 2.2, 2.3, 2.6 (properties 10, 11) and 2.7. The
official inference code is ``HansenHuang0823/PlacidDreamer`` ``Latent_Plane/latent_plane_inference_new.py``.
This module was written from reading that file (its module structure, state-dict names and shapes) and
the spec; no code was copied.

What the plug-in does
---------------------
It reads and rewrites the feature map at the output of one UNet up-block (up-block 2: 640 channels at
32x32 for 256-px Zero123 latents). The 8 samples of a batch are 8 fixed cameras on a ring.

* :class:`CoarsePlane` predicts a density. For every pixel ray of every ring view it takes 32 uniform
  samples between the ray's entry into and exit from the cube ``[-0.5, 0.5]^3``. It projects each sample
  into all 8 views and reads their features bilinearly (border padding). It builds 9 tokens: a sigma
  token plus one token per view, where a view token is ``Linear(feat -> 32)``, ``PE(camera position)``
  and ``PE(xyz)``. It applies a LayerNorm and then **one** attention module **twice** (the weights are
  shared, as in the official ``nn.Sequential([attn] * 2)``). Density is read from the sigma token and
  volume-rendered into an occupancy map. :meth:`CoarsePlane.density_grid` evaluates the same network on a
  ``res^3`` grid. :func:`density_to_mesh` turns that grid into a mesh with marching cubes on
  ``softplus(sigma)`` at level 15.
* :class:`FinePlane` runs the same sampling with the full features and shared attention. It outputs
  per-view residual features, volume-renders them with the **coarse** sigma and composites them into the
  feature map: ``f_out = f_in * (1 - occ) + f_rendered``. This is an exact identity where ``occ == 0``.
* :class:`LatentPlane` holds the coarse and fine planes. :meth:`LatentPlane.attach` registers a forward
  hook on ``unet.up_blocks[block_index]`` of any diffusers ``UNet2DConditionModel``.

Conventions (documented choices)
--------------------------------
* **World frame.** The official ring is z-up, azimuth 0 on +x:
  ``eye = 1.5 (cos e cos a, cos e sin a, sin e)``. Our world is y-up with azimuth 0 on +z
  (``studio.cameras``). The map ``ours = (y, z, x)_official`` is a proper rotation (a cyclic
  permutation). It sends official camera ``k`` exactly onto ``orbit_cameras(30, 45 k, 1.5)`` and leaves
  the cube unchanged, so :func:`ring_cameras` builds the ring with ``studio.cameras`` directly. The
  positional encodings of the camera positions and the sample points are **not** rotation invariant.
  They are therefore computed in the official frame (:func:`to_official_frame`,
  ``official = (z, x, y)_ours``), so the official checkpoints see exactly the inputs they were trained on.
* **Intrinsics.** Focal length 280 px and principal point 128 at 256 px, scaled by ``res / 256``. Our
  ``Cameras`` put pixel centres at +0.5, so their ``K`` has ``c = 128 res / 256``. Pixel-*index*
  coordinates (pixel ``i`` has its centre at ``i``, the convention of ``grid_sample(align_corners=True)``
  and of the official code) use ``c - 0.5``: this is the official "-0.5 px shift". Projected points are
  normalised as ``index / (res - 1) * 2 - 1``, so the origin lands on uv = (0, 0) at every resolution.
* **Rays.** Ray directions are not normalised (camera-space z = 1), as in the official code, so the
  sample spacings ``dists`` are in depth units. Rays that miss the cube get ``dists = 0``, hence zero
  weight. (In the official code a missed ray gets swapped near/far bounds and samples outside the cube.)
* **Volume rendering.** ``alpha_i = 1 - exp(-softplus(sigma_i) * dist_i)``. The weights are computed as
  ``T_i - T_{i+1}`` with ``T_i = exp(-sum_{j<i} softplus(sigma_j) dist_j)``. This is mathematically
  ``alpha_i * prod_{j<i}(1 - alpha_j)`` (the official formula without its ``+1e-10``), but it is
  non-negative and sums to ``1 - T_N <= 1`` also in floating point.
* **Voxel grid.** :meth:`CoarsePlane.density_grid` returns raw sigma ``[B, R, R, R]`` on
  ``linspace(-0.5, 0.5, R)^3``, indexed ``[x, y, z]`` in **our y-up frame**. A mesh from it is already
  y-up, so the official y/z swap before the Gaussian initialisation is not needed here. That swap exists
  because the official mesh comes out in the z-up voxel index frame.
  ``mesh_to_gaussian_init(swap_yz=True)`` reproduces it for meshes from z-up sources.
* **Time embedding.** Every plane accepts either ``temb``, the UNet's timestep embedding (``emb`` as
  the up-blocks receive it, ``[N, time_embed_dim]``, which is what the official code feeds), or a scalar
  / per-batch ``t``. A ``t`` is mapped by the sinusoidal ``diffusers`` ``get_timestep_embedding`` to
  ``time_embed_dim`` channels, **without** the UNet's learnt MLP: use ``temb`` with the official weights.
  The official code reads the embedding of the first view of each group of 8, and so do we.
* **Conditional branch only** (official: the plane is passed only to the conditional UNet call). When
  hooked, the plane rewrites groups of 8 samples chosen as follows. If ``LatentPlane.enabled`` is False
  it rewrites nothing. Inside ``with plane.branches(mask)``, it rewrites group ``g`` iff ``mask[g]``.
  Otherwise it follows the diffusers convention: a batch of 8 (a separate conditional call, as in the
  official pipeline) is rewritten, and a batch of ``16 k`` is taken as ``cat([uncond, cond])`` with only
  the second half rewritten. Use ``with plane.disabled():`` around the unconditional call when the
  branches run separately. The official schedule, active in the first 45 of 50 steps, is the caller's
  toggle of ``enabled``.

Reconstructed parts (not in the official release)
-------------------------------------------------
The official training code is not public (spec 2.3 and 2.7). Our losses, the ShapeWorld host features
(:class:`ShapeWorldFeatures`), the novel-view feature rendering of :meth:`FinePlane.render_rays` and the
branch selection above are our reconstruction. The training script is
``scripts/train_latent_plane.py``, and its weights are in ``assets/latent-plane``
(:func:`load_latent_plane`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cameras import Cameras, orbit_cameras

__all__ = [
    "FOCAL_256",
    "PRINCIPAL_256",
    "RING_ELEVATION",
    "RING_N",
    "RING_RADIUS",
    "SHAPEWORLD_CUBE_SCALE",
    "CoarsePlane",
    "FinePlane",
    "LatentPlane",
    "LatentPlaneConfig",
    "ShapeWorldFeatures",
    "camera_rays",
    "composite",
    "density_to_mesh",
    "load_latent_plane",
    "load_official_state_dict",
    "mesh_to_gaussian_init",
    "official_key_map",
    "positional_encoding",
    "project_to_ring",
    "ray_cube_intersection",
    "ring_cameras",
    "ring_index_intrinsics",
    "sample_along_rays",
    "sample_view_features",
    "save_latent_plane",
    "init_from_ring_views",
    "shapeworld_init",
    "shapeworld_ring_features",
    "to_official_frame",
    "volume_render_weights",
]

RING_N = 8
RING_ELEVATION = 30.0
RING_RADIUS = 1.5
FOCAL_256 = 280.0
PRINCIPAL_256 = 128.0
CUBE_HALF = 0.5
#: our ShapeWorld training maps world units into the cube by ``p_cube = 0.5 * p_world``.
#: ShapeWorld objects reach at most 0.9 world units from the origin, hence 0.45 in the cube.
SHAPEWORLD_CUBE_SCALE = 0.5

_REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ geometry

def ring_cameras(resolution: int = 32, *, n: int = RING_N, elevation: float = RING_ELEVATION,
                 radius: float = RING_RADIUS) -> Cameras:
    """The fixed ring as ``studio.cameras.Cameras`` (y-up, OpenCV view matrices, pixel centres at +0.5).

    ``n`` cameras at azimuth ``k * 360 / n``, elevation 30 deg, distance 1.5, looking at the origin. Their
    intrinsics are the official ones, focal 280 and principal point 128 at 256 px, scaled to
    ``resolution``. This is the official z-up ring rotated by ``ours = (y, z, x)_official`` (module doc).
    """
    res = int(resolution)
    if res < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    cams = orbit_cameras(elevation, az, radius, 45.0, res, res)
    s = res / 256.0
    K = torch.zeros(n, 3, 3)
    K[:, 0, 0] = K[:, 1, 1] = FOCAL_256 * s
    K[:, 0, 2] = K[:, 1, 2] = PRINCIPAL_256 * s
    K[:, 2, 2] = 1.0
    return Cameras(cams.viewmats, K, res, res)


def ring_index_intrinsics(resolution: int) -> Tensor:
    """Official-style ``K [3,3]`` in pixel-*index* coordinates: the ring ``K`` shifted by -0.5 px."""
    s = resolution / 256.0
    return torch.tensor([[FOCAL_256 * s, 0.0, PRINCIPAL_256 * s - 0.5],
                         [0.0, FOCAL_256 * s, PRINCIPAL_256 * s - 0.5],
                         [0.0, 0.0, 1.0]])


def to_official_frame(p: Tensor) -> Tensor:
    """Our y-up coordinates -> the official z-up frame: ``(x, y, z)_official = (z, x, y)_ours``."""
    return p[..., [2, 0, 1]]


def positional_encoding(x: Tensor, n_freqs: int = 10) -> Tensor:
    """NeRF positional encoding in the official order ``[x, sin(f0 x), cos(f0 x), sin(f1 x), ...]`` with
    ``f_k = 2^k``, ``k = 0 .. n_freqs - 1`` (3 + 6 n_freqs channels, 63 for 10 frequencies)."""
    out = [x]
    for k in range(n_freqs):
        f = 2.0 ** k
        out.append(torch.sin(x * f))
        out.append(torch.cos(x * f))
    return torch.cat(out, dim=-1)


def ray_cube_intersection(rays_o: Tensor, rays_d: Tensor, half: float = CUBE_HALF) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test against ``[-half, half]^3``: ``near [...]``, ``far [...]`` (ray parameter units) and
    ``hit [...]`` (bool). For missed rays ``near == far``, so their samples get zero spacing.
    (:func:`studio.render.volume.ray_aabb` with a centred cube.)"""
    from .render.volume import ray_aabb

    return ray_aabb(rays_o, rays_d, float(half))


def camera_rays(cams: Cameras) -> tuple[Tensor, Tensor]:
    """Per-pixel rays of ``cams`` (row-major pixels): ``rays_o, rays_d [C, H*W, 3]`` in world
    coordinates. The directions are unnormalised with camera-space z = 1, as in the official
    ``gen_rays``, and pass through the pixel centres (+0.5 convention of ``Cameras``).
    (:func:`studio.render.volume.rays_from_cameras` with ``normalize=False``, pixels flattened.)"""
    from .render.volume import rays_from_cameras

    o, d = rays_from_cameras(cams, normalize=False)
    return o.reshape(len(cams), -1, 3).contiguous(), d.reshape(len(cams), -1, 3).contiguous()


def sample_along_rays(rays_o: Tensor, rays_d: Tensor, n_samples: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """``n_samples`` uniform samples from cube entry to exit (``linspace`` including both ends, as the
    official code does): ``pts [..., S, 3]``, ``dists [..., S]`` (the last spacing repeated; 0 for rays
    that miss) and ``hit [...]``."""
    near, far, hit = ray_cube_intersection(rays_o, rays_d)
    u = torch.linspace(0.0, 1.0, n_samples, device=rays_o.device, dtype=rays_o.dtype)
    z = near[..., None] + (far - near)[..., None] * u
    dists = z[..., 1:] - z[..., :-1]
    dists = torch.cat([dists, dists[..., -1:]], dim=-1)
    dists = dists * hit[..., None].to(dists.dtype)
    pts = rays_o[..., None, :] + rays_d[..., None, :] * z[..., None]
    return pts, dists, hit


def project_to_ring(pts: Tensor, resolution: int, ring: Cameras | None = None) -> Tensor:
    """Project world points ``[P,3]`` into the ring views: ``grid_sample`` coordinates ``[V, P, 2]``
    (align_corners=True, (-1,-1) the centre of the top-left pixel). The origin maps to (0, 0)."""
    ring = ring_cameras(resolution) if ring is None else ring
    V = ring.viewmats.to(pts)
    pc = pts[None] @ V[:, :3, :3].transpose(-1, -2) + V[:, None, :3, 3]
    K = ring_index_intrinsics(resolution).to(pts)
    z = pc[..., 2:3].clamp_min(1e-6)
    u = pc[..., 0:1] / z * K[0, 0] + K[0, 2]
    v = pc[..., 1:2] / z * K[1, 1] + K[1, 2]
    return torch.cat([u, v], dim=-1) / (resolution - 1) * 2.0 - 1.0


def sample_view_features(feats: Tensor, pts: Tensor, ring: Cameras | None = None) -> Tensor:
    """Bilinear features of ``pts [P,3]`` in every ring view (border padding): ``feats [B,V,C,H,W]`` ->
    ``[B, P, V, C]``."""
    B, Vn, C, H, W = feats.shape
    if H != W:
        raise ValueError(f"the ring feature maps must be square, got {H}x{W}")
    grid = project_to_ring(pts.to(feats.dtype), W, ring)  # [V,P,2]
    x = feats.permute(1, 0, 2, 3, 4).reshape(Vn, B * C, H, W)
    s = F.grid_sample(x, grid[:, None], mode="bilinear", padding_mode="border", align_corners=True)  # [V,BC,1,P]
    return s[:, :, 0].reshape(Vn, B, C, -1).permute(1, 3, 0, 2)


def volume_render_weights(sigma: Tensor, dists: Tensor) -> Tensor:
    """Rendering weights ``[..., S]`` from raw densities (softplus-activated) and spacings ``[..., S]``:
    ``w_i = T_i - T_{i+1}``, ``T_i = exp(-sum_{j<i} softplus(sigma_j) dist_j)``. Non-negative, and they
    sum to ``1 - T_S <= 1``."""
    tau = F.softplus(sigma) * dists
    cum = torch.cumsum(tau, dim=-1)
    T_next = torch.exp(-cum)
    T = torch.cat([torch.ones_like(T_next[..., :1]), T_next[..., :-1]], dim=-1)
    return (T - T_next).clamp_min(0.0)


def composite(f_in: Tensor, occ: Tensor, rendered: Tensor) -> Tensor:
    """``f_out = f_in * (1 - occ) + rendered``: exactly ``f_in`` where ``occ == 0`` and ``rendered == 0``."""
    return f_in * (1 - occ) + rendered


def _time_features(temb: Tensor | None, t, batch: int, dim: int, device, dtype) -> Tensor:
    """Per-batch time embedding ``[batch, dim]`` from the UNet's ``temb`` (``[batch * 8, dim]`` or
    ``[batch, dim]``; first view of each group) or from a scalar / ``[batch]`` ``t`` (sinusoidal)."""
    if temb is not None:
        if temb.dim() != 2 or temb.shape[-1] != dim:
            raise ValueError(f"temb must have shape [N, {dim}] (the UNet's time embedding), got {tuple(temb.shape)}")
        if temb.shape[0] == batch * RING_N:
            temb = temb.reshape(batch, RING_N, dim)[:, 0]
        elif temb.shape[0] == 1:
            temb = temb.expand(batch, dim)
        elif temb.shape[0] != batch:
            raise ValueError(f"temb has {temb.shape[0]} rows; expected {batch * RING_N}, {batch} or 1")
        return temb.to(device=device, dtype=dtype)
    from diffusers.models.embeddings import get_timestep_embedding

    tt = torch.zeros(batch) if t is None else torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    if tt.numel() == 1:
        tt = tt.expand(batch)
    if tt.numel() != batch:
        raise ValueError(f"t must be a scalar or have {batch} entries, got {tt.numel()}")
    emb = get_timestep_embedding(tt.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return emb.to(device=device, dtype=dtype)


def _check_feats(feats: Tensor, feat_dim: int) -> tuple[int, int, int]:
    if feats.dim() != 5 or feats.shape[1] != RING_N or feats.shape[2] != feat_dim:
        raise ValueError(f"features must have shape [B, {RING_N}, {feat_dim}, H, W], got {tuple(feats.shape)}")
    if feats.shape[-1] != feats.shape[-2]:
        raise ValueError(f"feature maps must be square, got {feats.shape[-2]}x{feats.shape[-1]}")
    return feats.shape[0], feats.shape[-2], feats.shape[-1]


def _shared_attention(dim: int, heads: int, dim_head: int) -> nn.Module:
    from diffusers.models.attention_processor import Attention

    return Attention(query_dim=dim, heads=heads, dim_head=dim_head, residual_connection=True)


# ------------------------------------------------------------------------------------------- planes

class CoarsePlane(nn.Module):
    """Density network of the Latent-Plane (official ``LatentPlane_Coarse``).

    The defaults are the official shapes: 640-d features, a 1280-d UNet time embedding, a 32-d latent
    feature, 10 PE frequencies (token width ``32 + 2 * 63 = 158``), attention with 8 heads of 8
    channels, applied ``n_layers = 2`` times with shared weights, and 32 samples per ray.
    """

    def __init__(self, feat_dim: int = 640, time_embed_dim: int = 1280, *, latent_dim: int = 32,
                 time_dim: int = 32, heads: int = 8, dim_head: int = 8, n_freqs: int = 10, n_layers: int = 2,
                 n_samples: int = 32, grid_size: int = 64, chunk: int = 32768):
        super().__init__()
        self.config = dict(feat_dim=feat_dim, time_embed_dim=time_embed_dim, latent_dim=latent_dim,
                           time_dim=time_dim, heads=heads, dim_head=dim_head, n_freqs=n_freqs, n_layers=n_layers,
                           n_samples=n_samples, grid_size=grid_size, chunk=chunk)
        self.feat_dim, self.time_embed_dim, self.n_freqs = feat_dim, time_embed_dim, n_freqs
        self.n_layers, self.n_samples, self.grid_size, self.chunk = n_layers, n_samples, grid_size, chunk
        pe = 3 + 6 * n_freqs
        self.width = latent_dim + 2 * pe
        self.feature_proj = nn.Linear(feat_dim, latent_dim)          # official latent_feature_ln
        self.time_proj = nn.Linear(time_embed_dim, time_dim)         # official time_feature_ln
        self.sigma_token = nn.Parameter(torch.randn(latent_dim))     # official sigma_embeddings
        self.sigma_query = nn.Linear(latent_dim + time_dim, self.width)  # official sigma_query_ln
        self.norm = nn.LayerNorm(self.width)                         # official transformer_layer_norm
        self.attn = _shared_attention(self.width, heads, dim_head)   # official transformer.0 (== .1)
        self.sigma_head = nn.Linear(self.width, 1)                   # official sigma_net
        ring = ring_cameras(32)
        self.register_buffer("cam_pe", positional_encoding(to_official_frame(ring.centers), n_freqs),
                             persistent=False)

    # -- internals -----------------------------------------------------------------------------------------
    def time_features(self, batch: int, temb: Tensor | None = None, t=None) -> Tensor:
        dev, dt = self.sigma_token.device, self.sigma_token.dtype
        return _time_features(temb, t, batch, self.time_embed_dim, dev, dt)

    def _sigma_query(self, tfeat: Tensor) -> Tensor:
        tok = torch.cat([self.sigma_token[None].expand(tfeat.shape[0], -1), self.time_proj(tfeat)], dim=-1)
        return self.sigma_query(tok)  # [B, width]

    def point_sigma(self, proj_feats: Tensor, pts: Tensor, query: Tensor) -> Tensor:
        """Raw density at world points ``pts [P,3]``. ``proj_feats [B,V,latent,H,W]`` are the features
        after :attr:`feature_proj` and ``query [B, width]`` is the sigma token. Returns ``[B, P]``."""
        B = proj_feats.shape[0]
        out = []
        for s in range(0, pts.shape[0], max(1, self.chunk // max(B, 1))):
            p = pts[s: s + max(1, self.chunk // max(B, 1))]
            P = p.shape[0]
            f = sample_view_features(proj_feats, p)  # [B,P,V,L]
            xyz = positional_encoding(to_official_frame(p), self.n_freqs).to(f.dtype)
            tok = torch.cat([f, self.cam_pe.to(f.dtype)[None, None].expand(B, P, -1, -1),
                             xyz[None, :, None].expand(B, P, RING_N, -1)], dim=-1)
            tok = torch.cat([query[:, None, None].expand(B, P, 1, -1).to(f.dtype), tok], dim=2)
            x = self.norm(tok.reshape(B * P, RING_N + 1, self.width))
            for _ in range(self.n_layers):
                x = self.attn(x)
            out.append(self.sigma_head(x[:, 0]).reshape(B, P))
        return torch.cat(out, dim=1)

    def project(self, feats: Tensor) -> Tensor:
        """``Linear(feat -> latent)`` on the feature maps ``[B,V,C,H,W]`` (it commutes with bilinear
        sampling, so it is applied before sampling, as in the official code)."""
        return self.feature_proj(feats.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)

    # -- public --------------------------------------------------------------------------------------------
    def render_rays(self, feats: Tensor, rays_o: Tensor, rays_d: Tensor, *, temb: Tensor | None = None,
                    t=None) -> dict[str, Tensor]:
        """Occupancy of arbitrary rays ``rays_o, rays_d [R,3]`` (unnormalised directions, world frame):
        ``occ [B,R]``, ``sigma [B,R,S]`` (raw), ``weights [B,R,S]``, ``dists [R,S]``, ``pts [R,S,3]``."""
        B, _, _ = _check_feats(feats, self.feat_dim)
        feats = feats.to(self.sigma_token.dtype)
        pts, dists, _ = sample_along_rays(rays_o.to(feats), rays_d.to(feats), self.n_samples)
        R, S = dists.shape
        query = self._sigma_query(self.time_features(B, temb, t))
        sigma = self.point_sigma(self.project(feats), pts.reshape(-1, 3), query).reshape(B, R, S)
        w = volume_render_weights(sigma, dists[None])
        return {"occ": w.sum(-1), "sigma": sigma, "weights": w, "dists": dists, "pts": pts}

    def forward(self, feats: Tensor, temb: Tensor | None = None, t=None, views: Sequence[int] | None = None
                ) -> dict[str, Tensor]:
        """Render the ring views ``views`` (default all 8) at the feature resolution: ``occ [B,V',1,H,W]``,
        ``sigma [B,V',H*W,S]``, ``dists [V',H*W,S]``."""
        B, H, W = _check_feats(feats, self.feat_dim)
        views = list(range(RING_N)) if views is None else list(views)
        ro, rd = camera_rays(ring_cameras(W))
        ro, rd = ro[views].reshape(-1, 3), rd[views].reshape(-1, 3)
        r = self.render_rays(feats, ro, rd, temb=temb, t=t)
        V = len(views)
        return {"occ": r["occ"].reshape(B, V, 1, H, W), "sigma": r["sigma"].reshape(B, V, H * W, -1),
                "weights": r["weights"].reshape(B, V, H * W, -1), "dists": r["dists"].reshape(V, H * W, -1)}

    def density_grid(self, feats: Tensor, temb: Tensor | None = None, t=None, res: int | None = None) -> Tensor:
        """Raw sigma on ``linspace(-0.5, 0.5, res)^3`` (default ``grid_size`` = 64), ``[B,res,res,res]``,
        indexed ``[x, y, z]`` in our y-up frame."""
        B, _, _ = _check_feats(feats, self.feat_dim)
        res = self.grid_size if res is None else int(res)
        feats = feats.to(self.sigma_token.dtype)
        g = torch.linspace(-CUBE_HALF, CUBE_HALF, res, device=feats.device, dtype=feats.dtype)
        pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
        query = self._sigma_query(self.time_features(B, temb, t))
        return self.point_sigma(self.project(feats), pts, query).reshape(B, res, res, res)


class FinePlane(nn.Module):
    """Feature network of the Latent-Plane (official ``LatentPlane_Fine``).

    The tokens are one per view, ``[feature (C), PE(camera), PE(xyz)]`` (width ``640 + 126 = 766``
    officially). A LayerNorm is followed by one attention module (8 heads of 32 channels) applied twice.
    The first ``C`` channels of the output are a residual added to each view's sampled feature. A ray of
    view ``i`` renders view ``i``'s residual-corrected features with the coarse sigma.
    """

    def __init__(self, feat_dim: int = 640, *, heads: int = 8, dim_head: int = 32, n_freqs: int = 10,
                 n_layers: int = 2, n_samples: int = 32, chunk: int = 32768):
        super().__init__()
        self.config = dict(feat_dim=feat_dim, heads=heads, dim_head=dim_head, n_freqs=n_freqs, n_layers=n_layers,
                           n_samples=n_samples, chunk=chunk)
        self.feat_dim, self.n_freqs, self.n_layers, self.n_samples, self.chunk = (feat_dim, n_freqs, n_layers,
                                                                                  n_samples, chunk)
        self.width = feat_dim + 2 * (3 + 6 * n_freqs)
        self.norm = nn.LayerNorm(self.width)                        # official transformer_layer_norm
        self.attn = _shared_attention(self.width, heads, dim_head)  # official transformer.0 (== .1)
        ring = ring_cameras(32)
        self.register_buffer("cam_pe", positional_encoding(to_official_frame(ring.centers), n_freqs),
                             persistent=False)
        self.register_buffer("cam_dirs", ring.centers / ring.centers.norm(dim=-1, keepdim=True), persistent=False)

    def point_features(self, feats: Tensor, pts: Tensor, view_weights: Tensor) -> Tensor:
        """Residual-corrected features at ``pts [P,3]`` mixed over the views with ``view_weights [P,V]``
        (one-hot for a ring ray: view ``i`` reads its own token, as in the official code): ``[B,P,C]``."""
        B = feats.shape[0]
        out = []
        step = max(1, self.chunk // max(B, 1))
        for s in range(0, pts.shape[0], step):
            p, vw = pts[s: s + step], view_weights[s: s + step].to(feats.dtype)
            P = p.shape[0]
            f = sample_view_features(feats, p)  # [B,P,V,C]
            xyz = positional_encoding(to_official_frame(p), self.n_freqs).to(f.dtype)
            tok = torch.cat([f, self.cam_pe.to(f.dtype)[None, None].expand(B, P, -1, -1),
                             xyz[None, :, None].expand(B, P, RING_N, -1)], dim=-1)
            x = self.norm(tok.reshape(B * P, RING_N, self.width))
            for _ in range(self.n_layers):
                x = self.attn(x)
            corrected = f + x[..., :self.feat_dim].reshape(B, P, RING_N, self.feat_dim)
            out.append((corrected * vw[None, :, :, None]).sum(2))
        return torch.cat(out, dim=1)

    def forward(self, feats: Tensor, sigma: Tensor, views: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Rewrite the ring views ``views`` (default all). ``sigma [B,V',H*W,S]`` is the coarse raw density
        of those views' rays. Returns ``sample [B,V',C,H,W]`` (composited), ``rendered`` and ``occ``."""
        B, H, W = _check_feats(feats, self.feat_dim)
        views = list(range(RING_N)) if views is None else list(views)
        V = len(views)
        ro, rd = camera_rays(ring_cameras(W))
        pts, dists, _ = sample_along_rays(ro[views].to(feats), rd[views].to(feats), self.n_samples)  # [V,HW,S,*]
        S = dists.shape[-1]
        if sigma.shape != (B, V, H * W, S):
            raise ValueError(f"sigma must have shape {(B, V, H * W, S)}, got {tuple(sigma.shape)}")
        w = volume_render_weights(sigma.to(feats.dtype), dists[None])  # [B,V,HW,S]
        onehot = F.one_hot(torch.as_tensor(views, device=feats.device), RING_N)  # [V,8]
        vw = onehot[:, None, None, :].expand(V, H * W, S, RING_N).reshape(-1, RING_N)
        own = self.point_features(feats, pts.reshape(-1, 3), vw).reshape(B, V, H * W, S, self.feat_dim)
        rendered = (w[..., None] * own).sum(-2)  # [B,V,HW,C]
        occ = w.sum(-1)
        rendered = rendered.permute(0, 1, 3, 2).reshape(B, V, self.feat_dim, H, W)
        occ = occ.reshape(B, V, 1, H, W)
        f_in = feats[:, views]
        return {"sample": composite(f_in, occ, rendered), "rendered": rendered, "occ": occ}

    def render_rays(self, feats: Tensor, rays_o: Tensor, rays_d: Tensor, sigma: Tensor, *,
                    views: Tensor | None = None, sharpness: float = 10.0) -> dict[str, Tensor]:
        """Features rendered along arbitrary rays ``[R,3]`` with the coarse ``sigma [B,R,S]``. Returns
        ``rendered [B,R,C]`` and ``occ [B,R]``. ``views [R]`` (ring view index per ray) reads that view's
        token, as :meth:`forward` does. A novel view (``views=None``) has no token of its own, so each ray
        blends the 8 views' corrected features with ``softmax(sharpness * cos(ray origin, ring
        camera))``. This is our reconstruction, used for the held-out-view training loss."""
        B, _, _ = _check_feats(feats, self.feat_dim)
        pts, dists, _ = sample_along_rays(rays_o.to(feats), rays_d.to(feats), self.n_samples)
        R, S = dists.shape
        w = volume_render_weights(sigma.to(feats.dtype), dists[None])  # [B,R,S]
        if views is not None:
            vw = F.one_hot(torch.as_tensor(views, device=feats.device).long(), RING_N).to(feats.dtype)
        else:
            o = rays_o.to(feats) / rays_o.to(feats).norm(dim=-1, keepdim=True).clamp_min(1e-9)
            vw = torch.softmax(sharpness * (o @ self.cam_dirs.to(feats).T), dim=-1)  # [R,V]
        vw = vw[:, None].expand(R, S, RING_N).reshape(-1, RING_N)
        f = self.point_features(feats, pts.reshape(-1, 3), vw).reshape(B, R, S, self.feat_dim)
        return {"rendered": (w[..., None] * f).sum(-2), "occ": w.sum(-1)}


class LatentPlane(nn.Module):
    """Coarse + fine planes acting on a batch of ``8 k`` feature maps (groups of 8 ring views).

    ``forward(sample [N,C,H,W], temb=None, t=None)`` returns ``sample`` (rewritten), ``occ [N,1,H,W]``
    and ``sigma [N,H*W,S]``. :meth:`attach` hooks it into a diffusers UNet (see the module doc for the
    branch selection). After each hooked call, :attr:`last` holds ``occ``, ``sigma``, ``groups`` and,
    with ``record_grid=True``, ``voxel_sigma [G,R,R,R]`` for the mesh.
    """

    def __init__(self, coarse: CoarsePlane, fine: FinePlane | None = None):
        super().__init__()
        if fine is not None and fine.feat_dim != coarse.feat_dim:
            raise ValueError(f"coarse and fine planes disagree on feat_dim ({coarse.feat_dim} vs {fine.feat_dim})")
        if fine is not None and fine.n_samples != coarse.n_samples:
            raise ValueError("coarse and fine planes must use the same number of samples per ray")
        self.coarse, self.fine = coarse, fine
        self.enabled = True
        self.record_grid = False
        self.grid_res: int | None = None
        self.last: dict[str, Any] = {}
        self._mask: list[bool] | None = None
        self._handle = None
        self._unet_ref = None

    @property
    def feat_dim(self) -> int:
        return self.coarse.feat_dim

    def forward(self, sample: Tensor, temb: Tensor | None = None, t=None) -> dict[str, Tensor]:
        N, C, H, W = sample.shape
        if N % RING_N != 0:
            raise ValueError(f"the Latent-Plane needs groups of {RING_N} views; got a batch of {N}")
        if C != self.feat_dim:
            raise ValueError(f"the Latent-Plane expects {self.feat_dim}-channel features, got {C}")
        B = N // RING_N
        dtype = self.coarse.sigma_token.dtype
        feats = sample.reshape(B, RING_N, C, H, W).to(dtype)
        c = self.coarse(feats, temb=temb, t=t)
        if self.fine is not None:
            out = self.fine(feats, c["sigma"])["sample"]
        else:
            out = feats
        return {"sample": out.reshape(N, C, H, W).to(sample.dtype), "occ": c["occ"].reshape(N, 1, H, W),
                "sigma": c["sigma"].reshape(N, H * W, -1), "feats": feats}

    # -- branch selection ----------------------------------------------------------------------------------
    def group_mask(self, n_groups: int) -> list[bool]:
        """Which groups of 8 the hook rewrites (module doc)."""
        if not self.enabled:
            return [False] * n_groups
        if self._mask is not None:
            if len(self._mask) != n_groups:
                raise ValueError(f"branch mask has {len(self._mask)} entries but the batch has {n_groups} groups of 8")
            return list(self._mask)
        if n_groups == 1:
            return [True]
        if n_groups % 2 == 0:  # diffusers CFG layout: cat([uncond, cond])
            return [False] * (n_groups // 2) + [True] * (n_groups // 2)
        raise ValueError(f"cannot tell the conditional branch in a batch of {n_groups} groups of 8; "
                         "wrap the call in `with plane.branches(mask):`")

    @contextlib.contextmanager
    def branches(self, mask: Sequence[bool]) -> Iterator[LatentPlane]:
        """Rewrite exactly the groups of 8 with ``mask[g]`` True during the block."""
        old = self._mask
        self._mask = [bool(m) for m in mask]
        try:
            yield self
        finally:
            self._mask = old

    @contextlib.contextmanager
    def disabled(self) -> Iterator[LatentPlane]:
        """Rewrite nothing during the block (e.g. around the unconditional UNet call)."""
        old = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = old

    # -- hooking -------------------------------------------------------------------------------------------
    def _hook(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        N = hidden.shape[0]
        if N % RING_N != 0:
            raise ValueError(f"the Latent-Plane hook needs a batch of 8 k samples (8 ring views), got {N}")
        G = N // RING_N
        mask = self.group_mask(G)
        self.last = {}
        if not any(mask):
            return None
        temb = kwargs.get("temb", args[1] if len(args) > 1 else None)
        _, C, H, W = hidden.shape
        m = torch.tensor(mask, device=hidden.device)
        x = hidden.reshape(G, RING_N, C, H, W)[m].reshape(-1, C, H, W)
        te = None
        if temb is not None:
            te = temb.reshape(G, RING_N, -1)[m].reshape(-1, temb.shape[-1]) if temb.shape[0] == N else temb[:1]
        res = self.forward(x, temb=te)
        new = hidden.clone().reshape(G, RING_N, C, H, W)
        new[m] = res["sample"].reshape(-1, RING_N, C, H, W).to(new.dtype)
        new = new.reshape(N, C, H, W)
        self.last = {"occ": res["occ"], "sigma": res["sigma"], "groups": mask}
        if self.record_grid:
            self.last["voxel_sigma"] = self.coarse.density_grid(res["feats"], temb=te, res=self.grid_res)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        return new

    def attach(self, unet: nn.Module, block_index: int = 2) -> LatentPlane:
        """Hook into ``unet.up_blocks[block_index]`` (forward hook with kwargs, so the block's ``temb`` is
        read). Any diffusers ``UNet2DConditionModel`` works; its block's output channels must equal
        ``feat_dim``. Re-attaching first detaches."""
        self.detach()
        blocks = getattr(unet, "up_blocks", None)
        if blocks is None or not (-len(blocks) <= block_index < len(blocks)):
            n = 0 if blocks is None else len(blocks)
            raise ValueError(f"the UNet has {n} up_blocks; block_index {block_index} is out of range")
        self._handle = blocks[block_index].register_forward_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove the hook; the UNet is then exactly as before ``attach``."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None


# ------------------------------------------------------------------------------------ mesh and init

def density_to_mesh(grid: Tensor | np.ndarray, level: float = 15.0, *, half: float = CUBE_HALF,
                    activation: str = "softplus"):
    """Marching cubes on ``softplus(grid)`` at ``level`` -> ``trimesh.Trimesh`` in world coordinates.

    ``grid [R,R,R]`` (or ``[1,R,R,R]``) holds raw sigma on ``linspace(-half, half, R)^3`` indexed
    ``[x, y, z]`` (:meth:`CoarsePlane.density_grid`). ``activation="none"`` thresholds the grid as
    given. A ``ValueError`` says so when the level lies outside the grid's range (no surface)."""
    import trimesh
    from skimage.measure import marching_cubes

    g = torch.as_tensor(grid).detach().float().cpu()
    if g.dim() == 4 and g.shape[0] == 1:
        g = g[0]
    if g.dim() != 3 or len(set(g.shape)) != 1:
        raise ValueError(f"grid must be a cube [R,R,R], got {tuple(g.shape)}")
    if activation == "softplus":
        g = F.softplus(g)
    elif activation != "none":
        raise ValueError(f"activation must be 'softplus' or 'none', got {activation!r}")
    vol = g.numpy()
    lo, hi = float(vol.min()), float(vol.max())
    if not lo < level < hi:
        raise ValueError(f"no surface at level {level}: the density ranges over [{lo:.3g}, {hi:.3g}]")
    R = vol.shape[0]
    step = 2 * half / (R - 1)
    verts, faces, normals, _ = marching_cubes(vol, level=level, spacing=(step, step, step))
    verts = verts - half
    # skimage's vertex normals already point towards low density (outwards) but its faces wind inwards for
    # a density that grows inside: flip the winding so face and vertex normals agree.
    return trimesh.Trimesh(verts, np.ascontiguousarray(faces[:, ::-1]), vertex_normals=normals, process=False)


def mesh_to_gaussian_init(mesh, n_points: int = 100_000, seed: int = 0, *, anisotropic: bool = False,
                          normalize: bool = True, world_size: float = 1.0, swap_yz: bool = False,
                          opacity: float = 0.1, sh_degree: int = 0, rgb=None):
    """Gaussian initialisation from a mesh, as in PlacidDreamer's ``init_shape: latent_plane``.

    * ``n_points`` samples drawn area-uniformly on the surface (seeded).
    * ``normalize`` with uniform scaling (default): centre the bounding box and divide by the **largest**
      extent, so that extent spans exactly ``[-0.5, 0.5]`` and the aspect ratio is kept. With
      ``anisotropic=True`` each axis is min-max normalised on its own to ``[-0.5, 0.5]``. That is the
      official behaviour, which stretches thin objects into a cube (spec 2.7).
    * Then the points are multiplied by ``world_size``: the largest extent becomes ``world_size``. With
      ``normalize=False`` the mesh frame is kept and only scaled by ``world_size``. For a ShapeWorld
      plane use ``world_size = 1 / SHAPEWORLD_CUBE_SCALE`` to get back world units.
    * ``swap_yz``: the official y/z swap. It is only needed for meshes in a z-up frame, because our
      density grids, and hence :func:`density_to_mesh`, are already y-up.
    * Opacity ``opacity`` (0.1). Isotropic scale ``log(sqrt(mean squared distance to the 3 nearest
      neighbours))`` (scipy ``cKDTree``). Identity rotations. Colour ``rgb`` (``[3]`` / ``[N,3]``),
      grey by default. SH degree ``sh_degree``.

    Returns a ``studio.students.gaussians.GaussianModel``.
    """
    from scipy.spatial import cKDTree

    from .students.gaussians import GaussianModel, num_sh_bases, rgb_to_sh

    if hasattr(mesh, "vertices") and hasattr(mesh, "faces"):
        V, Fc = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    else:
        V, Fc = (np.asarray(a) for a in mesh)
        V, Fc = V.astype(np.float64), Fc.astype(np.int64)
    if V.ndim != 2 or V.shape[1] != 3 or Fc.ndim != 2 or Fc.shape[1] != 3 or len(Fc) == 0:
        raise ValueError("mesh must be a trimesh.Trimesh or (vertices [V,3], faces [F,3]) with F >= 1")
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    rng = np.random.default_rng(int(seed))
    v0, v1, v2 = V[Fc[:, 0]], V[Fc[:, 1]], V[Fc[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(v1 - v0, v2 - v0), axis=1)
    if not area.sum() > 0:
        raise ValueError("the mesh has zero surface area")
    fi = rng.choice(len(Fc), size=n_points, p=area / area.sum())
    r1, r2 = rng.random((n_points, 1)), rng.random((n_points, 1))
    s1 = np.sqrt(r1)
    pts = (1 - s1) * v0[fi] + s1 * (1 - r2) * v1[fi] + s1 * r2 * v2[fi]
    if normalize:
        lo, hi = pts.min(0), pts.max(0)
        ext = hi - lo
        if anisotropic:
            pts = (pts - lo) / np.where(ext > 0, ext, 1.0) - 0.5
        else:
            pts = (pts - (lo + hi) / 2) / max(float(ext.max()), 1e-12)
    pts = pts * float(world_size)
    if swap_yz:
        pts = pts[:, [0, 2, 1]]
    d, _ = cKDTree(pts).query(pts, k=4)
    msd = (d[:, 1:] ** 2).mean(1)
    scale = np.log(np.sqrt(np.maximum(msd, 1e-14)))
    n = n_points
    col = torch.full((n, 3), 0.5) if rgb is None else torch.as_tensor(np.asarray(rgb), dtype=torch.float32).expand(n, 3)
    K = num_sh_bases(sh_degree)
    params = {
        "means": torch.as_tensor(pts, dtype=torch.float32),
        "scales": torch.as_tensor(scale, dtype=torch.float32)[:, None].repeat(1, 3),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "opacities": torch.full((n,), math.log(opacity / (1 - opacity))),
        "sh0": rgb_to_sh(col.clone())[:, None, :],
        "shN": torch.zeros(n, K - 1, 3),
    }
    return GaussianModel(params, sh_degree, metadata={"init": "latent_plane", "anisotropic": bool(anisotropic)})


# ------------------------------------------------------------------------------- official checkpoints

def official_key_map(kind: str) -> dict[str, str]:
    """Official ``coarse_*.pt`` / ``fine_*.pt`` key prefix -> our prefix (``kind`` "coarse" or "fine").
    The official shared attention appears twice (``transformer.0`` and ``transformer.1``, the same
    tensors), and both map to our single ``attn``."""
    if kind == "coarse":
        return {"latent_feature_ln.": "feature_proj.", "time_feature_ln.": "time_proj.",
                "sigma_embeddings": "sigma_token", "sigma_query_ln.": "sigma_query.",
                "transformer_layer_norm.": "norm.", "transformer.0.": "attn.", "transformer.1.": "attn.",
                "sigma_net.": "sigma_head."}
    if kind == "fine":
        return {"transformer_layer_norm.": "norm.", "transformer.0.": "attn.", "transformer.1.": "attn."}
    raise ValueError(f"kind must be 'coarse' or 'fine', got {kind!r}")


def _convert_official(state_dict: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    table = official_key_map(kind)
    out: dict[str, Tensor] = {}
    for key, val in state_dict.items():
        k = key.removeprefix("module.")
        for src, dst in table.items():
            if k == src or (src.endswith(".") and k.startswith(src)):
                new = dst + k[len(src):]
                if new in out:
                    if out[new].shape != val.shape or not torch.equal(out[new], val.to(out[new])):
                        raise ValueError(f"official {kind} checkpoint: {key} differs from its shared twin; "
                                         "the two attention layers must share weights")
                else:
                    out[new] = val
                break
        else:
            out[k] = val  # unknown key: left for load_state_dict(strict=...) to report
    return out


def load_official_state_dict(module: nn.Module, state_dict, strict: bool = True):
    """Load official PlacidDreamer weights into our modules.

    * ``module`` a :class:`CoarsePlane` with ``state_dict`` from ``coarse_21500.pt``, or
    * a :class:`FinePlane` with ``fine_8100.pt``, or
    * a :class:`LatentPlane` with ``{"coarse": ..., "fine": ...}`` or a ``(coarse, fine)`` pair.

    The official modules must be built with their shapes: ``CoarsePlane(640, 1280)``,
    ``FinePlane(640)`` (our defaults). A "module." prefix (DataParallel) is stripped. Returns
    ``load_state_dict``'s result (or a dict of them for a ``LatentPlane``).
    """
    if isinstance(module, LatentPlane):
        if isinstance(state_dict, Mapping) and "coarse" in state_dict:
            c, f = state_dict["coarse"], state_dict.get("fine")
        else:
            c, f = state_dict
        res = {"coarse": load_official_state_dict(module.coarse, c, strict)}
        if f is not None:
            if module.fine is None:
                raise ValueError("a fine state dict was given but the LatentPlane has no fine plane")
            res["fine"] = load_official_state_dict(module.fine, f, strict)
        return res
    if isinstance(module, CoarsePlane):
        kind = "coarse"
    elif isinstance(module, FinePlane):
        kind = "fine"
    else:
        raise TypeError(f"expected CoarsePlane, FinePlane or LatentPlane, got {type(module).__name__}")
    return module.load_state_dict(_convert_official(state_dict, kind), strict=strict)


# -------------------------------------------------------------------- ShapeWorld host features & assets

class ShapeWorldFeatures(nn.Module):
    """Host features for ShapeWorld (our reconstruction; the embedded default has no multi-view UNet).

    The input is ring-view images ``[..., 3, H, W]`` in [0,1] on white. The output is ``3 + n_random``
    channels: the RGB itself, then ``tanh`` of a fixed random 3x3 convolution of ``rgb - 1`` (zero on
    the white background), which gives edge and colour-contrast channels. The weights come from
    ``seed``, are frozen, and are saved with the plane.
    """

    def __init__(self, n_random: int = 5, seed: int = 0):
        super().__init__()
        self.n_random, self.seed = int(n_random), int(seed)
        g = torch.Generator().manual_seed(self.seed)
        self.register_buffer("weight", torch.randn(self.n_random, 3, 3, 3, generator=g) / 3.0)

    @property
    def feat_dim(self) -> int:
        return 3 + self.n_random

    def forward(self, rgb: Tensor) -> Tensor:
        lead = rgb.shape[:-3]
        x = rgb.reshape(-1, *rgb.shape[-3:]).float()
        if self.n_random == 0:
            return x.reshape(*lead, 3, *x.shape[-2:])
        r = torch.tanh(F.conv2d(F.pad(x - 1.0, (1, 1, 1, 1), mode="replicate"), self.weight.to(x)))
        return torch.cat([x, r], dim=1).reshape(*lead, self.feat_dim, *x.shape[-2:])


@dataclass
class LatentPlaneConfig:
    """Everything needed to rebuild a trained plane (saved as ``config.json`` next to the weights)."""

    coarse: dict = field(default_factory=dict)
    fine: dict | None = field(default_factory=dict)
    features: dict = field(default_factory=lambda: {"n_random": 5, "seed": 0})
    cube_scale: float = SHAPEWORLD_CUBE_SCALE
    resolution: int = 32
    level: float = 15.0
    extra: dict = field(default_factory=dict)
    host: str = "images"
    """what the plane reads: ``"images"`` (the 8 ring images through ``features``, our ShapeWorld plane) or
    ``"unet"`` (a UNet feature map, hooked at ``up_blocks[block_index]`` while the views are sampled: the
    official planes)"""
    block_index: int = 2


def save_latent_plane(plane: LatentPlane, folder: str | os.PathLike, config: LatentPlaneConfig) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (atomically)."""
    from safetensors.torch import save

    from .io.atomic import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in plane.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(sd, metadata={"format": "studio.latent_plane"}))
    atomic_write_bytes(folder / "config.json", json.dumps(asdict(config), indent=2).encode())
    return folder


def _resolve(path_or_name) -> Path:
    """A folder as given, else under the assets folder (``$STUDIO_ASSETS`` or ``<repo>/assets``), else
    relative to the repository root."""
    from .errors import UserError
    from .teachers.shapeworld_unet import assets_dir

    p = Path(path_or_name).expanduser()
    for cand in (p, assets_dir() / p, _REPO_ROOT / p):
        if (cand / "config.json").is_file():
            return cand
    raise UserError(f"no Latent-Plane weights at {str(path_or_name)!r}: expected a folder with model.safetensors "
                    "and config.json (the shipped one is 'latent-plane' in assets/; train one with "
                    "scripts/train_latent_plane.py)")


def load_official_latent_plane(folder: str | os.PathLike, *, device="cpu"
                               ) -> tuple[LatentPlane, None, LatentPlaneConfig]:
    """The official PlacidDreamer planes from a folder holding ``coarse_*.pt`` and ``fine_*.pt`` (loaded
    with ``weights_only=True``): ``(plane, None, config)`` with ``config.host == "unet"`` (Zero123's
    640-channel ``up_blocks[2]``, marching-cubes level 15, unit cube)."""
    from .errors import UserError

    folder = Path(folder)
    coarse_f, fine_f = sorted(folder.glob("coarse_*.pt")), sorted(folder.glob("fine_*.pt"))
    if not coarse_f or not fine_f:
        raise UserError(f"no official Latent-Plane checkpoints in {str(folder)!r}: expected coarse_*.pt and fine_*.pt")
    sd = {k: torch.load(f[-1], map_location="cpu", weights_only=True) for k, f in (("coarse", coarse_f), ("fine", fine_f))}
    plane = LatentPlane(CoarsePlane(), FinePlane())
    load_official_state_dict(plane, sd)
    cfg = LatentPlaneConfig(coarse={}, fine={}, features={}, cube_scale=1.0, level=15.0, host="unet", block_index=2)
    return plane.eval().to(device), None, cfg


def load_latent_plane(path_or_name: str | os.PathLike = "assets/latent-plane", *, device="cpu"
                      ) -> tuple[LatentPlane, ShapeWorldFeatures | None, LatentPlaneConfig]:
    """Load a trained plane: returns ``(plane, host_features, config)`` (``host_features`` is None for
    planes that read UNet features). A name is looked up as a folder, in the assets folder, then from
    the repository root; a folder with ``coarse_*.pt`` / ``fine_*.pt`` loads the official planes."""
    from safetensors.torch import load_file

    p = Path(path_or_name).expanduser()
    if p.is_dir() and any(p.glob("coarse_*.pt")):
        return load_official_latent_plane(p, device=device)
    folder = _resolve(path_or_name)
    cfg_raw = json.loads((folder / "config.json").read_text())
    cfg = LatentPlaneConfig(**cfg_raw)
    coarse = CoarsePlane(**cfg.coarse)
    fine = FinePlane(**cfg.fine) if cfg.fine is not None else None
    plane = LatentPlane(coarse, fine)
    plane.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    plane.eval().to(device)
    feats = ShapeWorldFeatures(**cfg.features).to(device) if cfg.host == "images" else None
    return plane, feats, cfg


def _transform_gaussians(g: Mapping[str, Tensor], scale: float, rot_y_deg: float = 0.0,
                         offset=(0.0, 0.0, 0.0)) -> dict[str, Tensor]:
    """Rotate a Gaussian set about +y, scale it uniformly and shift it."""
    from .world.primitives import rotation_matrix, rotmat_to_quat

    R = rotation_matrix("y", rot_y_deg)
    out = dict(g)
    out["means"] = (g["means"] @ R.T) * scale + torch.tensor(offset, dtype=torch.float32)
    out["scales"] = g["scales"] * scale
    qr = rotmat_to_quat(R[None])[0]
    q = g["quats"]
    w1, x1, y1, z1 = qr
    w2, x2, y2, z2 = q.unbind(-1)
    out["quats"] = torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                                w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], -1)
    if "normals" in g:
        out["normals"] = g["normals"] @ R.T
    return out


@torch.no_grad()
def shapeworld_ring_features(obj, features: ShapeWorldFeatures, *, resolution: int = 32,
                             cube_scale: float = SHAPEWORLD_CUBE_SCALE, n_gaussians: int = 20000, seed: int = 0,
                             rot_y_deg: float = 0.0) -> dict[str, Tensor]:
    """Render ShapeWorld object ``obj`` on the ring (in the cube frame, ``p_cube = cube_scale * p_world``)
    at ``resolution`` on white. Returns ``feats [1,8,C,H,W]``, ``images [8,H,W,3]`` and ``alphas``."""
    from .world.objects import get_object
    from .world.references import render_gaussian_views

    o = get_object(obj)
    g = _transform_gaussians(o.gaussians(n_gaussians, seed=seed), cube_scale, rot_y_deg)
    r = render_gaussian_views(g, ring_cameras(resolution))
    f = features(r["images"].permute(0, 3, 1, 2))
    return {"feats": f[None], "images": r["images"], "alphas": r["alphas"]}


@torch.no_grad()
def shapeworld_init(obj, plane: LatentPlane | None = None, features: ShapeWorldFeatures | None = None,
                    config: LatentPlaneConfig | None = None, *, n_points: int = 100_000, seed: int = 0,
                    grid_res: int = 64, world_units: bool = True, **init_kwargs):
    """The PlacidDreamer initialisation for a ShapeWorld object with the shipped (or given) plane.

    The steps are: ring renders -> host features -> density grid -> marching cubes -> Gaussians. With
    ``world_units`` the points keep the object's true size and position
    (``normalize=False, world_size=1/cube_scale``). Otherwise they use the official unit-cube
    normalisation. Returns ``(GaussianModel, mesh)``, the mesh in cube coordinates."""
    if plane is None or features is None or config is None:
        plane, features, config = load_latent_plane()
    rf = shapeworld_ring_features(obj, features, resolution=config.resolution, cube_scale=config.cube_scale)
    grid = plane.coarse.density_grid(rf["feats"], t=0.0, res=grid_res)[0]
    mesh = density_to_mesh(grid, level=config.level)
    if world_units:
        init_kwargs.setdefault("normalize", False)
        init_kwargs.setdefault("world_size", 1.0 / config.cube_scale)
    return mesh_to_gaussian_init(mesh, n_points, seed, **init_kwargs), mesh


@torch.no_grad()
def init_from_ring_views(views: Tensor, plane: LatentPlane | None = None, features: ShapeWorldFeatures | None = None,
                         config: LatentPlaneConfig | None = None, *, n_points: int = 100_000, seed: int = 0,
                         grid_res: int = 64, world_units: bool = True, **init_kwargs):
    """Initialise Gaussians from 8 ring views that were generated or rendered elsewhere, for example by a
    novel-view teacher.

    ``views [8,3,H,W]`` are images in [0,1] on white, in ring order: azimuth ``45 k``, elevation 30 deg,
    looking at the object's centre with the ring's 49 deg field of view at ``1.5 / cube_scale`` world
    units. They are resized to the plane's resolution. Returns ``(GaussianModel, mesh, info)``, where
    ``info`` holds ``occupancy`` (mean ring occupancy) and ``n_faces``. A ``ValueError`` is raised when
    the density grid has no surface."""
    if plane is None or features is None or config is None:
        plane, features, config = load_latent_plane()
    if views.dim() != 4 or views.shape[0] != RING_N or views.shape[1] != 3:
        raise ValueError(f"views must have shape [{RING_N}, 3, H, W], got {tuple(views.shape)}")
    v = F.interpolate(views.float().clamp(0, 1), size=(config.resolution, config.resolution), mode="bilinear",
                      antialias=True, align_corners=False)
    feats = features(v)[None]
    grid = plane.coarse.density_grid(feats, t=0.0, res=grid_res)[0]
    mesh = density_to_mesh(grid, level=config.level)
    if world_units:
        init_kwargs.setdefault("normalize", False)
        init_kwargs.setdefault("world_size", 1.0 / config.cube_scale)
    model = mesh_to_gaussian_init(mesh, n_points, seed, **init_kwargs)
    occ = plane.coarse(feats, t=0.0)["occ"]
    return model, mesh, {"occupancy": float(occ.mean()), "n_faces": int(len(mesh.faces))}
