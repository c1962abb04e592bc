"""The one method protocol: what the CLI, ``studio batch``, the app and library users call.

A method is a class with

* ``name`` (the registry key), ``kind`` (its family: ``"3d"``, ``"video-generate"``, ``"video-distill"``, or any
  new string a plugin brings), ``kind_title`` (the app tab's title), ``paper`` (URL), ``description``;
* ``Config``: a dataclass; the CLI options and the app's form are generated from it;
* ``input``: the name of the ``Config`` field that holds the run's main input (``"prompt"``; an image, video or
  asset path for editing / video-to-4D methods), or ``None`` for methods without one (video distillation reads a
  prompt set). The CLI makes it the positional argument; ``studio batch`` fills it with each line of a prompt
  file (methods whose input is ``"prompt"``); the app puts it at the top of the form;
* ``verb``: the CLI words that run the kind (``("generate",)``, ``("video", "distill")``); every method also
  runs as ``studio run NAME``;
* ``validate(cfg)``: input checks that raise :class:`~studio.errors.UserError` before any folder is made;
* ``resolve(cfg) -> cfg``: defaults that depend on other fields (e.g. the guidance scale of the teacher);
* ``run(cfg, run_dir, *, callbacks=None, resume=False, progress=True) -> metrics``: the work itself, writing its
  artefacts into ``run_dir``;
* ``summary(metrics, run_dir) -> str``: the CLI's closing line; ``examples()``: inputs the app offers.

Everything around ``run`` -- number checks, the run folder ``out/<slug>/``, refusing to overwrite a finished run,
``config.yaml`` and comparing it on ``--resume``, ``metrics.json`` (also for interrupted runs), SIGTERM as
Ctrl-C -- is written once in :func:`studio.runs.skeleton.execute`. Callbacks receive each training step's record
(``step``, ``steps``, ``loss``, ``it_s``, ``preview``...) and cancel the run by returning ``False``.
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UserError

#: the longest input echoed in a message (a 100 kB prompt must not be repeated whole)
ECHO_CHARS = 80


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr`` of a user value for a message, cut to ``limit`` characters."""
    s = repr(value)
    return s if len(s) <= limit else f"{s[:limit - 1]}... ({len(str(value))} characters)"


def slugify(text: str, max_len: int = 60) -> str:
    """The folder name of a prompt: lowercase ASCII words joined by ``-`` (see :func:`skeleton.run_folder` for
    how distinct prompts with one slug get distinct folders)."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s[:max_len].rstrip("-") or "prompt"


class Method:
    """Base of every method (module doc). Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = "base"
    kind: ClassVar[str] = "other"
    kind_title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type]
    input: ClassVar[str | None] = "prompt"
    verb: ClassVar[tuple[str, ...]] = ()
    #: the method a verb runs when ``--method`` is not given (one per verb)
    default_for_verb: ClassVar[bool] = False
    default_out: ClassVar[str] = "outputs"

    @classmethod
    def examples(cls) -> list[str]:
        """Example inputs the app offers under the input box (ShapeWorld prompts with ground truth)."""
        return []

    def validate(self, cfg) -> None:
        """Raise ``UserError`` for bad input; nothing is written before this passes."""
        if self.input is not None:
            value = getattr(cfg, self.input, None)
            if value is None or not str(value).strip():
                raise UserError(f"the {self.input} is empty; give one, e.g. studio run {self.name} \"a red cube\""
                                if self.input == "prompt" else f"--{self.input.replace('_', '-')} is empty")

    def resolve(self, cfg):
        """The config with environment-dependent defaults filled in (written to ``config.yaml``)."""
        return cfg

    def continues(self, cfg) -> bool:
        """True when ``cfg`` builds on parts saved in its run folder by an earlier run (e.g. DreamPolish's
        ``--from-stage``): the skeleton then lets it replace that run's later results without ``--overwrite``."""
        return False

    def run_name(self, cfg) -> str:
        """The run folder's name under ``--out``: the slug of the input; ``""`` (``--out`` itself) without one."""
        if self.input is None:
            return ""
        value = getattr(cfg, self.input)
        return slugify(Path(value).stem if self.input != "prompt" else value)

    def run(self, cfg, run_dir: Path, *, callbacks=None, resume: bool = False, progress: bool = True) -> dict:
        raise NotImplementedError

    def summary(self, metrics: dict, run_dir: Path) -> str:
        secs = metrics.get("train_seconds", metrics.get("seconds"))
        took = f" in {secs:.0f}s" if isinstance(secs, (int, float)) else ""
        return f"done{took}: {run_dir}/"


def method_info(cls: type) -> dict:
    """Name, kind and paper of a method class, as the CLI and the app list them."""
    return {"name": cls.name, "kind": cls.kind, "title": cls.kind_title or cls.kind, "paper": cls.paper,
            "description": cls.description, "input": cls.input, "verb": " ".join(cls.verb)}


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of the config dataclass ``cls`` and its bases:
    the help text of its options in the CLI and the app."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs
