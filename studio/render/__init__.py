"""Functional renderers: tensor in, tensor out, each with a slow torch reference twin."""
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

__all__ = [
    "BACKENDS",
    "MESH_BACKENDS",
    "RENDER_MODES",
    "antialias",
    "face_normals",
    "interpolate",
    "mesh_edge_topology",
    "project_vertices",
    "rasterize_gaussians",
    "rasterize_mesh",
    "render_mesh",
    "resolve_backend",
    "resolve_mesh_backend",
    "vertex_normals",
]
