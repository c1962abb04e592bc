"""The method registry: built-in methods register here; third-party ones through the ``studio.methods`` entry
point group (``name = "package.module:MethodClass"``), as nerfstudio's do.

A method follows the one protocol of :mod:`studio.runs.protocol` (name, kind, paper, description, ``Config``,
``input``, ``run``); the CLI, ``studio batch``, the app and :func:`methods.run` call only that.
"""
from __future__ import annotations

import warnings
from importlib import import_module
from importlib.metadata import entry_points

from studio.errors import UserError

_BUILTIN = {
    # name -> "module:Class"; imported lazily so `studio --help` stays fast.
    "sds": "methods.sds:SDSMethod",
    "vsd": "methods.vsd:VSDMethod",
    "placiddreamer": "methods.placiddreamer:PlacidDreamerMethod",
    "dreampolish": "methods.dreampolish:DreamPolishMethod",
    "video-sample": "studio.runs.video_generate:VideoGenerateMethod",
    "lcm": "methods.video_lcm:VideoLCMMethod",
    "mcm": "methods.mcm:MCMMethod",
    "dreamscene4d": "methods.dreamscene4d:DreamScene4DMethod",
    "euphonium": "methods.euphonium:EuphoniumMethod",
    "dreamsteerer": "methods.dreamsteerer:DreamSteererMethod",
    "stream-r1": "methods.stream_r1:StreamR1Method",
}
_REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator / function registering a method class under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> dict[str, str]:
    found = dict(_BUILTIN)
    try:
        for ep in entry_points(group="studio.methods"):
            found.setdefault(ep.name, ep.value)
    except Exception:  # noqa: BLE001 - broken third-party metadata must not break the studio
        pass
    return {**found, **{n: "" for n in _REGISTRY if n not in found}}


def method_names(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind``); a method that fails to load is warned about and left out."""
    return [cls.name for cls in method_classes() if kind is None or cls.kind == kind]


def method_classes() -> list[type]:
    """Every loadable method class, sorted by name (a broken plugin is reported, not fatal)."""
    out = []
    for n in sorted(_discover()):
        try:
            out.append(get_method(n))
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"method {n!r} could not be loaded: {e}", RuntimeWarning, stacklevel=2)
    return out


def get_method(name: str) -> type:
    if name in _REGISTRY:
        return _REGISTRY[name]
    spec = _discover().get(name)
    if spec is None:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_discover()))}")
    mod, _, attr = spec.partition(":")
    cls = getattr(import_module(mod), attr)
    _REGISTRY[name] = cls
    return cls


def method_for_config(cfg) -> type:
    """The method whose ``Config`` is exactly ``type(cfg)``."""
    for cls in method_classes():
        if type(cfg) is cls.Config:
            return cls
    raise UserError(f"no registered method takes a {type(cfg).__name__}; name the method")
