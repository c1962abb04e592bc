"""Frozen teachers behind one protocol.

* :class:`NoiseSchedule` -- the only place for noise arithmetic (eps / v / x0 / flow conversions, timesteps).
* :class:`ImageTeacher` / :class:`TextCond` -- the teacher protocol and encoded prompts.
* :func:`view_conditioned`, :func:`view_suffixes` -- view-dependent prompting.
* :class:`DiffusersTeacher` -- SD 1.x/2.x teachers from diffusers weights (imported lazily: diffusers and
  transformers load only when it is used).
* :func:`load_teacher`, :func:`register_teacher`, :func:`list_teachers` -- the registry;
  :func:`default_guidance` -- a teacher's default CFG scale per role (``sds``, ``vsd``, ``sample``, ``sample_video``).
"""
from .base import ImageTeacher, TextCond
from .prompts import interpolation_weights, view_conditioned, view_prompts, view_suffixes, wrap_azimuth
from .registry import TeacherSpec, default_guidance, list_teachers, load_teacher, register_teacher, unregister_teacher
from .schedule import PREDICTION_TYPES, NoiseSchedule, canonical_prediction_type

__all__ = [
    "NoiseSchedule", "PREDICTION_TYPES", "canonical_prediction_type",
    "ImageTeacher", "TextCond",
    "view_suffixes", "view_prompts", "view_conditioned", "interpolation_weights", "wrap_azimuth",
    "register_teacher", "unregister_teacher", "load_teacher", "list_teachers", "TeacherSpec", "default_guidance",
    "DiffusersTeacher",
]


def __getattr__(name: str):
    if name == "DiffusersTeacher":
        from .diffusers_sd import DiffusersTeacher
        return DiffusersTeacher
    raise AttributeError(f"module 'studio.teachers' has no attribute {name!r}")
