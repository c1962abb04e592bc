"""studio.world: ShapeWorld, procedural 3D objects with exact ground truth.

* ``objects``: ``ShapeObject`` (name, prompt, colour words, ``front_back_differ``), ``OBJECTS``,
  ``list_objects``, ``get_object``, ``find_object_for_prompt``.
* ``primitives``: surface samplers with exact normals and ``surfels_to_gaussians``.
* ``references``: cached ground-truth renders (images, alphas, depths, normals) on training rings and
  held-out / front-back camera sets.
* ``metrics``: PSNR, SSIM, silhouette IoU, Chamfer, saturation gap, Janus score, ``evaluate_gaussians``.
* ``clips``: ShapeWorld video, procedural 2-D clips with exact ground truth (masks, centroids, depth,
  angles, camera): ``parse_video_prompt``, ``video_prompts``, ``ClipSpec`` / ``Clip``, ``sample_clip_specs``,
  ``render_clip(s)``, ``sample_clips``, ``reference_clips``; the low-quality ``degrade`` and high-quality
  ``hq_images`` domains; ``check_video``, the shape check of pixel videos ``[B,F,3,H,W]``.
* ``scenes4d``: dynamic 3D ShapeWorld for video-to-4D (imported on its own, ``studio.world.scenes4d``): ``Scene4D``
  (frames, visible / amodal masks, depth, flow, 3D trajectories, 2D tracks with visibility, cameras, object poses,
  bends, wall background), ``make_scene`` / ``scene_names`` / ``random_scene``, ``save_scene`` / ``load_scene``,
  ``load_video_input`` (MP4 or frame folder + per-object mask folders / videos) and pose / depth ground truth.
* ``video_metrics``: ``frame_error``, ``motion_accuracy``, ``flicker``, ``text_alignment``, ``diversity``,
  ``domain_quality``, ``clip_score`` and ``evaluate_videos`` (all of them at once) for generated videos.
"""
from .clips import (Clip, ClipSpec, degrade, hq_images, parse_video_prompt, reference_clips, render_clip, render_clips,
                    sample_clip_specs, sample_clips, video_prompt, video_prompts)
from .metrics import (chamfer_to_surface, evaluate_gaussians, janus_score, psnr, saturation_gap, silhouette_iou,
                      ssim)
from .objects import OBJECTS, ShapeObject, find_object_for_prompt, get_object, list_objects
from .references import (front_back_cameras, held_out_cameras, reference_cameras, reference_gaussians,
                         reference_views, render_gaussian_views, render_reference)
from .video_metrics import (analyze_videos, classify_videos, clip_score, diversity, domain_quality, evaluate_videos,
                            flicker, frame_error, motion_accuracy, text_alignment)

__all__ = [
    "OBJECTS", "ShapeObject", "list_objects", "get_object", "find_object_for_prompt",
    "reference_gaussians", "reference_cameras", "held_out_cameras", "front_back_cameras", "reference_views",
    "render_reference", "render_gaussian_views",
    "psnr", "ssim", "silhouette_iou", "chamfer_to_surface", "saturation_gap", "janus_score", "evaluate_gaussians",
    "ClipSpec", "Clip", "parse_video_prompt", "video_prompt", "video_prompts", "sample_clip_specs", "render_clip",
    "render_clips", "sample_clips", "reference_clips", "degrade", "hq_images",
    "analyze_videos", "classify_videos", "frame_error", "motion_accuracy", "flicker", "text_alignment", "diversity",
    "domain_quality", "clip_score", "evaluate_videos",
]
