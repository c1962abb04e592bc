"""Where the shipped assets are: ``$STUDIO_ASSETS`` when set, else ``<repo root>/assets`` (next to the
``studio`` package of a source checkout or an editable install).

Each tiny trained teacher ships as one folder (``assets/shapeworld-unet``, ``assets/shapeworld-nv-unet``,
``assets/shapeworld-video-wan``, ``assets/shapeworld-video-unet``, ``assets/shapeworld-normals``, ``assets/latent-plane``), written by a
training script in ``scripts/``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def assets_dir() -> Path:
    """The folder of shipped assets: ``$STUDIO_ASSETS`` or ``<repo root>/assets``."""
    env = os.environ.get("STUDIO_ASSETS", "").strip()
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "assets"


def shipped_model_path(name: str, script: str, marker: str = "model_index.json", kind: str = "teacher") -> Path:
    """Folder ``<assets>/<name>`` of shipped weights, checked for its ``marker`` file; a ``UserError`` naming
    the fixes (a source checkout, ``$STUDIO_ASSETS``, or retraining with ``scripts/<script>``) when missing."""
    path = assets_dir() / name
    if not (path / marker).is_file():
        raise UserError(f"{kind} {name!r}: its weights are missing ({path / marker} not found); "
                        "use a source checkout of the studio (the weights ship in assets/), set STUDIO_ASSETS to "
                        f"a folder holding {name}/, or retrain them with "
                        f"`python scripts/{script} --out assets/{name}`")
    return path
