"""``studio doctor``: one table of what this machine offers the studio."""
from __future__ import annotations

import platform
import subprocess


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "installed")
    except Exception as e:  # missing or broken
        return f"not available ({type(e).__name__})"


def collect() -> list[tuple[str, str]]:
    import torch

    from . import ext, render, students

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("torch threads", str(torch.get_num_threads()))]
    if torch.cuda.is_available():
        rows.append(("CUDA", f"yes: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"))
    else:
        rows.append(("CUDA", "no (CPU only)"))
    cxx = "found" if ext.compiler_available() else "missing (native backend falls back to torch)"
    rows.append(("C++ compiler", cxx))
    nvcc = ext.nvcc_path()
    if nvcc:
        try:
            v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
        except Exception:
            v = "found"
        rows.append(("nvcc", f"{nvcc} ({v})"))
    else:
        rows.append(("nvcc", "not found"))
    for name, error in {**render.extension_status(cuda=True), **students.extension_status()}.items():
        rows.append((f"{name} extension", "ok" if error is None else f"unavailable: {error}"))
    rows.append(("gsplat", _version("gsplat")))
    rows.append(("extension cache", str(ext.cache_dir())))
    for mod in ("diffusers", "transformers", "gradio", "decord"):
        rows.append((mod, _version(mod)))
    try:
        import imageio_ffmpeg

        rows.append(("ffmpeg", imageio_ffmpeg.get_ffmpeg_exe()))
    except Exception as e:
        rows.append(("ffmpeg", f"not available ({type(e).__name__})"))
    from .render import resolve_backend

    rows.append(("default backend (cpu)", resolve_backend("auto", torch.device("cpu"))))
    return rows


def run_doctor() -> None:
    rows = collect()
    w = max(len(k) for k, _ in rows)
    print(f"{'component'.ljust(w)} | status")
    print(f"{'-' * w}-+-{'-' * 40}")
    for k, v in rows:
        print(f"{k.ljust(w)} | {v}")
