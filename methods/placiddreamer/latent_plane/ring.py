"""The Latent-Plane's fixed camera ring and the ray geometry of its cube.

The 8 samples of a Latent-Plane batch are 8 fixed cameras on a ring: azimuth ``45 k``, elevation 30 deg,
distance 1.5, looking at the origin, around the cube ``[-0.5, 0.5]^3``. The networks
(:mod:`.networks`) sample features along these cameras' rays and project points into their views.

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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from studio.cameras import Cameras, orbit_cameras
from studio.render.volume import ray_aabb, rays_from_cameras

RING_N = 8
RING_ELEVATION = 30.0
RING_RADIUS = 1.5
FOCAL_256 = 280.0
PRINCIPAL_256 = 128.0
CUBE_HALF = 0.5
#: our ShapeWorld training maps world units into the cube by ``p_cube = 0.5 * p_world``.
#: ShapeWorld objects reach at most 0.9 world units from the origin, hence 0.45 in the cube.
SHAPEWORLD_CUBE_SCALE = 0.5


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
    return ray_aabb(rays_o, rays_d, float(half))


def camera_rays(cams: Cameras) -> tuple[Tensor, Tensor]:
    """Per-pixel rays of ``cams`` (row-major pixels): ``rays_o, rays_d [C, H*W, 3]`` in world
    coordinates. The directions are unnormalised with camera-space z = 1, as in the official
    ``gen_rays``, and pass through the pixel centres (+0.5 convention of ``Cameras``).
    (:func:`studio.render.volume.rays_from_cameras` with ``normalize=False``, pixels flattened.)"""
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
