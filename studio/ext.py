"""Build-on-first-use loader for the kernels in ``cuda_ext/`` (one place for every extension).

Extensions are compiled with ``torch.utils.cpp_extension.load`` into a cache folder keyed by the torch
version (``$STUDIO_EXT_DIR`` or ``~/.cache/studio/ext``); torch re-builds only when a source changes
and serialises concurrent builds with a lock file. ``studio build-ext`` pre-builds them all.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from cuda_ext import SOURCE_DIR

_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    root = Path(os.environ.get("STUDIO_EXT_DIR", Path.home() / ".cache" / "studio" / "ext"))
    tag = "torch" + torch.__version__.replace("+", "_").replace(".", "_")
    return root / tag


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def load(name: str, sources: list[str], *, cuda: bool = False, extra_cflags: list[str] | None = None,
         extra_cuda_cflags: list[str] | None = None, extra_ldflags: list[str] | None = None) -> ModuleType:
    """Compile (or reuse) extension ``name`` from ``sources`` (paths relative to ``cuda_ext/``).

    Raises ``RuntimeError`` with the compiler's message on failure; the error is remembered so a
    failing build is attempted once per process.
    """
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        raise RuntimeError(_errors[name])
    from torch.utils import cpp_extension

    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    try:
        mod = cpp_extension.load(
            name=name,
            sources=[str(SOURCE_DIR / s) for s in sources],
            extra_cflags=extra_cflags or [],
            extra_cuda_cflags=extra_cuda_cflags or [],
            extra_ldflags=extra_ldflags or [],
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(build),
            with_cuda=cuda,
            verbose=bool(os.environ.get("STUDIO_EXT_VERBOSE")),
        )
    except Exception as e:  # compiler missing, compile error, ...
        msg = f"could not build extension '{name}': {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
        _errors[name] = msg
        raise RuntimeError(msg) from e
    _loaded[name] = mod
    return mod


def load_error(name: str) -> str | None:
    return _errors.get(name)


class Extension:
    """One native extension's loader: ``load()`` builds on first use (``RuntimeError`` with the compiler's message
    when it cannot be built; tried once per process), ``available()`` never raises, ``load_error()`` says why it is
    unavailable. Modules bind these as their ``_load`` / ``available`` / ``load_error``."""

    def __init__(self, name: str, sources: list[str], *, extra_cflags: list[str] | None = None,
                 extra_ldflags: list[str] | None = None) -> None:
        self.name, self.sources = name, list(sources)
        self.extra_cflags, self.extra_ldflags = extra_cflags, extra_ldflags

    def load(self) -> ModuleType:
        return load(self.name, self.sources, extra_cflags=self.extra_cflags, extra_ldflags=self.extra_ldflags)

    def available(self) -> bool:
        try:
            self.load()
            return True
        except Exception:  # noqa: BLE001 - available() must never raise
            return False

    def load_error(self) -> str | None:
        return load_error(self.name)
