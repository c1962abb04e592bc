"""studio.students"""
from .fields import (
    HashGridEncoding,
    NeRFField,
    NeuSField,
    eikonal_loss,
    extract_mesh,
    load_field,
    neus_from_nerf,
    sdf_grid,
)

__all__ = [
    # implicit fields (DreamPolish G1 / G2)
    "HashGridEncoding",
    "NeRFField",
    "NeuSField",
    "eikonal_loss",
    "extract_mesh",
    "load_field",
    "neus_from_nerf",
    "sdf_grid",
]
