"""The Gradio studio app: ``python app.py`` or ``studio app`` (binds 127.0.0.1:7860 by default).

``build_app(AppSettings(...))`` returns the (unlaunched) ``gr.Blocks``; ``serve(...)`` launches it.
The logic without UI lives in :mod:`studio.app.core`, widgets-from-dataclasses in
:mod:`studio.app.forms`, the layout in :mod:`studio.app.ui`.
"""
from __future__ import annotations

from pathlib import Path

from .core import AppSettings

__all__ = ["AppSettings", "build_app", "serve"]


def build_app(settings: AppSettings | None = None):
    from .ui import build_app as _build

    return _build(settings)


def serve(host: str = "127.0.0.1", port: int = 7860, out: Path = Path("outputs/app"), models_dir: Path = Path("models"),
          concurrency: int = 1, max_steps: int = 20000, open_browser: bool = False) -> None:
    from .ui import launch

    launch(AppSettings(out=out, models_dir=models_dir, concurrency=concurrency, max_steps=max_steps),
           host=host, port=port, open_browser=open_browser)
