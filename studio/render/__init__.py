"""Functional renderers: tensor in, tensor out, each with a slow torch reference twin.

Module names (one rule for every topic, here and in :mod:`studio.students`):

* ``<topic>.py`` -- the public renderer of a topic: ``gaussians``, ``volume``, ``mesh``;
* ``_<topic>_torch.py`` -- its slow, obviously-correct torch reference twin, which the tests compare the fast
  paths against: ``_gaussians_torch``, ``_volume_torch``, ``_mesh_torch``;
* ``_<topic>_ext.py`` -- the loader of its compiled kernels (``cuda_ext/``, built on first use by
  :mod:`studio.ext`), one module per topic serving both the native C++ and the CUDA build:
  ``_gaussians_ext``, ``_mesh_ext`` (and ``studio/students/_hashgrid_ext``, native only);
* a leading underscore marks a module private to its package: code outside the package asks the public
  modules (for the extensions: :func:`extension_status`).
"""
from .gaussians import BACKENDS, RENDER_MODES, rasterize_gaussians, resolve_backend
from .mesh import (
    MESH_BACKENDS,
    antialias,
    face_normals,
    interpolate,
    mesh_edge_topology,
    project_vertices,
    rasterize_mesh,
    render_mesh,
    resolve_mesh_backend,
    vertex_normals,
)
from .volume import (
    OccupancyGrid,
    composite,
    cos_anneal_ratio,
    neus_alpha,
    occupancy_fn,
    ray_aabb,
    rays_from_cameras,
    render_field,
    sample_rays_stratified,
    sample_rays_uniform,
)

__all__ = [
    "BACKENDS",
    "extension_status",
    "MESH_BACKENDS",
    "RENDER_MODES",
    "OccupancyGrid",
    "antialias",
    "composite",
    "cos_anneal_ratio",
    "face_normals",
    "interpolate",
    "mesh_edge_topology",
    "neus_alpha",
    "occupancy_fn",
    "project_vertices",
    "rasterize_gaussians",
    "rasterize_mesh",
    "ray_aabb",
    "rays_from_cameras",
    "render_field",
    "render_mesh",
    "resolve_backend",
    "resolve_mesh_backend",
    "sample_rays_stratified",
    "sample_rays_uniform",
    "vertex_normals",
]


def extension_status(cuda: bool = True) -> dict[str, str | None]:
    """The renderers' compiled extensions, each built or loaded on first use: ``{name: None when it is available,
    else why not}`` for ``native`` and ``native mesh`` and, with ``cuda``, ``cuda`` and ``cuda mesh``."""
    from . import _gaussians_ext, _mesh_ext

    out = {"native": None if _gaussians_ext.native.available() else _gaussians_ext.native.load_error()}
    if cuda:
        out["cuda"] = None if _gaussians_ext.cuda.available() else _gaussians_ext.cuda.load_error()
    for kind in ("native", "cuda") if cuda else ("native",):
        out[f"{kind} mesh"] = None if _mesh_ext.available(kind) else _mesh_ext.load_error(kind)
    return out
