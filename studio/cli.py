"""The ``studio`` command. Subcommands are generated from typed functions with tyro.

User errors (``UserError`` / ``ValueError`` / missing files) print one message and exit with code 2;
set ``STUDIO_DEBUG=1`` to see the traceback instead.
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
    """Render a 3DGS PLY file (Inria layout) to a turntable MP4 and a PNG grid."""
    from .demo import render_ply

    render_ply(ply, out=out, frames=frames, size=size, radius=radius, elevation=elevation, fovy=fovy, backend=backend)


def doctor() -> None:
    """Report torch / CUDA / compiler / extension / gsplat status in one table."""
    from .doctor import run_doctor

    run_doctor()


def build_ext(cuda: bool = False) -> None:
    """Build (or reuse) the native C++ extension, and the CUDA one with --cuda on a CUDA machine."""
    from .render import _cuda, _native

    ok = _native.available()
    print(f"native: {'ok' if ok else 'FAILED: ' + str(_native.load_error())}")
    if cuda:
        okc = _cuda.available()
        print(f"cuda:   {'ok' if okc else 'FAILED: ' + str(_cuda.load_error())}")
        ok = ok and okc
    if not ok:
        raise SystemExit(1)


COMMANDS = {"demo": demo, "render": render, "doctor": doctor, "build-ext": build_ext}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
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
