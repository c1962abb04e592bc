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
(each entry point names a factory, or a :class:`TeacherSpec`).

Guidance defaults live here too, one place for all methods: a registration carries the teacher's CFG
scale per *role* (how a method uses it), and :func:`default_guidance` answers for any teacher name;
names without one (local folders, Hugging Face ids, registered teachers that give none for a role) get
the real-model value of that role, :data:`REAL_MODEL_GUIDANCE`.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError

ENTRY_POINT_GROUP = "studio.teachers"


#: The roles a teacher's CFG scale is looked up for, with the scale of a real model (a folder, a Hugging Face
#: id, or a registered teacher that gives none for the role):
#:
#: * ``sds``: score distillation of a 3D student (SDS, BSD's SDS ablation, DSD's SDS preset): DreamFusion's 100;
#: * ``vsd``: variational score distillation (VSD, DSD's VSD preset): ProlificDreamer's 7.5;
#: * ``sample``: sampling images from a text-to-image teacher (PlacidDreamer's reference image): 7.5;
#: * ``sample_video``: sampling videos from a text-to-video teacher (``studio video generate``): 4.0. Its own
#:   role, as its fallback differs from ``sample``'s.
REAL_MODEL_GUIDANCE: dict[str, float] = {"sds": 100.0, "vsd": 7.5, "sample": 7.5, "sample_video": 4.0}
GUIDANCE_ROLES = tuple(REAL_MODEL_GUIDANCE)


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    factory: Callable[..., Any]
    description: str = ""
    guidance: Mapping[str, float] = field(default_factory=dict)
    """CFG scale per role (see :data:`REAL_MODEL_GUIDANCE`); a role left out takes the real-model value."""


_REGISTRY: dict[str, TeacherSpec] = {}
_entry_points_loaded = False


def _check_guidance(name: str, guidance: Mapping[str, float] | None) -> dict[str, float]:
    out = {}
    for role, scale in (guidance or {}).items():
        if role not in REAL_MODEL_GUIDANCE:
            raise ValueError(f"teacher {name!r}: unknown guidance role {role!r}; roles are {', '.join(GUIDANCE_ROLES)}")
        out[role] = float(scale)
    return out


def register_teacher(name: str, factory: Callable[..., Any], description: str = "", *,
                     guidance: Mapping[str, float] | None = None, overwrite: bool = False) -> None:
    """Register ``factory(**kw) -> ImageTeacher`` under ``name`` (case-insensitive), with its default CFG
    scale per role in ``guidance`` (``{"sds": 20.0, "vsd": 4.0, "sample": 4.0}``; roles left out take the
    real-model values of :data:`REAL_MODEL_GUIDANCE`)."""
    key = name.strip().lower()
    if not key:
        raise ValueError("teacher name must be non-empty")
    if key in _REGISTRY and not overwrite and _REGISTRY[key].factory is not factory:
        raise ValueError(f"a teacher named {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = TeacherSpec(key, factory, description, _check_guidance(name, guidance))


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
            register_teacher(ep.name, obj.factory, obj.description, guidance=obj.guidance)
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


def _registered(name: str) -> TeacherSpec | None:
    """The registration ``name`` resolves to (as in :func:`load_teacher`: an existing folder wins)."""
    _load_entry_points()
    spec = _REGISTRY.get(name.lower())
    return spec if spec is not None and not os.path.isdir(os.path.expanduser(name)) else None


def default_guidance(teacher: str | os.PathLike, role: str) -> float:
    """The default CFG scale of ``teacher`` (registered name, folder or Hugging Face id) for ``role``
    (``"sds"``, ``"vsd"``, ``"sample"`` or ``"sample_video"``; see :data:`REAL_MODEL_GUIDANCE`): the one its
    registration gives, else the real-model value of the role."""
    if role not in REAL_MODEL_GUIDANCE:
        raise ValueError(f"unknown guidance role {role!r}; roles are {', '.join(GUIDANCE_ROLES)}")
    spec = _registered(os.fspath(teacher).strip())
    if spec is not None and role in spec.guidance:
        return spec.guidance[role]
    return REAL_MODEL_GUIDANCE[role]


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
    spec = _registered(name)
    if spec is not None:
        return spec.factory(**kw)
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
    :class:`~studio.teachers.video_base.VideoTeacher`).

    Raises:
        UserError: as :func:`load_teacher`, or when the teacher is an image model.
    """
    from .video_base import VideoTeacher

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


# Text-to-video teachers (weights from the Hugging Face hub; see studio.teachers.diffusers_video); their
# sampling guidance is their pipelines' default.
register_teacher("modelscope-t2v",
                 _video_factory("make_modelscope_t2v", "ModelScopeTeacher (ali-vilab/text-to-video-ms-1.7b)"),
                 "ModelScope text-to-video 1.7B, 256 px, 16 frames, epsilon (ali-vilab/text-to-video-ms-1.7b)",
                 guidance={"sample_video": 9.0})
register_teacher("animatediff",
                 _video_factory("make_animatediff", "AnimateDiffTeacher (SD 1.5 + motion adapter v1-5-2)"),
                 "AnimateDiff: SD 1.5 + guoyww/animatediff-motion-adapter-v1-5-2, 512 px, 16 frames, epsilon",
                 guidance={"sample_video": 7.5})
register_teacher("wan2.1-t2v-1.3b",
                 _video_factory("make_wan21_t2v_13b", "WanTeacher (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"),
                 "Wan 2.1 text-to-video 1.3B, 480p, 81 frames, rectified flow (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)",
                 guidance={"sample_video": 5.0})


# chosen by the CFG sweep of scripts/shapeworld_video_readouts.py on the shipped weights (docs/notes/issue16.md)
CFG_UNET = 4.0


def _shapeworld_video(maker: str) -> Callable[..., Any]:
    def factory(**kw: Any):
        from . import shapeworld_video
        return getattr(shapeworld_video, maker)(**kw)
    factory.is_video = True
    return factory


# The exact teacher is the data distribution itself, so it needs no guidance: CFG > 1 extrapolates past its
# clips (at 8 flow steps, CFG 4 drops its motion accuracy from 1.0 to 0.74 on the static-camera prompts).
register_teacher("shapeworld-video-exact", _shapeworld_video("make_shapeworld_video_exact"),
                 "ShapeWorld video exact optimal denoiser of the reference clips, 8 frames 32x32, rectified flow "
                 "(text conditioned, no download)", guidance={"sample_video": 1.0})
register_teacher("shapeworld-video-wan", _shapeworld_video("make_shapeworld_video_wan"),
                 "ShapeWorld tiny trained text-to-video model (Wan classes), pixel space 8x32x32, rectified flow "
                 "(shipped in assets/)", guidance={"sample_video": 4.0})
register_teacher("shapeworld-video-unet", _shapeworld_video("make_shapeworld_video_unet"),
                 "ShapeWorld tiny trained text-to-video model (AnimateDiff classes: UNetMotionModel), pixel space "
                 "8x16x16, rectified flow (shipped in assets/; partly trained, issue 16)",
                 guidance={"sample_video": CFG_UNET})


def _shapeworld_exact(**kw: Any):
    from .shapeworld_exact import make_shapeworld_exact
    return make_shapeworld_exact(**kw)


def _shapeworld_unet(**kw: Any):
    from .shapeworld_unet import make_shapeworld_unet
    return make_shapeworld_unet(**kw)


# The exact teacher is the optimal denoiser of its renders: guidance 1 samples them, more extrapolates past them.
register_teacher("shapeworld-exact", _shapeworld_exact,
                 "ShapeWorld exact optimal denoiser of the reference renders (text + camera conditioned, no download)",
                 guidance={"sds": 1.0, "vsd": 1.0, "sample": 1.0})
# The tiny trained UNet (assets/shapeworld-unet): 20 for SDS, 4 for VSD and for sampling.
register_teacher("shapeworld-unet", _shapeworld_unet,
                 "ShapeWorld tiny trained text-to-image UNet, pixel space 32x32, epsilon (shipped in assets/)",
                 guidance={"sds": 20.0, "vsd": 4.0, "sample": 4.0})


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
