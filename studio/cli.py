"""The ``studio`` command.

Runs are generated from the method registry, with no code per kind: ``studio run METHOD [INPUT] [options]`` runs
any method (plugins included); a kind's ``verb`` is a shortcut that runs its methods (``studio generate PROMPT``,
``studio video generate PROMPT``, ``studio video distill``), ``studio batch PROMPTS.txt`` runs any method whose
input is a prompt. Each method's options come from its ``Config`` dataclass (tyro); ``--method``, ``--out``,
``--resume`` and ``--overwrite`` are common to all. The other commands (demo, render, doctor, build-ext, app) are
typed functions.

User errors (``UserError`` / ``ValueError`` / missing files) print one message (cut to a readable length) and exit
with code 2; set ``STUDIO_DEBUG=1`` to see the traceback instead. SIGTERM stops a run like Ctrl-C (checkpoint
kept; exit 143, Ctrl-C 130); a closed output pipe (``studio generate --help | head``) ends quietly.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import tyro

from .errors import UserError

Backend = Literal["auto", "torch", "native", "cuda", "gsplat"]


def demo(
    object: str = "snowman",
    out: Path = Path("outputs/demo"),
    frames: int = 36,
    size: int = 256,
    n_gaussians: int = 20000,
    backend: Backend = "auto",
    seed: int = 0,
) -> None:
    """Render a built-in procedural object: turntable MP4, PNG views, 3DGS PLY and .splat."""
    from .demo import run_demo

    run_demo(object_name=object, out=out, frames=frames, size=size, n_gaussians=n_gaussians, backend=backend, seed=seed)


def render(
    ply: tyro.conf.Positional[Path],
    out: Path = Path("outputs/render"),
    frames: int = 36,
    size: int = 256,
    radius: float = 3.2,
    elevation: float = 15.0,
    fovy: float = 35.0,
    backend: Backend = "auto",
) -> None:
    """Render a 3DGS PLY (Inria layout) or .splat file to a turntable MP4 and a PNG grid."""
    from .demo import render_ply

    render_ply(ply, out=out, frames=frames, size=size, radius=radius, elevation=elevation, fovy=fovy, backend=backend)


def doctor() -> None:
    """Report torch / CUDA / compiler / extension / gsplat status in one table."""
    from .doctor import run_doctor

    run_doctor()


def build_ext(cuda: bool = False) -> None:
    """Build (or reuse) the native C++ extensions, and the CUDA ones with --cuda on a CUDA machine."""
    from .render import extension_status as render_status
    from .students import extension_status as student_status

    status = {**render_status(cuda), **student_status()}
    for name, error in status.items():
        print(f"{name + ':':<17}{'ok' if error is None else 'FAILED: ' + str(error)}")
    if any(error is not None for error in status.values()):
        raise SystemExit(1)


def app(
    host: str = "127.0.0.1",
    port: int = 7860,
    out: Path = Path("outputs/app"),
    models_dir: Path = Path("models"),
    concurrency: int = 1,
    max_steps: int = 20000,
    open_browser: bool = False,
) -> None:
    """The Gradio app on http://HOST:PORT (127.0.0.1 only by default); teacher paths must lie in --models-dir."""
    from .app import serve

    serve(host=host, port=port, out=out, models_dir=models_dir, concurrency=concurrency, max_steps=max_steps,
          open_browser=open_browser)


# -- runs, generated from the registry ----------------------------------------------------------------
COMMON = "--method NAME  --out DIR  --resume / --no-resume  --overwrite"
MAX_MESSAGE = 1000


def _verbs() -> dict[tuple[str, ...], list[type]]:
    """Each registered verb and the method classes it runs."""
    from methods.registry import method_classes

    verbs: dict[tuple[str, ...], list[type]] = {}
    for cls in method_classes():
        if cls.verb:
            verbs.setdefault(tuple(cls.verb), []).append(cls)
    return verbs


def _default_method(classes: list[type]) -> type:
    marked = [c for c in classes if c.default_for_verb]
    return (marked or classes)[0]


def _parse_common(argv: list[str], *, batch: bool):
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--out", default=None)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--no-resume", dest="resume", action="store_false")
    pre.add_argument("--overwrite", action="store_true")
    pre.set_defaults(resume=batch)
    return pre.parse_known_args(argv)


def _config_from_cli(cls: type, rest: list[str], prog: str, *, batch: bool, choices: list[type]):
    """Parse ``cls.Config`` with tyro: the method's input positional (a prompts file with ``batch``)."""
    import dataclasses
    import typing

    from .runs.protocol import field_docs

    hints = typing.get_type_hints(cls.Config)
    docs = field_docs(cls.Config)  # make_dataclass loses the attribute docstrings: carry them as help texts
    hints = {k: (typing.Annotated[tp, tyro.conf.arg(help=docs[k])] if docs.get(k) else tp) for k, tp in hints.items()}
    names = ", ".join(c.name for c in choices)
    desc = f"{cls.description}" + (f" ({cls.paper})" if cls.paper else "") + f". Methods here: {names}. Also: {COMMON}."
    fields = []
    for f in dataclasses.fields(cls.Config):
        if f.name == cls.input:
            if batch:
                continue
            fields.append((f.name, tyro.conf.Positional[hints[f.name]], f))
        else:
            fields.append((f.name, hints[f.name], f))
    if batch:
        fields.insert(0, ("prompts", tyro.conf.Positional[Path], dataclasses.field()))
    Options = dataclasses.make_dataclass("Options", fields)
    parsed = tyro.cli(Options, args=rest, prog=prog, description=desc)
    values = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls.Config)
              if not (batch and f.name == cls.input)}
    if batch:
        return cls.Config(**values), parsed.prompts
    return cls.Config(**values), None


def run_command(argv: list[str], prog: str, classes: list[type], *, method: str | None = None) -> None:
    """Parse and run one method of ``classes`` (``method`` or ``--method``, else the verb's default)."""
    from methods.registry import get_method

    from .runs.skeleton import execute

    known, rest = _parse_common(argv, batch=False)
    name = method or known.method
    cls = get_method(name) if name else _default_method(classes)
    if cls not in classes:
        raise UserError(f"method {name!r} does not run under '{prog}'; choose one of: "
                        f"{', '.join(c.name for c in classes)} (or use: studio run {name} ...)")
    cfg, _ = _config_from_cli(cls, rest, prog, batch=False, choices=classes)
    m = cls()
    metrics = execute(m, cfg, known.out or m.default_out, resume=known.resume, overwrite=known.overwrite)
    print(m.summary(metrics, Path(metrics["run_dir"])))


def run(argv: list[str]) -> None:
    """`studio run METHOD [INPUT] [options]`: any registered method (plugins too)."""
    from methods.registry import method_classes

    classes = method_classes()
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print("usage: studio run METHOD [INPUT] [options]   (studio run METHOD --help for its options)\n")
            print(_methods_table(classes))
            return
        raise UserError("studio run needs a method name; e.g. studio run sds \"a red cube\" (studio run --help "
                        "lists them)")
    run_command(argv[1:], f"studio run {argv[0]}", classes, method=argv[0])


def batch(argv: list[str]) -> None:
    """`studio batch PROMPTS.txt [--method M] [options]`: many prompts, resumable; shard with accelerate launch."""
    from methods.registry import get_method, method_classes

    from .runs.batch import read_prompts, run_batch

    classes = [c for c in method_classes() if c.input == "prompt"]
    known, rest = _parse_common(argv, batch=True)
    cls = get_method(known.method) if known.method else _default_method([c for c in classes if c.verb == ("generate",)]
                                                                        or classes)
    if cls not in classes:
        raise UserError(f"method {cls.name!r} does not take a prompt; studio batch runs: "
                        f"{', '.join(c.name for c in classes)}")
    base, prompts_file = _config_from_cli(cls, rest, "studio batch", batch=True, choices=classes)
    prompts, skipped = read_prompts(prompts_file)
    m = cls()
    rows = run_batch(prompts, base, m, known.out or m.default_out, resume=known.resume, overwrite=known.overwrite,
                     skipped=skipped)
    if any(r["status"] != "done" for r in rows):
        raise SystemExit(1)


def _methods_table(classes: list[type]) -> str:
    lines = ["methods (kind: how to run):"]
    for c in classes:
        how = f"studio {' '.join(c.verb)} --method {c.name}" if c.verb else f"studio run {c.name}"
        lines.append(f"  {c.name:<14} {c.kind_title or c.kind}: {how}")
        if c.description:
            lines.append(f"  {'':<14} {c.description}" + (f" ({c.paper})" if c.paper else ""))
    return "\n".join(lines)


def _help() -> str:
    from methods.registry import method_classes

    classes = method_classes()
    verbs = sorted({" ".join(c.verb) for c in classes if c.verb})
    lines = ["usage: studio COMMAND [options]   (studio COMMAND --help for its options)", "",
             "Distillation studio: 3D/4D score distillation and fast video generators.", "", "commands:",
             "  run METHOD [INPUT]   run any method (below)"]
    lines += [f"  {v:<20} run a {next(c for c in classes if ' '.join(c.verb) == v).kind_title or v} method"
              for v in verbs]
    lines += ["  batch PROMPTS.txt    one method over many prompts (resumable)"]
    for name, fn in COMMANDS.items():
        lines.append(f"  {name:<20} {(fn.__doc__ or '').strip().splitlines()[0]}")
    lines += ["", _methods_table(classes)]
    return "\n".join(lines)


COMMANDS = {"demo": demo, "render": render, "doctor": doctor, "build-ext": build_ext, "app": app}


def _dispatch(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        return
    if args[0] == "run":
        return run(args[1:])
    if args[0] == "batch":
        return batch(args[1:])
    verbs = _verbs()
    for n in (2, 1):
        key = tuple(args[:n])
        if key in verbs:
            return run_command(args[n:], "studio " + " ".join(key), verbs[key])
    groups = {v[0]: [" ".join(k) for k in verbs if k[0] == v[0]] for v in verbs if len(v) > 1}
    if args[0] in groups:
        usage = "usage: " + " | ".join(f"studio {v} ..." for v in groups[args[0]])
        if len(args) == 1 or args[1] in ("-h", "--help"):
            print(usage)
            return
        raise UserError(f"unknown command 'studio {args[0]} {args[1]}'; {usage}")
    tyro.extras.subcommand_cli_from_dict(COMMANDS, args=args, prog="studio",
                                         description="Distillation studio: 3D/4D score distillation and fast video "
                                                     "generators (studio --help lists runs and methods).")


def _shorten(msg: str, limit: int = MAX_MESSAGE) -> str:
    return msg if len(msg) <= limit else f"{msg[:limit]}... ({len(msg) - limit} more characters cut)"


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush does not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        try:
            _dispatch(list(args))
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(0) from None
    except (UserError, ValueError, FileNotFoundError) as e:
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"error: {_shorten(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        from .train.loop import Terminated

        print("terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    except RuntimeError as e:
        from .train.loop import TrainingCancelled, TrainingDiverged

        if os.environ.get("STUDIO_DEBUG") or not isinstance(e, (TrainingCancelled, TrainingDiverged)):
            raise
        print(f"error: {_shorten(str(e))}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
