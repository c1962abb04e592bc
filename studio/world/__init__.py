"""studio.world: ShapeWorld, procedural 3D objects with exact ground truth.

* ``objects``: ``ShapeObject`` (name, prompt, colour words, ``front_back_differ``), ``OBJECTS``,
  ``list_objects``, ``get_object``, ``find_object_for_prompt``.
* ``primitives``: surface samplers with exact normals and ``surfels_to_gaussians``.
* ``references``: cached ground-truth renders (images, alphas, depths, normals) on training rings and
  held-out / front-back camera sets.
* ``metrics``: PSNR, SSIM, silhouette IoU, Chamfer, saturation gap, Janus score, ``evaluate_gaussians``.
"""
from .metrics import (chamfer_to_surface, evaluate_gaussians, janus_score, psnr, saturation_gap, silhouette_iou,
                      ssim)
from .objects import OBJECTS, ShapeObject, find_object_for_prompt, get_object, list_objects
from .references import (front_back_cameras, held_out_cameras, reference_cameras, reference_gaussians,
                         reference_views, render_gaussian_views, render_reference)

__all__ = [
    "OBJECTS", "ShapeObject", "list_objects", "get_object", "find_object_for_prompt",
    "reference_gaussians", "reference_cameras", "held_out_cameras", "front_back_cameras", "reference_views",
    "render_reference", "render_gaussian_views",
    "psnr", "ssim", "silhouette_iou", "chamfer_to_surface", "saturation_gap", "janus_score", "evaluate_gaussians",
]
