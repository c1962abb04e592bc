"""studio.io: file formats viewers open (3DGS PLY, .splat, MP4, PNG) and video reading.

Every writer here is atomic (``studio.io.atomic``): a crash never leaves a partial file behind.
"""
from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .ply import ply_property_names, read_ply, write_ply
from .splat import read_splat, write_splat
from .video import make_grid, read_video, to_uint8, write_mp4, write_png, write_png_grid

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_text",
    "write_ply", "read_ply", "ply_property_names",
    "write_splat", "read_splat",
    "write_mp4", "write_png", "write_png_grid", "make_grid", "read_video", "to_uint8",
]
