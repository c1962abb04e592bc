"""A trained Latent-Plane on disk: its config, saving, and loading (ours or the official checkpoints).

Our format is a folder with ``model.safetensors`` and ``config.json`` (:class:`LatentPlaneConfig`); the
shipped ShapeWorld plane is ``assets/latent-plane`` (trained by ``scripts/train_latent_plane.py``). A
folder with the official ``coarse_*.pt`` / ``fine_*.pt`` loads through :mod:`.official`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from studio.errors import UserError
from studio.io.atomic import atomic_write_bytes

from .networks import CoarsePlane, FinePlane, LatentPlane, ShapeWorldFeatures
from .official import load_official_state_dict
from .ring import SHAPEWORLD_CUBE_SCALE

_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class LatentPlaneConfig:
    """Everything needed to rebuild a trained plane (saved as ``config.json`` next to the weights)."""

    coarse: dict = field(default_factory=dict)
    fine: dict | None = field(default_factory=dict)
    features: dict = field(default_factory=lambda: {"n_random": 5, "seed": 0})
    cube_scale: float = SHAPEWORLD_CUBE_SCALE
    resolution: int = 32
    level: float = 15.0
    extra: dict = field(default_factory=dict)
    host: str = "images"
    """what the plane reads: ``"images"`` (the 8 ring images through ``features``, our ShapeWorld plane) or
    ``"unet"`` (a UNet feature map, hooked at ``up_blocks[block_index]`` while the views are sampled: the
    official planes)"""
    block_index: int = 2


def save_latent_plane(plane: LatentPlane, folder: str | os.PathLike, config: LatentPlaneConfig) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (atomically)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in plane.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(sd, metadata={"format": "studio.latent_plane"}))
    atomic_write_bytes(folder / "config.json", json.dumps(asdict(config), indent=2).encode())
    return folder


def _resolve(path_or_name) -> Path:
    """A folder as given, else under the assets folder (``$STUDIO_ASSETS`` or ``<repo>/assets``), else
    relative to the repository root."""
    from studio.assets import assets_dir

    p = Path(path_or_name).expanduser()
    for cand in (p, assets_dir() / p, _REPO_ROOT / p):
        if (cand / "config.json").is_file():
            return cand
    raise UserError(f"no Latent-Plane weights at {str(path_or_name)!r}: expected a folder with model.safetensors "
                    "and config.json (the shipped one is 'latent-plane' in assets/; train one with "
                    "scripts/train_latent_plane.py)")


def load_official_latent_plane(folder: str | os.PathLike, *, device="cpu"
                               ) -> tuple[LatentPlane, None, LatentPlaneConfig]:
    """The official PlacidDreamer planes from a folder holding ``coarse_*.pt`` and ``fine_*.pt`` (loaded
    with ``weights_only=True``): ``(plane, None, config)`` with ``config.host == "unet"`` (Zero123's
    640-channel ``up_blocks[2]``, marching-cubes level 15, unit cube)."""
    folder = Path(folder)
    coarse_f, fine_f = sorted(folder.glob("coarse_*.pt")), sorted(folder.glob("fine_*.pt"))
    if not coarse_f or not fine_f:
        raise UserError(f"no official Latent-Plane checkpoints in {str(folder)!r}: expected coarse_*.pt and fine_*.pt")
    sd = {k: torch.load(f[-1], map_location="cpu", weights_only=True) for k, f in (("coarse", coarse_f), ("fine", fine_f))}
    plane = LatentPlane(CoarsePlane(), FinePlane())
    load_official_state_dict(plane, sd)
    cfg = LatentPlaneConfig(coarse={}, fine={}, features={}, cube_scale=1.0, level=15.0, host="unet", block_index=2)
    return plane.eval().to(device), None, cfg


def load_latent_plane(path_or_name: str | os.PathLike = "assets/latent-plane", *, device="cpu"
                      ) -> tuple[LatentPlane, ShapeWorldFeatures | None, LatentPlaneConfig]:
    """Load a trained plane: returns ``(plane, host_features, config)`` (``host_features`` is None for
    planes that read UNet features). A name is looked up as a folder, in the assets folder, then from
    the repository root; a folder with ``coarse_*.pt`` / ``fine_*.pt`` loads the official planes."""
    from safetensors.torch import load_file

    p = Path(path_or_name).expanduser()
    if p.is_dir() and any(p.glob("coarse_*.pt")):
        return load_official_latent_plane(p, device=device)
    folder = _resolve(path_or_name)
    cfg_raw = json.loads((folder / "config.json").read_text())
    cfg = LatentPlaneConfig(**cfg_raw)
    coarse = CoarsePlane(**cfg.coarse)
    fine = FinePlane(**cfg.fine) if cfg.fine is not None else None
    plane = LatentPlane(coarse, fine)
    plane.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    plane.eval().to(device)
    feats = ShapeWorldFeatures(**cfg.features).to(device) if cfg.host == "images" else None
    return plane, feats, cfg
