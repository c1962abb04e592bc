"""Camera batches, look-at, orbit samplers and fixed rings.

Conventions (one set, used everywhere):

* ``viewmats [C,4,4]`` are **world-to-camera** in the **OpenCV** camera frame (x right, y down, z
  forward), as gsplat expects. ``Ks [C,3,3]`` are pinhole intrinsics in pixels; pixel centres at +0.5.
* The world is **y-up** (glTF / OpenGL world). Azimuth is measured around +y from the +z axis towards
  +x, so azimuth 0 looks at the object's *front* (its +z side), 90 its right side (+x), 180 its back.
  Elevation is the angle above the xz-plane (positive = looking down from above).
* ``opencv_to_opengl`` / ``opengl_to_opencv`` convert camera-to-world poses between the OpenCV frame
  and the OpenGL / Blender / NeRF frame (x right, y up, z backward); ``Cameras.to_kornia`` gives a
  ``kornia.geometry.camera.PinholeCamera``.
* **Normals**: renderers return world-frame normals; *camera-space* normals are the same unit vectors in
  the OpenCV camera frame (``n_cam = R n_world`` with ``R = viewmats[:, :3, :3]``), outward, so a
  surface seen head-on is ``(0, 0, -1)``, one pointing up in the image has ``y < 0`` and one pointing
  right ``x > 0``. ``world_to_camera_normals`` / ``camera_to_world_normals`` convert normal maps in either
  layout (``[C,H,W,3]`` renderer outputs or ``[C,3,H,W]`` estimator outputs, via ``channel_dim``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

_FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class Cameras:
    """A batch of ``C`` pinhole cameras sharing one image size."""

    viewmats: Tensor  # [C,4,4] world-to-camera, OpenCV frame
    Ks: Tensor  # [C,3,3]
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.viewmats.dim() != 3 or self.viewmats.shape[1:] != (4, 4):
            raise ValueError(f"viewmats must have shape [C, 4, 4], got {tuple(self.viewmats.shape)}")
        if self.Ks.shape != (self.viewmats.shape[0], 3, 3):
            raise ValueError(f"Ks must have shape [C, 3, 3] with C={self.viewmats.shape[0]}, got {tuple(self.Ks.shape)}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)

    def __len__(self) -> int:
        return self.viewmats.shape[0]

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Cameras(self.viewmats[idx], self.Ks[idx], self.width, self.height)

    def to(self, device=None, dtype=None) -> "Cameras":
        return Cameras(self.viewmats.to(device=device, dtype=dtype), self.Ks.to(device=device, dtype=dtype),
                       self.width, self.height)

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @property
    def centers(self) -> Tensor:
        """World-space camera centres ``[C,3]``."""
        return torch.linalg.inv(self.viewmats)[:, :3, 3]

    @property
    def c2w_opencv(self) -> Tensor:
        return torch.linalg.inv(self.viewmats)

    @property
    def c2w_opengl(self) -> Tensor:
        return opencv_to_opengl(self.c2w_opencv)

    @property
    def fovy(self) -> Tensor:
        """Vertical field of view in degrees ``[C]``."""
        return torch.rad2deg(2 * torch.atan(0.5 * self.height / self.Ks[:, 1, 1]))

    @staticmethod
    def cat(cams: list["Cameras"]) -> "Cameras":
        w, h = cams[0].width, cams[0].height
        if any(c.width != w or c.height != h for c in cams):
            raise ValueError("Cameras.cat needs one image size for all batches")
        return Cameras(torch.cat([c.viewmats for c in cams]), torch.cat([c.Ks for c in cams]), w, h)

    def resized(self, width: int, height: int) -> "Cameras":
        """Same poses and fields of view at another resolution."""
        K = self.Ks.clone()
        K[:, 0] *= width / self.width
        K[:, 1] *= height / self.height
        return Cameras(self.viewmats, K, width, height)

    def to_vector(self) -> Tensor:
        """``[C, 20]`` camera vector for camera-conditioned teachers: the flattened world-to-camera
        matrix (16) and the normalised intrinsics ``fx/W, fy/H, cx/W, cy/H``."""
        k = torch.stack([self.Ks[:, 0, 0] / self.width, self.Ks[:, 1, 1] / self.height,
                         self.Ks[:, 0, 2] / self.width, self.Ks[:, 1, 2] / self.height], dim=-1)
        return torch.cat([self.viewmats.reshape(-1, 16), k], dim=-1)

    @staticmethod
    def from_vector(vec: Tensor, width: int, height: int) -> "Cameras":
        """Inverse of :meth:`to_vector` at any resolution (the field of view is kept)."""
        if vec.dim() != 2 or vec.shape[1] != 20:
            raise ValueError(f"camera vector must have shape [C, 20], got {tuple(vec.shape)}")
        K = torch.zeros(vec.shape[0], 3, 3, dtype=vec.dtype, device=vec.device)
        K[:, 0, 0] = vec[:, 16] * width
        K[:, 1, 1] = vec[:, 17] * height
        K[:, 0, 2] = vec[:, 18] * width
        K[:, 1, 2] = vec[:, 19] * height
        K[:, 2, 2] = 1
        return Cameras(vec[:, :16].reshape(-1, 4, 4), K, width, height)

    def to_kornia(self):
        """``kornia.geometry.camera.PinholeCamera`` of this batch (same OpenCV frame)."""
        from kornia.geometry.camera import PinholeCamera

        C = len(self)
        K4 = torch.eye(4, dtype=self.Ks.dtype, device=self.device).repeat(C, 1, 1)
        K4[:, :3, :3] = self.Ks
        h = torch.full((C,), float(self.height), dtype=self.Ks.dtype, device=self.device)
        w = torch.full((C,), float(self.width), dtype=self.Ks.dtype, device=self.device)
        return PinholeCamera(K4, self.viewmats.clone(), h, w)

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points ``[P,3]`` into every camera: pixel coords ``[C,P,2]`` and depths ``[C,P]``."""
        pc = points[None] @ self.viewmats[:, :3, :3].transpose(-1, -2) + self.viewmats[:, None, :3, 3]
        z = pc[..., 2]
        uv = pc[..., :2] / z[..., None]
        pix = uv * torch.stack([self.Ks[:, 0, 0], self.Ks[:, 1, 1]], -1)[:, None] + self.Ks[:, None, :2, 2]
        return pix, z


def opencv_to_opengl(c2w: Tensor) -> Tensor:
    """Camera-to-world ``[...,4,4]``: OpenCV camera axes (x right, y down, z fwd) -> OpenGL (y up, z back)."""
    return c2w @ _FLIP_YZ.to(c2w)


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    return c2w @ _FLIP_YZ.to(c2w)


def _rotate_normals(normals: Tensor, R: Tensor, channel_dim: int) -> Tensor:
    if R.dim() != 3 or R.shape[1:] != (3, 3):
        raise ValueError(f"viewmats must have shape [C, 4, 4], got rotations of shape {tuple(R.shape)}")
    if normals.dim() < 2 or normals.shape[0] != R.shape[0]:
        raise ValueError(f"normals must have shape [C, ...] with C={R.shape[0]} (one camera per map), "
                         f"got {tuple(normals.shape)}")
    if normals.shape[channel_dim] != 3:
        raise ValueError(f"normals must have 3 channels at dim {channel_dim}, got shape {tuple(normals.shape)}")
    n = normals.movedim(channel_dim, -1)
    flat = n.reshape(n.shape[0], -1, 3)
    out = flat @ R.to(flat).transpose(-1, -2)  # row vectors: n' = R n
    return out.reshape(n.shape).movedim(-1, channel_dim)


def world_to_camera_normals(normals: Tensor, viewmats: Tensor, channel_dim: int = -1) -> Tensor:
    """World-frame normals ``[C,...,3]`` (``channel_dim=-1``, e.g. ``render_mesh(...)["normal"]``) or
    ``[C,3,H,W]`` (``channel_dim=1``) -> the OpenCV camera frame of each camera: ``n_cam = R n_world`` with
    ``R = viewmats[:, :3, :3]`` (directions ignore the translation). Lengths are kept (zero background stays
    zero); a surface facing camera ``c`` head-on becomes ``(0, 0, -1)``."""
    return _rotate_normals(normals, viewmats[:, :3, :3], channel_dim)


def camera_to_world_normals(normals: Tensor, viewmats: Tensor, channel_dim: int = -1) -> Tensor:
    """Inverse of :func:`world_to_camera_normals`: ``n_world = R^T n_cam`` (``R`` is a rotation)."""
    return _rotate_normals(normals, viewmats[:, :3, :3].transpose(-1, -2), channel_dim)


def intrinsics_from_fov(fovy_deg: Tensor | float, width: int, height: int) -> Tensor:
    """Pinhole ``K [C,3,3]`` from vertical FoV(s) in degrees (square pixels, centred principal point)."""
    fovy = torch.as_tensor(fovy_deg, dtype=torch.float32).reshape(-1)
    f = 0.5 * height / torch.tan(torch.deg2rad(fovy) / 2)
    K = torch.zeros(fovy.shape[0], 3, 3)
    K[:, 0, 0] = f
    K[:, 1, 1] = f
    K[:, 0, 2] = width / 2
    K[:, 1, 2] = height / 2
    K[:, 2, 2] = 1
    return K


def look_at(eyes: Tensor, targets: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """World-to-camera (OpenCV frame) matrices ``[C,4,4]`` for cameras at ``eyes [C,3]`` looking at
    ``targets [C,3]`` (default origin) with world ``up`` (default +y). Works for straight-down views."""
    eyes = torch.as_tensor(eyes, dtype=torch.float32).reshape(-1, 3)
    targets = torch.zeros_like(eyes) if targets is None else torch.as_tensor(targets, dtype=eyes.dtype).expand_as(eyes)
    up = torch.tensor([0.0, 1.0, 0.0]) if up is None else torch.as_tensor(up, dtype=eyes.dtype)
    up = up.expand_as(eyes)
    fwd = targets - eyes
    fwd = fwd / fwd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    right = torch.linalg.cross(fwd, up, dim=-1)
    # Degenerate when looking along up: pick any perpendicular axis.
    alt = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0]).expand_as(fwd), dim=-1)
    bad = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(bad, alt, right)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(fwd, right, dim=-1)
    R = torch.stack([right, down, fwd], dim=1)  # rows: camera axes in world coords
    V = torch.eye(4).repeat(eyes.shape[0], 1, 1)
    V[:, :3, :3] = R
    V[:, :3, 3] = -(R @ eyes[..., None])[..., 0]
    return V


def spherical_to_position(elevation_deg: Tensor, azimuth_deg: Tensor, radius: Tensor) -> Tensor:
    """Camera positions ``[C,3]`` on spheres around the origin (y-up, azimuth 0 on +z, 90 on +x)."""
    e, a = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float32)), torch.deg2rad(
        torch.as_tensor(azimuth_deg, dtype=torch.float32))
    r = torch.as_tensor(radius, dtype=torch.float32)
    return torch.stack([r * torch.cos(e) * torch.sin(a), r * torch.sin(e), r * torch.cos(e) * torch.cos(a)], dim=-1)


def orbit_cameras(elevation_deg, azimuth_deg, radius, fovy_deg, width: int, height: int,
                  target: Tensor | None = None) -> Cameras:
    """Cameras on orbits around ``target`` (broadcasts its per-camera arguments)."""
    e, a, r, f = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                           for v in (elevation_deg, azimuth_deg, radius, fovy_deg)))
    tgt = torch.zeros(3) if target is None else torch.as_tensor(target, dtype=torch.float32)
    eyes = spherical_to_position(e, a, r) + tgt
    return Cameras(look_at(eyes, tgt.expand_as(eyes)), intrinsics_from_fov(f, width, height), width, height)


def ring_cameras(n: int, *, elevation_deg: float = 15.0, radius: float = 3.0, fovy_deg: float = 40.0,
                 width: int = 256, height: int = 256, start_azimuth_deg: float = 0.0) -> Cameras:
    """``n`` cameras evenly spaced in azimuth (turntables, fixed multi-view sets)."""
    az = start_azimuth_deg + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return orbit_cameras(elevation_deg, az, radius, fovy_deg, width, height)


#: the azimuth sector (degrees, ``(start, end)``, 0 = front, 90 = right) that the text-to-3D methods keep out of
#: training by default and evaluate inside (``TextTo3DConfig.heldout_azimuth``)
HELDOUT_AZIMUTH = (60.0, 120.0)


def _sector_pieces(sector) -> list[tuple[float, float]]:
    """The sector ``(start, end)`` (degrees, wrapping: ``(300, 30)`` is 90 degrees wide) as intervals of the
    real line repeated every 360 degrees (enough copies to cover any azimuth range within [-720, 720])."""
    s0 = float(sector[0])
    width = (float(sector[1]) - s0) % 360.0
    if width == 0.0:
        return []
    return [(s0 + k * 360.0, s0 + width + k * 360.0) for k in range(-3, 4)]


def azimuth_in_sector(azimuth: Tensor, sector) -> Tensor:
    """``[C]`` bool: the azimuths (degrees, any wrap) that lie inside ``sector = (start, end)`` (start inclusive,
    end exclusive, wrapping). An empty sector (``start == end`` mod 360) contains nothing."""
    az = torch.as_tensor(azimuth, dtype=torch.float32)
    width = (float(sector[1]) - float(sector[0])) % 360.0
    if width == 0.0:
        return torch.zeros_like(az, dtype=torch.bool)
    rel = torch.remainder(az - float(sector[0]), 360.0)
    return rel < width


def sample_azimuths(n: int, azimuth_range, *, exclude=None, stratified: bool = True,
                    generator: torch.Generator | None = None) -> Tensor:
    """``n`` azimuths (degrees, wrapped into (-180, 180]) uniform over ``azimuth_range`` minus the sector
    ``exclude`` (``(start, end)``, wrapping; ``None`` or an empty sector = nothing excluded), one per equal
    slice of the allowed length when ``stratified`` (with ``n > 1``). The allowed set is the union of the
    intervals left after removing the sector; a uniform draw over its total length is mapped through them,
    so the density stays uniform on what is left and no sample ever falls in the sector."""
    a0, a1 = float(azimuth_range[0]), float(azimuth_range[1])
    pieces = [(a0, a1)]
    for e0, e1 in ([] if exclude is None else _sector_pieces(exclude)):
        nxt = []
        for lo, hi in pieces:
            if e1 <= lo or e0 >= hi:
                nxt.append((lo, hi))
                continue
            if lo < e0:
                nxt.append((lo, e0))
            if e1 < hi:
                nxt.append((e1, hi))
        pieces = nxt
    total = sum(hi - lo for lo, hi in pieces)
    if not pieces or total <= 0:
        raise ValueError(f"the excluded azimuth sector {tuple(exclude)} covers the whole azimuth range {(a0, a1)}")
    if stratified and n > 1:
        u = (torch.arange(n) + torch.rand(n, generator=generator)) / n * total
    else:
        u = torch.rand(n, generator=generator) * total
    az = torch.empty(n)
    start = 0.0
    for i, (lo, hi) in enumerate(pieces):
        last = i == len(pieces) - 1
        sel = (u >= start) & ((u < start + (hi - lo)) | torch.tensor(last))
        az[sel] = lo + (u[sel] - start).clamp(max=hi - lo)
        start += hi - lo
    if exclude is not None:  # the boundary value hi of a piece may equal a sector start after wrapping
        inside = azimuth_in_sector(az, exclude)
        if bool(inside.any()):
            az[inside] = az[inside] - 1e-3
    return (az + 180.0) % 360.0 - 180.0


@dataclass
class OrbitSample:
    cameras: Cameras
    elevation: Tensor  # [C] degrees
    azimuth: Tensor  # [C] degrees in (-180, 180]
    radius: Tensor  # [C]
    fovy: Tensor  # [C] degrees


@dataclass
class OrbitSampler:
    """Random orbit cameras as the score-distillation methods sample them.

    Ranges are ``(low, high)`` and sampled uniformly (elevation optionally uniform on the sphere);
    ``center_jitter`` perturbs the look-at target (std, world units), ``up_jitter`` the up vector.
    """

    elevation_range: tuple[float, float] = (-10.0, 45.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    radius_range: tuple[float, float] = (2.5, 3.5)
    fovy_range: tuple[float, float] = (40.0, 70.0)
    width: int = 64
    height: int = 64
    center_jitter: float = 0.0
    up_jitter: float = 0.0
    uniform_sphere: bool = False
    stratified_azimuth: bool = True
    target: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    exclude_azimuth: tuple[float, float] | None = None
    """an azimuth sector ``(start, end)`` (degrees, wrapping) never sampled: the held-out evaluation region"""

    def __post_init__(self) -> None:
        for name in ("elevation_range", "azimuth_range", "radius_range", "fovy_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        if not (0 < self.fovy_range[0] and self.fovy_range[1] < 180):
            raise ValueError(f"fovy_range must lie in (0, 180) degrees, got {self.fovy_range}")
        if self.radius_range[0] <= 0:
            raise ValueError(f"radius_range must be positive, got {self.radius_range}")

    def sample(self, n: int, generator: torch.Generator | None = None) -> OrbitSample:
        def u(lo, hi, k=n):
            return lo + (hi - lo) * torch.rand(k, generator=generator)

        lo, hi = self.elevation_range
        if self.uniform_sphere:
            s0, s1 = math.sin(math.radians(lo)), math.sin(math.radians(hi))
            elev = torch.rad2deg(torch.asin(u(s0, s1)))
        else:
            elev = u(lo, hi)
        if self.exclude_azimuth is not None:
            azim = sample_azimuths(n, self.azimuth_range, exclude=self.exclude_azimuth,
                                   stratified=self.stratified_azimuth, generator=generator)
        else:
            a0, a1 = self.azimuth_range
            if self.stratified_azimuth and n > 1:
                # One azimuth per equal slice (random offset), as multi-view SDS batches do.
                azim = a0 + (a1 - a0) * ((torch.arange(n) + torch.rand(n, generator=generator)) / n)
            else:
                azim = u(a0, a1)
            azim = (azim + 180.0) % 360.0 - 180.0
        radius = u(*self.radius_range)
        fovy = u(*self.fovy_range)
        tgt = torch.tensor(self.target, dtype=torch.float32).expand(n, 3)
        if self.center_jitter > 0:
            tgt = tgt + self.center_jitter * torch.randn(n, 3, generator=generator)
        up = torch.tensor([0.0, 1.0, 0.0]).expand(n, 3)
        if self.up_jitter > 0:
            up = up + self.up_jitter * torch.randn(n, 3, generator=generator)
        eyes = spherical_to_position(elev, azim, radius) + tgt
        cams = Cameras(look_at(eyes, tgt, up), intrinsics_from_fov(fovy, self.width, self.height),
                       self.width, self.height)
        return OrbitSample(cams, elev, azim, radius, fovy)
