"""The ``studio`` command. Subcommands are generated from typed functions with tyro.

User errors (``UserError`` / ``ValueError`` / missing files) print one message and exit with code 2;
set ``STUDIO_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import json
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
    """Render a 3DGS PLY file (Inria layout) to a turntable MP4 and a PNG grid."""
    from .demo import render_ply

    render_ply(ply, out=out, frames=frames, size=size, radius=radius, elevation=elevation, fovy=fovy, backend=backend)


def doctor() -> None:
    """Report torch / CUDA / compiler / extension / gsplat status in one table."""
    from .doctor import run_doctor

    run_doctor()


def build_ext(cuda: bool = False) -> None:
    """Build (or reuse) the native C++ extensions, and the CUDA ones with --cuda on a CUDA machine."""
    from .render import _cuda, _mesh_ext, _native
    from .students import _hashgrid_ext

    ok = _native.available()
    print(f"native: {'ok' if ok else 'FAILED: ' + str(_native.load_error())}")
    okm = _mesh_ext.available("native")
    print(f"native mesh: {'ok' if okm else 'FAILED: ' + str(_mesh_ext.load_error('native'))}")
    okh = _hashgrid_ext.available()
    print(f"native hashgrid: {'ok' if okh else 'FAILED: ' + str(_hashgrid_ext.load_error())}")
    ok = ok and okm and okh
    if cuda:
        okc = _cuda.available()
        print(f"cuda:   {'ok' if okc else 'FAILED: ' + str(_cuda.load_error())}")
        okcm = _mesh_ext.available("cuda")
        print(f"cuda mesh: {'ok' if okcm else 'FAILED: ' + str(_mesh_ext.load_error('cuda'))}")
        ok = ok and okc and okcm
    if not ok:
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


def _method_config_cli(argv: list[str], prog: str, *, batch: bool, kind: str = "3d", default_method: str = "sds"):
    """Parse ``--method/--out/--resume`` first, then the chosen method's config dataclass with tyro.

    ``kind="3d"``: text-to-3D (a positional PROMPT, or a prompts file with ``batch``); ``kind="video"``: video
    distillation methods (every config field is an option)."""
    import argparse
    import dataclasses

    from methods.registry import get_method, method_names

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=default_method)
    pre.add_argument("--out", default="outputs")
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--no-resume", dest="resume", action="store_false")
    pre.set_defaults(resume=batch)
    known, rest = pre.parse_known_args(argv)
    cls = get_method(known.method)
    what = {"3d": "text-to-3D", "video": "video distillation"}[kind]
    if getattr(cls, "kind", None) != kind:
        raise UserError(f"method {known.method!r} is not a {what} method; choose one of: "
                        f"{', '.join(method_names(kind)) or '(none installed)'}")
    desc = (f"{cls.description} ({cls.paper}). Also: --method {{{','.join(method_names(kind))}}} "
            f"--out DIR (default outputs) {'--no-resume' if batch else '--resume'}.")
    import typing

    hints = typing.get_type_hints(cls.Config)
    if kind == "video":
        fields = [(f.name, hints[f.name], f) for f in dataclasses.fields(cls.Config)]
        Cfg = dataclasses.make_dataclass("DistillOptions", fields)
        parsed = tyro.cli(Cfg, args=rest, prog=prog, description=desc)
        return known, cls, None, cls.Config(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls.Config)})
    fields = [(f.name, hints[f.name], f) for f in dataclasses.fields(cls.Config) if f.name != "prompt"]
    if batch:
        Cfg = dataclasses.make_dataclass("BatchOptions", [("prompts", tyro.conf.Positional[Path])] + fields)
        parsed = tyro.cli(Cfg, args=rest, prog=prog, description=desc)
        values = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls.Config) if f.name != "prompt"}
        return known, cls, parsed.prompts, cls.Config(prompt="", **values)
    Cfg = dataclasses.make_dataclass("GenerateOptions", [("prompt", tyro.conf.Positional[str])] + fields)
    parsed = tyro.cli(Cfg, args=rest, prog=prog, description=desc)
    return known, cls, None, cls.Config(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls.Config)})


def generate(argv: list[str]) -> None:
    """Text to 3D Gaussians: studio generate PROMPT [--method sds|vsd] [--teacher shapeworld-exact|shapeworld-unet|ID|PATH] [--steps] [--resolution] [--seed] [--out]."""
    from .text_to_3d import generate as run

    known, cls, _, cfg = _method_config_cli(argv, "studio generate", batch=False)
    metrics = run(cfg, known.method, known.out, resume=known.resume)
    gt = metrics.get("ground_truth")
    extra = f", PSNR {gt['psnr']:.2f} dB, IoU {gt['iou']:.3f}" if gt else ""
    print(f"done in {metrics['train_seconds']:.0f}s{extra}: {Path(known.out)}/{_slug(cfg.prompt)}/")


def batch(argv: list[str]) -> None:
    """Many prompts from a text file (one per line), resumable; shard with `accelerate launch -m studio batch ...`."""
    from .batch import read_prompts, run_batch

    known, cls, prompts_file, cfg = _method_config_cli(argv, "studio batch", batch=True)
    rows = run_batch(read_prompts(prompts_file), cfg, known.method, known.out, resume=known.resume)
    if any(r["status"] != "done" for r in rows):
        raise SystemExit(1)


def video(argv: list[str]) -> None:
    """Text-to-video: `studio video generate PROMPT [--model M] [--steps N] [--out]`; `studio video distill --method NAME ...`."""
    usage = ("usage: studio video generate PROMPT [--model NAME|PATH|STUDENT_DIR] [--steps N] [--sampler auto|flow|ddim|lcm] "
             "[--guidance-scale W] [--num-videos K] [--seed S] [--out DIR]\n"
             "       studio video distill --method NAME [--out DIR] [--resume] [method options, see --help]")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    sub, rest = argv[0], list(argv[1:])
    if sub == "generate":
        import dataclasses
        import typing

        from .video import VideoGenerateConfig, generate_video

        hints = typing.get_type_hints(VideoGenerateConfig)
        fields = [(f.name, (tyro.conf.Positional[str] if f.name == "prompt" else hints[f.name]), f)
                  for f in dataclasses.fields(VideoGenerateConfig)]
        Cfg = dataclasses.make_dataclass("VideoGenerateOptions", fields + [("out", Path, dataclasses.field(
            default=Path("outputs/video")))])
        parsed = tyro.cli(Cfg, args=rest, prog="studio video generate",
                          description="Sample a video from a teacher or a distilled student; writes MP4, frames, "
                                      "metrics.json.")
        cfg = VideoGenerateConfig(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(VideoGenerateConfig)})
        m = generate_video(cfg, parsed.out)
        gt = m.get("ground_truth")
        extra = (f", motion accuracy {gt['motion_accuracy']:.2f}, frame error {gt['frame_error']:.3f}" if gt else "")
        print(f"done in {m['seconds']:.1f}s ({m['sampler']}, {m['steps']} steps){extra}: {parsed.out}/{_slug(cfg.prompt)}/")
        return
    if sub == "distill":
        known, cls, _, cfg = _method_config_cli(rest, "studio video distill", batch=False, kind="video",
                                                default_method="lcm")
        metrics = cls().run(cfg, Path(known.out), resume=known.resume)
        print(json.dumps(metrics.get("headline", metrics), indent=2, default=str))
        print(f"student: {metrics.get('student', known.out)}")
        return
    raise UserError(f"unknown video command {sub!r}; {usage}")


def _slug(prompt: str) -> str:
    from .text_to_3d import slugify

    return slugify(prompt)


COMMANDS = {"generate": generate, "video": video, "batch": batch, "demo": demo, "render": render, "doctor": doctor,
            "build-ext": build_ext, "app": app}
#: subcommands that parse their own arguments (their options depend on --method)
_RAW = {"generate": generate, "batch": batch, "video": video}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in _RAW:
            _RAW[args[0]](list(args[1:]))
            return
        tyro.extras.subcommand_cli_from_dict(COMMANDS, args=args, prog="studio",
                                             description="Distillation studio: 3D/4D score distillation and fast video generators.")
    except (UserError, ValueError, FileNotFoundError) as e:
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
