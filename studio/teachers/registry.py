"""Teacher registry: names -> factories, else a local folder / Hugging Face id.

``load_teacher("shapeworld-exact")`` calls a registered factory; ``load_teacher("/path/to/sd")`` or
``load_teacher("stabilityai/stable-diffusion-2-1-base")`` loads a diffusers SD-family model through
:meth:`studio.teachers.diffusers_sd.DiffusersTeacher.from_pretrained`; text-to-video layouts go by
``model_index.json``'s ``_class_name`` to :mod:`studio.teachers.diffusers_video` (``TextToVideoSDPipeline`` ->
``ModelScopeTeacher``, ``AnimateDiffPipeline`` -> ``AnimateDiffTeacher``, ``WanPipeline`` -> ``WanTeacher``; an SD
folder with ``motion_adapter=`` -> ``AnimateDiffTeacher``), and :func:`load_video_teacher` insists on a video
teacher; a Zero123 layout (``model_index.json``
with a ``clip_camera_projection`` / ``cc_projection``, or an ``image_encoder`` and an 8-channel UNet, or an
uncached hub id naming zero123) loads as :class:`studio.teachers.novel_view.Zero123Teacher`.
Third-party packages register teachers through the ``studio.teachers`` entry-point group
(each entry point names a factory).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

ENTRY_POINT_GROUP = "studio.teachers"


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    factory: Callable[..., Any]
    description: str = ""


_REGISTRY: dict[str, TeacherSpec] = {}
_entry_points_loaded = False


def register_teacher(name: str, factory: Callable[..., Any], description: str = "", *,
                     overwrite: bool = False) -> None:
    """Register ``factory(**kw) -> ImageTeacher`` under ``name`` (case-insensitive)."""
    key = name.strip().lower()
    if not key:
        raise ValueError("teacher name must be non-empty")
    if key in _REGISTRY and not overwrite and _REGISTRY[key].factory is not factory:
        raise ValueError(f"a teacher named {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = TeacherSpec(key, factory, description)


def unregister_teacher(name: str) -> None:
    _REGISTRY.pop(name.strip().lower(), None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - a broken environment must not break teacher loading
        return
    for ep in eps:
        if ep.name.strip().lower() in _REGISTRY:
            continue
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"teacher entry point {ep.name!r} could not be loaded: {e}", stacklevel=2)
            continue
        if isinstance(obj, TeacherSpec):
            register_teacher(ep.name, obj.factory, obj.description)
        elif callable(obj):
            register_teacher(ep.name, obj, (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else "")
        else:
            warnings.warn(f"teacher entry point {ep.name!r} is not callable; ignored", stacklevel=2)


def list_teachers() -> dict[str, str]:
    """Registered teacher names -> descriptions (sorted)."""
    _load_entry_points()
    return {k: _REGISTRY[k].description for k in sorted(_REGISTRY)}


def _is_path_or_hub_id(name: str) -> bool:
    return (os.path.exists(os.path.expanduser(name)) or "/" in name or os.sep in name
            or name.startswith((".", "~")))


def load_teacher(name_or_path: str | os.PathLike, **kw: Any):
    """A teacher by registered name, local folder, or Hugging Face id (``owner/name``).

    Keyword arguments go to the factory (for folders / hub ids: ``DiffusersTeacher.from_pretrained``:
    device, dtype, lora, attention_slicing, local_files_only, ...).

    Raises:
        UserError: unknown name (the message lists the registered ones), or a path / id that cannot be loaded.
    """
    name = os.fspath(name_or_path).strip()
    if not name:
        raise UserError("no teacher given: pass a registered name (see list_teachers()), a local folder or a "
                        "Hugging Face id")
    _load_entry_points()
    key = name.lower()
    if key in _REGISTRY and not os.path.isdir(os.path.expanduser(name)):
        return _REGISTRY[key].factory(**kw)
    if _is_path_or_hub_id(name):
        from . import diffusers_video as dv
        if kw.get("motion_adapter") is not None:  # SD 1.x + motion adapter (or an AnimateDiff layout)
            return dv.AnimateDiffTeacher.from_pretrained(name, **kw)
        video_cls = dv.video_teacher_class(dv.video_layout(name))
        if video_cls is not None:  # TextToVideoSDPipeline / AnimateDiffPipeline / WanPipeline layouts
            return video_cls.from_pretrained(name, **kw)
        from .novel_view import Zero123Teacher, is_zero123_layout
        if is_zero123_layout(name):  # image-conditioned novel-view layout (Zero123 / Zero123-XL)
            return Zero123Teacher.from_pretrained(name, **kw)
        from .diffusers_sd import DiffusersTeacher
        return DiffusersTeacher.from_pretrained(name, **kw)
    known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
    raise UserError(f"unknown teacher {name!r}: registered teachers are {known}; or give a local folder with "
                    "model_index.json or a Hugging Face id such as stabilityai/stable-diffusion-2-1-base")


def load_video_teacher(name_or_path: str | os.PathLike, **kw: Any):
    """:func:`load_teacher` for methods that need a text-to-video teacher (a
    :class:`~studio.teachers.video.VideoTeacher`).

    Raises:
        UserError: as :func:`load_teacher`, or when the teacher is an image model.
    """
    from .video import VideoTeacher

    teacher = load_teacher(name_or_path, **kw)
    if not isinstance(teacher, VideoTeacher):
        video = sorted(k for k, spec in _REGISTRY.items() if getattr(spec.factory, "is_video", False))
        raise UserError(f"teacher {os.fspath(name_or_path)!r} is an image model ({type(teacher).__name__}), but a "
                        f"text-to-video teacher is needed: give a ModelScope T2V, AnimateDiff or Wan folder / "
                        f"Hugging Face id, or one of {', '.join(video) or 'the registered video teachers'}")
    return teacher


def _hub_factory(repo_id: str) -> Callable[..., Any]:
    def factory(**kw: Any):
        from .diffusers_sd import DiffusersTeacher
        return DiffusersTeacher.from_pretrained(repo_id, **kw)
    factory.__doc__ = f"DiffusersTeacher.from_pretrained({repo_id!r})"
    return factory


# Short names for the SD-family teachers the papers use (weights come from the Hugging Face hub).
register_teacher("sd21-base", _hub_factory("stabilityai/stable-diffusion-2-1-base"),
                 "Stable Diffusion 2.1-base, 512 px, epsilon (stabilityai/stable-diffusion-2-1-base)")
register_teacher("sd21", _hub_factory("stabilityai/stable-diffusion-2-1"),
                 "Stable Diffusion 2.1, 768 px, v-prediction (stabilityai/stable-diffusion-2-1)")
register_teacher("sd15", _hub_factory("stable-diffusion-v1-5/stable-diffusion-v1-5"),
                 "Stable Diffusion 1.5, 512 px, epsilon (stable-diffusion-v1-5/stable-diffusion-v1-5)")


def _video_factory(maker: str, doc: str) -> Callable[..., Any]:
    def factory(**kw: Any):
        from . import diffusers_video
        return getattr(diffusers_video, maker)(**kw)
    factory.__doc__ = doc
    factory.is_video = True
    return factory


# Text-to-video teachers (weights from the Hugging Face hub; see studio.teachers.diffusers_video).
register_teacher("modelscope-t2v",
                 _video_factory("make_modelscope_t2v", "ModelScopeTeacher (ali-vilab/text-to-video-ms-1.7b)"),
                 "ModelScope text-to-video 1.7B, 256 px, 16 frames, epsilon (ali-vilab/text-to-video-ms-1.7b)")
register_teacher("animatediff",
                 _video_factory("make_animatediff", "AnimateDiffTeacher (SD 1.5 + motion adapter v1-5-2)"),
                 "AnimateDiff: SD 1.5 + guoyww/animatediff-motion-adapter-v1-5-2, 512 px, 16 frames, epsilon")
register_teacher("wan2.1-t2v-1.3b",
                 _video_factory("make_wan21_t2v_13b", "WanTeacher (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"),
                 "Wan 2.1 text-to-video 1.3B, 480p, 81 frames, rectified flow (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")


def _shapeworld_video(maker: str) -> Callable[..., Any]:
    def factory(**kw: Any):
        from . import shapeworld_video
        return getattr(shapeworld_video, maker)(**kw)
    factory.is_video = True
    return factory


register_teacher("shapeworld-video-exact", _shapeworld_video("make_shapeworld_video_exact"),
                 "ShapeWorld video exact optimal denoiser of the reference clips, 8 frames 32x32, rectified flow "
                 "(text conditioned, no download)")
register_teacher("shapeworld-video-wan", _shapeworld_video("make_shapeworld_video_wan"),
                 "ShapeWorld tiny trained text-to-video model (Wan classes), pixel space 8x32x32, rectified flow "
                 "(shipped in assets/)")


def _shapeworld_exact(**kw: Any):
    from .shapeworld_exact import make_shapeworld_exact
    return make_shapeworld_exact(**kw)


register_teacher("shapeworld-exact", _shapeworld_exact,
                 "ShapeWorld exact optimal denoiser of the reference renders (text + camera conditioned, no download)")

from . import shapeworld_unet as _shapeworld_unet  # noqa: E402,F401 - registers "shapeworld-unet" (shipped in assets/)


def _zero123_xl(**kw: Any):
    from .novel_view import make_zero123_xl
    return make_zero123_xl(**kw)


def _shapeworld_nv_exact(**kw: Any):
    from .novel_view import make_shapeworld_nv_exact
    return make_shapeworld_nv_exact(**kw)


def _shapeworld_nv_unet(**kw: Any):
    from .novel_view import make_shapeworld_nv_unet
    return make_shapeworld_nv_unet(**kw)


register_teacher("zero123-xl", _zero123_xl,
                 "Zero123-XL novel-view model, 256 px, image + relative camera conditioned "
                 "(bennyguo/zero123-xl-diffusers)")
register_teacher("shapeworld-nv-exact", _shapeworld_nv_exact,
                 "ShapeWorld exact novel-view teacher: reference image + relative camera (no download)")
register_teacher("shapeworld-nv-unet", _shapeworld_nv_unet,
                 "ShapeWorld tiny trained novel-view model (Zero123 layout), pixel space 32x32, reference image + "
                 "relative camera (shipped in assets/)")
