"""The render demo (the main job until text-to-3D lands) and ``studio render`` of a PLY or ``.splat`` file.

``studio render`` reads a 3DGS PLY (the file starts with ``ply``; any SH degree) or the project's own
antimatter15 ``.splat`` output (by its suffix; base colours only), and refuses a file with no Gaussians.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_write_text, read_ply, read_splat, write_mp4, write_ply, write_png_grid, write_splat
from .render import resolve_backend
from .students.gaussians import rgb_to_sh
from .render.turntable import render_turntable


@dataclass
class DemoConfig:
    object_name: str = "snowman"
    out: str = "outputs/demo"
    frames: int = 36
    size: int = 256
    n_gaussians: int = 20000
    backend: str = "auto"
    seed: int = 0


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise UserError(f"--{name.replace('_', '-')} must be between {lo} and {hi}, got {value}")


def gaussians_to_ply_fields(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Activated Gaussians (RGB colours) -> the stored 3DGS fields (log-scales, logits, SH DC)."""
    return {
        "means": g["means"],
        "scales_log": torch.log(g["scales"].clamp_min(1e-12)),
        "quats": g["quats"],
        "opacity_logits": torch.logit(g["opacities"].clamp(1e-6, 1 - 1e-6)),
        "sh": rgb_to_sh(g["colors"])[:, None, :],
    }


def _write_outputs(g, out: Path, stem: str, *, frames: int, size: int, backend: str, radius=3.2, elevation=15.0,
                   fovy=35.0, sh_degree=None) -> dict:
    t0 = time.perf_counter()
    video = render_turntable(g, n_frames=frames, size=size, backend=backend, radius=radius, elevation_deg=elevation,
                             fovy_deg=fovy, sh_degree=sh_degree)
    t_render = time.perf_counter() - t0
    write_mp4(out / "turntable.mp4", video, fps=min(24, max(1, frames // 3)))
    step = max(1, frames // 8)
    write_png_grid(out / "views.png", video[::step][:8], ncols=4)
    return {"render_seconds": round(t_render, 3), "seconds_per_frame": round(t_render / frames, 4),
            "backend": resolve_backend(backend, g["means"].device), "frames": frames, "size": size}


def run_demo(*, object_name: str, out: Path, frames: int, size: int, n_gaussians: int, backend: str, seed: int) -> dict:
    from .world.objects import get_object

    _check_range("frames", frames, 1, 720)
    _check_range("size", size, 16, 2048)
    _check_range("n_gaussians", n_gaussians, 1, 5_000_000)
    obj = get_object(object_name)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig(obj.name, str(out), frames, size, n_gaussians, backend, seed)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    g = obj.gaussians(n_gaussians, seed=seed)
    fields = gaussians_to_ply_fields(g)
    write_ply(out / f"{obj.name}.ply", **fields)
    write_splat(out / f"{obj.name}.splat", **fields)
    metrics = {"object": obj.name, "prompt": obj.prompt, "n_gaussians": n_gaussians,
               **_write_outputs(g, out, obj.name, frames=frames, size=size, backend=backend)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    print(f"wrote {out}/{obj.name}.ply, {obj.name}.splat, turntable.mp4, views.png "
          f"({metrics['seconds_per_frame'] * 1000:.0f} ms/frame, backend {metrics['backend']})")
    return metrics


def read_gaussians(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None, str]:
    """The activated Gaussians of a 3DGS PLY or a ``.splat`` file for rendering: ``(gaussians, sh_degree, format)``
    with ``colors`` SH coefficients (PLY, ``sh_degree`` 0..3) or RGB in [0,1] (``.splat``, ``sh_degree`` None).
    A file starting with ``ply`` is read as PLY, else a ``.splat`` suffix as splat. Raises ``UserError`` naming the
    file for a missing or unreadable file (the reader's message) and for one with 0 Gaussians."""
    p = Path(path)
    magic = b""
    if p.is_file():
        with open(p, "rb") as fh:
            magic = fh.read(3)
    if magic != b"ply" and p.suffix.lower() == ".splat":  # a missing file: the reader's message names it
        d = read_splat(p)
        q = d["quats"]
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g = {"means": d["means"], "quats": q, "scales": d["scales"], "opacities": d["opacities"], "colors": d["colors"]}
        degree, fmt = None, "splat"
    else:
        data = read_ply(p)  # its message names the file when it is not a PLY
        g = {"means": data["means"], "quats": data["quats"], "scales": torch.exp(data["scales"]),
             "opacities": torch.sigmoid(data["opacities"]), "colors": data["sh"]}
        degree, fmt = data["sh_degree"], "ply"
    if g["means"].shape[0] == 0:
        raise UserError(f"'{path}' holds 0 Gaussians: there is nothing to render (the run that wrote it may have "
                        "pruned them all); give a file with at least one Gaussian")
    return g, degree, fmt


def render_ply(ply: Path, *, out: Path, frames: int, size: int, radius: float, elevation: float, fovy: float,
               backend: str) -> dict:
    """``studio render``: a turntable video and a grid of views of a PLY or ``.splat`` file (see module doc)."""
    _check_range("frames", frames, 1, 720)
    _check_range("size", size, 16, 2048)
    for name, value, ok, want in (("radius", radius, radius > 0, "a positive number"),
                                  ("elevation", elevation, -90 <= elevation <= 90, "degrees in -90..90"),
                                  ("fovy", fovy, 0 < fovy < 180, "degrees between 0 and 180")):
        if not (math.isfinite(value) and ok):
            raise UserError(f"--{name} must be {want}, got {value}")
    g, degree, fmt = read_gaussians(ply)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"ply": str(ply), "format": fmt, "n_gaussians": int(g["means"].shape[0]), "sh_degree": degree,
               **_write_outputs(g, out, Path(ply).stem, frames=frames, size=size, backend=backend, radius=radius,
                                elevation=elevation, fovy=fovy, sh_degree=degree)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    print(f"wrote {out}/turntable.mp4 and views.png from {ply}")
    return metrics
