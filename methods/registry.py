"""The method registry: built-in methods register here; third-party ones through the
``studio.methods`` entry point group (``name = "package.module:MethodClass"``), as nerfstudio does.

A method is a class with ``name``, ``description``, ``paper`` (URL), ``kind`` ("3d", "4d", "video",
"image"), a ``Config`` dataclass (the CLI and the app generate their options from it) and
``run(cfg, out_dir, *, teacher=None, callbacks=None, resume=False) -> dict`` (metrics).
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from studio.errors import UserError

_BUILTIN = {
    # name -> "module:Class"; imported lazily so `studio --help` stays fast.
    "sds": "methods.sds:SDSMethod",
    "vsd": "methods.vsd:VSDMethod",
    "placiddreamer": "methods.placiddreamer:PlacidDreamerMethod",
    "dreampolish": "methods.dreampolish:DreamPolishMethod",
    "lcm": "methods.video_lcm:VideoLCMMethod",
    "mcm": "methods.mcm:MCMMethod",
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
    except Exception:  # broken third-party metadata must not break the studio
        pass
    return found


def method_names(kind: str | None = None) -> list[str]:
    names = sorted(_discover())
    if kind is None:
        return names
    out = []
    for n in names:
        try:
            if getattr(get_method(n), "kind", None) == kind:
                out.append(n)
        except Exception as e:  # a broken plugin is reported, not fatal
            import warnings

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
