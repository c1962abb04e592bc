"""The PlacidDreamer initialisation: Latent-Plane density grid -> marching-cubes mesh -> Gaussians.

:func:`init_from_ring_views` runs it on 8 ring views generated elsewhere (a novel-view teacher);
:func:`density_to_mesh` and :func:`mesh_to_gaussian_init` are its two halves.

Voxel grid: :meth:`~.networks.CoarsePlane.density_grid` is indexed ``[x, y, z]`` in **our y-up frame**,
so a mesh from it is already y-up and the official y/z swap before the Gaussian initialisation is not
needed here. That swap exists because the official mesh comes out in the z-up voxel index frame;
``mesh_to_gaussian_init(swap_yz=True)`` reproduces it for meshes from z-up sources.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .networks import LatentPlane, ShapeWorldFeatures
from .ring import CUBE_HALF, RING_N
from .weights import LatentPlaneConfig, load_latent_plane


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

    from studio.students.gaussians import GaussianModel, num_sh_bases, rgb_to_sh

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
