"""studio.io: file formats viewers open (3DGS PLY, .splat, OBJ/GLB meshes, MP4, PNG) and video reading.

Every writer here is atomic (``studio.io.atomic``): a crash never leaves a partial file behind.
"""
from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .mesh import read_mesh, uv_unwrap, write_glb, write_obj, xatlas_available
from .ply import ply_property_names, read_ply, write_ply
from .splat import read_splat, write_splat
from .video import make_grid, read_video, to_uint8, write_mp4, write_png, write_png_grid

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "make_grid",
    "ply_property_names",
    "read_mesh",
    "read_ply",
    "read_splat",
    "read_video",
    "to_uint8",
    "uv_unwrap",
    "write_glb",
    "write_mp4",
    "write_obj",
    "write_ply",
    "write_png",
    "write_png_grid",
    "write_splat",
    "xatlas_available",
]
