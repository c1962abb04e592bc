"""Functional renderers: tensor in, tensor out, each with a slow torch reference twin."""
from .gaussians import BACKENDS, RENDER_MODES, rasterize_gaussians, resolve_backend

__all__ = ["rasterize_gaussians", "resolve_backend", "BACKENDS", "RENDER_MODES"]
