"""ShapeWorld objects rendered on the Latent-Plane ring: the training and evaluation data of
``scripts/train_latent_plane.py``, and the initialisation of a ShapeWorld object from its ring renders.

A ShapeWorld object enters the plane's cube scaled by ``cube_scale`` (``p_cube = cube_scale * p_world``,
:data:`~.ring.SHAPEWORLD_CUBE_SCALE` by default).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .gaussian_init import density_to_mesh, mesh_to_gaussian_init
from .networks import LatentPlane, ShapeWorldFeatures
from .ring import SHAPEWORLD_CUBE_SCALE, ring_cameras
from .weights import LatentPlaneConfig, load_latent_plane


def transform_gaussians(g: Mapping[str, Tensor], scale: float, rot_y_deg: float = 0.0,
                         offset=(0.0, 0.0, 0.0)) -> dict[str, Tensor]:
    """Rotate a Gaussian set about +y, scale it uniformly and shift it."""
    from studio.world.primitives import rotation_matrix, rotmat_to_quat

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
    from studio.world.objects import get_object
    from studio.world.references import render_gaussian_views

    o = get_object(obj)
    g = transform_gaussians(o.gaussians(n_gaussians, seed=seed), cube_scale, rot_y_deg)
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
