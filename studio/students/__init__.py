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
    "extension_status",
]


def extension_status() -> dict[str, str | None]:
    """The students' compiled extensions, built or loaded on first use: ``{"native hashgrid": None when it is
    available, else why not}``."""
    from . import _hashgrid_ext

    return {"native hashgrid": None if _hashgrid_ext.available() else _hashgrid_ext.load_error()}
