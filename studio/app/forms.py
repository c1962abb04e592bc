"""Widgets from config dataclasses, generically: one :class:`FieldSpec` per (nested) field.

The app never hand-writes a method's options: ``field_specs(cls.Config)`` walks the dataclass (and
nested dataclasses such as ``stage: GaussianStageConfig``) and gives each field a widget kind by type:
bool -> checkbox, int / float -> number, Literal -> dropdown, str -> textbox, tuples -> textbox
``"a, b"``, anything else -> a YAML textbox. ``build_config`` turns widget values back into the
dataclass, with a readable :class:`~studio.errors.UserError` naming the field for a bad value.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from ..errors import UserError
from ..runs.protocol import field_docs

#: fields shown in the main form (when the config has them); all others go to "Advanced settings"
PRIMARY = ("prompt", "stage.negative_prompt", "teacher", "model", "steps", "resolution", "guidance_scale", "seed")


@dataclass(frozen=True)
class FieldSpec:
    path: str  # dotted: "steps", "stage.batch_size"
    kind: str  # bool | int | float | choice | str | tuple | yaml
    default: Any
    optional: bool = False  # None is allowed (an empty widget means None)
    choices: tuple = ()
    elem_types: tuple = ()  # tuple element types
    doc: str = ""

    @property
    def label(self) -> str:
        return self.path

    @property
    def is_primary(self) -> bool:
        return self.path in PRIMARY


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def field_specs(cls: type, prefix: str = "") -> list[FieldSpec]:
    """Every leaf field of the config dataclass ``cls`` (nested dataclasses flattened with dots)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[FieldSpec] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        path = prefix + f.name
        default = _default(f)
        doc = docs.get(f.name, "")
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.extend(field_specs(tp, prefix=path + "."))
            continue
        origin = typing.get_origin(tp)
        if tp is bool:
            spec = FieldSpec(path, "bool", default, optional, doc=doc)
        elif tp is int:
            spec = FieldSpec(path, "int", default, optional, doc=doc)
        elif tp is float:
            spec = FieldSpec(path, "float", default, optional, doc=doc)
        elif origin is Literal:
            spec = FieldSpec(path, "choice", default, optional, choices=tuple(typing.get_args(tp)), doc=doc)
        elif tp is str:
            spec = FieldSpec(path, "str", default, optional, doc=doc)
        elif origin is tuple and typing.get_args(tp) and Ellipsis not in typing.get_args(tp):
            spec = FieldSpec(path, "tuple", default, optional, elem_types=tuple(typing.get_args(tp)), doc=doc)
        else:
            spec = FieldSpec(path, "yaml", default, optional, doc=doc)
        out.append(spec)
    return out


def _fmt_number(x) -> str:
    return repr(x) if isinstance(x, float) else str(x)


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value as its widget shows it (optional numbers are text boxes: empty = None)."""
    if spec.kind in ("int", "float") and spec.optional:
        return "" if value is None else _fmt_number(value)
    if value is None:
        return None if spec.kind in ("int", "float") else ("" if spec.kind in ("str", "tuple", "yaml") else value)
    if spec.kind == "tuple":
        return ", ".join(_fmt_number(v) for v in value)
    if spec.kind == "yaml":
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if spec.kind == "int":
        return int(value)
    if spec.kind == "float":
        return float(value)
    return value


def _convert(spec: FieldSpec, value: Any, tp: type, what: str):
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{what} must be a whole number, got {value!r}")
        if isinstance(value, str):
            value = value.strip()
            try:
                return int(value)
            except ValueError:
                raise UserError(f"{what} must be a whole number, got {value!r}") from None
        if isinstance(value, float) and not value.is_integer():
            raise UserError(f"{what} must be a whole number, got {value!r}")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{what} must be a number, got {value!r}") from None
    return tp(value)


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """A widget value as the config field's type; raises UserError naming the field."""
    what = f"'{spec.label}'"
    if isinstance(value, str) and spec.kind not in ("str", "choice"):
        value = value.strip()
    empty = value is None or (isinstance(value, str) and value == "" and spec.kind != "str")
    if spec.kind == "str":
        if spec.optional and (value is None or not str(value).strip()):
            return None
        return "" if value is None else str(value)  # an empty text is the library's to judge (validate())
    if empty:
        if spec.optional:
            return None
        raise UserError(f"{what} is empty; give a value (default: {to_widget(spec, spec.default)})")
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        return _convert(spec, value, int if spec.kind == "int" else float, what)
    if spec.kind == "choice":
        if value not in spec.choices:
            raise UserError(f"{what} must be one of {', '.join(map(str, spec.choices))}; got {value!r}")
        return value
    if spec.kind == "tuple":
        parts = [p.strip() for p in str(value).strip("()[] ").split(",")]
        n = len(spec.elem_types)
        example = ", ".join(_fmt_number(v) for v in spec.default) if spec.default else "a, b"
        if len(parts) != n or any(p == "" for p in parts):
            raise UserError(f"{what} needs {n} comma-separated values such as '{example}'; got {value!r}")
        return tuple(_convert(spec, p, t, what) for p, t in zip(parts, spec.elem_types))
    try:
        return yaml.safe_load(str(value))
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not valid YAML: {e}") from None


def build_config(cls: type, values: dict[str, Any]):
    """``cls()`` with the given widget values (dotted paths) applied; unknown paths are ignored."""
    cfg = cls()
    specs = {s.path: s for s in field_specs(cls)}
    for path, raw in values.items():
        spec = specs.get(path)
        if spec is None:
            continue
        value = from_widget(spec, raw)
        target = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return cfg


def config_values(cls: type, config: dict) -> dict[str, Any]:
    """Widget values (dotted paths) from a nested config dict, e.g. a run's ``config.yaml``."""
    out: dict[str, Any] = {}
    for spec in field_specs(cls):
        node: Any = config
        found = True
        for p in spec.path.split("."):
            if isinstance(node, dict) and p in node:
                node = node[p]
            else:
                found = False
                break
        if found:
            out[spec.path] = to_widget(spec, tuple(node) if spec.kind == "tuple" and isinstance(node, list) else node)
    return out
