"""Ground-truth reference renders of ShapeWorld objects, cached on disk.

The ground truth of an object is its Gaussian set ``obj.gaussians(n_gaussians, seed)`` (albedo with the
object's default baked Lambertian shading, exactly what ``ShapeObject.gaussians`` returns); every
reference image is that set rendered by ``rasterize_gaussians``. One render gives:

* ``images  [V,H,W,3]`` colours over ``background`` (default white),
* ``alphas  [V,H,W,1]`` accumulated opacity (the silhouette),
* ``depths  [V,H,W,1]`` *expected* depth (``render_mode="ED"``: camera-space z, i.e. distance along the
  optical axis, of the alpha-weighted mean surface; 0 where nothing was hit),
* ``normals [V,H,W,3]`` **world-frame** unit normals (the Gaussians' exact surface normals rendered as
  features and renormalised per pixel; 0 on the background). ``camera_normals`` converts them to the
  OpenCV camera frame.

Camera sets (y-up world, azimuth 0 = the object's front, see ``studio.cameras``):

* ``reference_cameras``: training rings, ``n_azimuth`` evenly spaced azimuths (starting at 0) at each
  elevation, elevation-major order.
* ``held_out_cameras``: evaluation views disjoint from the rings (azimuths in the middle between ring
  azimuths +- a quarter step, elevations between the ring elevations).
* ``sector_cameras``: evaluation views inside an azimuth sector that training never sampled
  (``TextTo3DConfig.heldout_azimuth``).
* ``front_back_cameras``: paired front / back views for the Janus score.

Renders are cached as safetensors under ``$STUDIO_SHAPEWORLD_CACHE`` or ``~/.cache/studio/shapeworld``,
keyed by a hash of the Gaussian set, the cameras and the background (so a changed object definition
never reads a stale file); writes are atomic (``studio.io.atomic``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ..cameras import Cameras, OrbitSample, orbit_cameras, world_to_camera_normals
from ..io.atomic import atomic_write_bytes
from ..render.gaussians import rasterize_gaussians
from .objects import ShapeObject, get_object
from .primitives import gaussian_normals

__all__ = [
    "DEFAULT_FOVY", "DEFAULT_RADIUS", "REFERENCE_N_GAUSSIANS", "cache_dir", "reference_gaussians",
    "reference_cameras", "held_out_cameras", "sector_cameras", "front_back_cameras", "render_gaussian_views", "render_reference",
    "reference_views", "camera_normals",
]

DEFAULT_FOVY = 40.0
DEFAULT_RADIUS = 3.0
REFERENCE_N_GAUSSIANS = 20000
CACHE_VERSION = 1


def cache_dir() -> Path:
    """Folder of cached reference renders (``$STUDIO_SHAPEWORLD_CACHE`` or ``~/.cache/studio/shapeworld``)."""
    return Path(os.environ.get("STUDIO_SHAPEWORLD_CACHE", Path.home() / ".cache" / "studio" / "shapeworld"))


def reference_gaussians(obj: ShapeObject | str, n_gaussians: int = REFERENCE_N_GAUSSIANS,
                        seed: int = 0) -> dict[str, Tensor]:
    """The ground-truth Gaussian set: ``obj.gaussians(n_gaussians, seed)`` plus its unit ``normals [N,3]``."""
    g = get_object(obj).gaussians(n_gaussians, seed=seed)
    g["normals"] = gaussian_normals(g["quats"])
    return g


def _orbit(elev: Tensor, azim: Tensor, size: int, fovy: float, radius: float) -> OrbitSample:
    cams = orbit_cameras(elev, azim, radius, fovy, size, size)
    n = elev.numel()
    return OrbitSample(cams, elev.float(), azim.float(), torch.full((n,), float(radius)), torch.full((n,), float(fovy)))


def reference_cameras(n_azimuth: int = 8, elevations=(0.0, 20.0), size: int = 64, fovy: float = DEFAULT_FOVY,
                      radius: float = DEFAULT_RADIUS) -> OrbitSample:
    """Training rings: for each elevation (outer loop), ``n_azimuth`` azimuths ``k * 360 / n_azimuth``."""
    if n_azimuth < 1:
        raise ValueError(f"n_azimuth must be >= 1, got {n_azimuth}")
    el = torch.as_tensor(elevations, dtype=torch.float32).reshape(-1)
    az = torch.arange(n_azimuth, dtype=torch.float32) * (360.0 / n_azimuth)
    E, A = torch.meshgrid(el, az, indexing="ij")
    return _orbit(E.reshape(-1), A.reshape(-1), size, fovy, radius)


def held_out_cameras(n: int = 8, size: int = 64, seed: int = 0, *, n_azimuth_train: int = 8,
                     elevations=(10.0, 30.0), elevation_jitter: float = 3.0, fovy: float = DEFAULT_FOVY,
                     radius: float = DEFAULT_RADIUS) -> OrbitSample:
    """``n`` evaluation views disjoint from ``reference_cameras(n_azimuth_train, (0, 20))``.

    View ``k`` sits in the azimuth gap ``floor(k * n_azimuth_train / n)`` of the training ring, at its
    middle +- a random quarter step (so at least a quarter step from every training azimuth), at elevation
    ``elevations[k % len]`` +- ``elevation_jitter`` (defaults keep >= 7 degrees from the ring elevations
    0 and 20). Deterministic in ``seed``; same radius and field of view as the rings.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    step = 360.0 / n_azimuth_train
    slot = torch.div(torch.arange(n) * n_azimuth_train, n, rounding_mode="floor").float()
    jit = (torch.rand(n, generator=g) * 2 - 1) * (step / 4)
    az = slot * step + step / 2 + jit
    el_base = torch.as_tensor(elevations, dtype=torch.float32).reshape(-1)
    el = el_base[torch.arange(n) % el_base.numel()] + (torch.rand(n, generator=g) * 2 - 1) * elevation_jitter
    return _orbit(el, az, size, fovy, radius)


def sector_cameras(sector, n: int = 8, size: int = 64, seed: int = 0, *, elevations=(5.0, 20.0, 35.0),
                   elevation_jitter: float = 3.0, margin: float = 0.1, fovy: float = DEFAULT_FOVY,
                   radius: float = DEFAULT_RADIUS) -> OrbitSample:
    """``n`` evaluation views **inside** the azimuth sector ``(start, end)`` (degrees, wrapping), the region a
    run kept out of training (``TextTo3DConfig.heldout_azimuth``). View ``k`` sits at the middle of the ``k``-th
    of ``n`` equal slices of the sector shrunk by ``margin`` of its width at each side, +- a random quarter
    slice, at elevation ``elevations[k % len]`` +- ``elevation_jitter``. Deterministic in ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    s0 = float(sector[0])
    width = (float(sector[1]) - s0) % 360.0
    if width == 0.0:
        raise ValueError(f"the held-out azimuth sector {tuple(sector)} is empty; give (start, end) with start != end")
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    g = torch.Generator().manual_seed(int(seed))
    inner = width * (1 - 2 * margin)
    step = inner / n
    jit = (torch.rand(n, generator=g) * 2 - 1) * (step / 4)
    az = s0 + width * margin + (torch.arange(n, dtype=torch.float32) + 0.5) * step + jit
    az = (az + 180.0) % 360.0 - 180.0
    el_base = torch.as_tensor(elevations, dtype=torch.float32).reshape(-1)
    el = el_base[torch.arange(n) % el_base.numel()] + (torch.rand(n, generator=g) * 2 - 1) * elevation_jitter
    return _orbit(el, az, size, fovy, radius)


def front_back_cameras(size: int = 64, *, elevations=(0.0, 20.0), azimuth_offsets=(-20.0, 0.0, 20.0),
                       fovy: float = DEFAULT_FOVY, radius: float = DEFAULT_RADIUS) -> tuple[OrbitSample, OrbitSample]:
    """Paired views for the Janus score: front view ``i`` at azimuth ``offset`` and back view ``i`` at
    ``offset + 180`` (same elevation), for every elevation x offset."""
    el = torch.as_tensor(elevations, dtype=torch.float32).reshape(-1)
    off = torch.as_tensor(azimuth_offsets, dtype=torch.float32).reshape(-1)
    E, A = torch.meshgrid(el, off, indexing="ij")
    E, A = E.reshape(-1), A.reshape(-1)
    return _orbit(E, A, size, fovy, radius), _orbit(E, A + 180.0, size, fovy, radius)


def _background(background, dtype=torch.float32) -> Tensor:
    if background is None:
        return torch.zeros(3, dtype=dtype)
    if isinstance(background, str):
        named = {"white": 1.0, "black": 0.0}
        if background not in named:
            raise ValueError(f"background must be 'white', 'black', None or an RGB triple, got {background!r}")
        return torch.full((3,), named[background], dtype=dtype)
    bg = torch.as_tensor(background, dtype=dtype).reshape(-1)
    if bg.numel() == 1:
        bg = bg.expand(3)
    if bg.numel() != 3:
        raise ValueError(f"background must be an RGB triple, got {background!r}")
    return bg.clone()


@torch.no_grad()
def render_gaussian_views(gaussians: dict[str, Tensor], cameras: Cameras, *, background=(1.0, 1.0, 1.0),
                          normals: Tensor | None = None, sh_degree: int | None = None, backend: str = "auto",
                          batch: int = 8) -> dict[str, Tensor]:
    """Render any Gaussian set (activated ``means, quats, scales, opacities, colors``; colours ``[N,3]`` or
    SH ``[N,K,3]`` with ``sh_degree``) into ``cameras``: ``images``, ``alphas``, ``depths`` (expected
    depth) and, when per-Gaussian world ``normals [N,3]`` are given, ``normals`` (world frame, unit, 0 on
    the background). Everything on the CPU, float32."""
    g = {k: (v.detach().float().cpu() if isinstance(v, Tensor) else v) for k, v in gaussians.items()}
    bg = _background(background)
    cams = cameras.to("cpu")
    if sh_degree is not None and normals is not None:
        raise ValueError("render_gaussian_views renders normals only with RGB colours (sh_degree=None)")
    feats = g["colors"] if normals is None else torch.cat([g["colors"], normals.float().cpu()], dim=-1)
    out = {"images": [], "alphas": [], "depths": [], "normals": []}
    for s in range(0, len(cams), batch):
        c = cams[s: s + batch]
        C = len(c)
        bgs = bg.expand(C, 3)
        if normals is not None:
            bgs = torch.cat([bgs, torch.zeros(C, 3)], dim=-1)
        render, alphas, _ = rasterize_gaussians(
            g["means"], g["quats"], g["scales"], g["opacities"], feats, c.viewmats, c.Ks, c.width, c.height,
            sh_degree=sh_degree, backgrounds=bgs.contiguous(), render_mode="RGB+ED", backend=backend)
        depth = torch.where(alphas > 1e-4, render[..., -1:], torch.zeros_like(alphas))
        out["images"].append(render[..., :3].clamp(0, 1))
        out["alphas"].append(alphas.clamp(0, 1))
        out["depths"].append(depth)
        if normals is not None:
            n = render[..., 3:6]
            norm = n.norm(dim=-1, keepdim=True)
            out["normals"].append(torch.where(norm > 1e-6, n / norm.clamp_min(1e-12), torch.zeros_like(n)))
    res = {k: torch.cat(v).contiguous() for k, v in out.items() if v}
    return res


def _digest(*tensors: Tensor, extra: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous().float()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _load_cached(path: Path) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        data = load_file(str(path))
        if not {"images", "alphas", "depths", "normals"} <= set(data):
            return None
        return data
    except Exception:  # truncated / foreign file: render again and overwrite
        return None


def render_reference(obj: ShapeObject | str, cameras: Cameras | OrbitSample, *, background=(1.0, 1.0, 1.0),
                     n_gaussians: int = REFERENCE_N_GAUSSIANS, seed: int = 0, backend: str = "auto",
                     cache: bool = True, cache_path: str | os.PathLike | None = None) -> dict:
    """Ground-truth renders of ``obj`` in arbitrary ``cameras`` (``images, alphas, depths, normals``, see
    the module doc), read from / written to the on-disk cache unless ``cache=False``. ``cache_path`` is
    the cache *folder* (default ``cache_dir()``). The result also holds ``cameras`` and ``from_cache``."""
    obj = get_object(obj)
    cams = cameras.cameras if isinstance(cameras, OrbitSample) else cameras
    g = reference_gaussians(obj, n_gaussians, seed)
    bg = _background(background)
    key = _digest(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], cams.viewmats, cams.Ks, bg,
                  extra={"v": CACHE_VERSION, "object": obj.name, "w": cams.width, "h": cams.height})
    path = Path(cache_path if cache_path is not None else cache_dir()) / f"{obj.name}-{key[:24]}.safetensors"
    data = _load_cached(path) if cache else None
    from_cache = data is not None
    if data is None:
        data = render_gaussian_views(g, cams, background=bg, normals=g["normals"], backend=backend)
        if cache:
            from safetensors.torch import save

            meta = {"object": obj.name, "prompt": obj.prompt, "n_gaussians": str(n_gaussians), "seed": str(seed),
                    "version": str(CACHE_VERSION)}
            try:
                atomic_write_bytes(path, save({k: v.contiguous() for k, v in data.items()}, metadata=meta))
            except OSError:  # read-only home etc.: the render is still valid, just not cached
                pass
    return {**data, "cameras": cams, "from_cache": from_cache}


def reference_views(obj: ShapeObject | str, n_azimuth: int = 8, elevations=(0.0, 20.0), size: int = 64,
                    fovy: float = DEFAULT_FOVY, radius: float = DEFAULT_RADIUS, *, background=(1.0, 1.0, 1.0),
                    n_gaussians: int = REFERENCE_N_GAUSSIANS, seed: int = 0, backend: str = "auto",
                    cache: bool = True, cache_path: str | os.PathLike | None = None) -> dict:
    """Ground-truth renders of ``obj`` on the training rings (``reference_cameras``).

    Returns ``images [V,H,W,3]``, ``alphas [V,H,W,1]``, ``depths [V,H,W,1]`` (expected depth),
    ``normals [V,H,W,3]`` (world frame), ``cameras`` (``Cameras``), ``azimuth [V]``, ``elevation [V]``
    (degrees, elevation-major order) and ``from_cache``. ``background`` is an RGB triple, ``"white"``,
    ``"black"`` or ``None`` (black)."""
    rig = reference_cameras(n_azimuth, elevations, size, fovy, radius)
    out = render_reference(obj, rig.cameras, background=background, n_gaussians=n_gaussians, seed=seed,
                           backend=backend, cache=cache, cache_path=cache_path)
    out["azimuth"], out["elevation"] = rig.azimuth, rig.elevation
    return out


def camera_normals(normals: Tensor, viewmats: Tensor) -> Tensor:
    """World-frame normal maps ``[V,H,W,3]`` -> OpenCV camera frame (x right, y down, z forward; a
    surface facing the camera has z < 0); the same as ``studio.cameras.world_to_camera_normals``."""
    return world_to_camera_normals(normals, viewmats.to(normals))
