"""The methods: one module (or package) per paper, registered in :mod:`methods.registry`.

``run`` is the library's one call for every method and kind::

    from methods import run
    from methods.sds import SDSConfig

    metrics = run(SDSConfig(prompt="a blue ball", steps=200), out="outputs")   # the method of that config
    metrics = run(cfg, "vsd", out="outputs", resume=True)                       # or by registry name
"""
from __future__ import annotations

from pathlib import Path


def run(cfg, method=None, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
        callbacks=None, progress: bool = True) -> dict:
    """Run ``method`` (a registered name, a method instance, or None: the method whose ``Config`` is
    ``type(cfg)``) through the run skeleton (:func:`studio.runs.skeleton.execute`); returns the metrics."""
    from studio.runs.skeleton import execute

    from .registry import get_method, method_for_config

    if method is None:
        m = method_for_config(cfg)()
    elif isinstance(method, str):
        m = get_method(method)()
    else:
        m = method
    return execute(m, cfg, m.default_out if out is None else out, resume=resume, overwrite=overwrite,
                   callbacks=callbacks, progress=progress)
