"""Images and videos: PNG previews, PNG grids, MP4 turntables (write) and video reading.

* Frames/images are ``[T,H,W,C]`` / ``[H,W,C]`` (channels last, as the renderers output), ``uint8`` or
  float in [0, 1] (clamped), numpy arrays or torch tensors; ``C`` is 1 (grey), 3 (RGB) or 4 (RGBA; the
  alpha channel is dropped for MP4).
* ``write_mp4`` uses ffmpeg through imageio-ffmpeg: H.264 (``libx264``), ``yuv420p`` (the pixel format
  every browser and player decodes); odd widths/heights are padded to even by repeating the last
  row/column, never rescaled.
* ``read_video`` decodes with decord (falls back to imageio/ffmpeg when decord is unavailable or fails)
  and returns float ``[T,H,W,3]`` in [0, 1].
* Every write is atomic (see ``studio.io.atomic``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path

__all__ = ["write_mp4", "write_png", "write_png_grid", "make_grid", "read_video", "to_uint8"]

VIDEO_HINT = "expected an mp4/webm/gif file"


def to_uint8(x: Any, *, name: str = "image") -> np.ndarray:
    """Convert a numpy array / torch tensor (uint8, or float in [0,1]) to a uint8 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.uint8:
            return x.numpy()
        if not (x.is_floating_point() or x.dtype == torch.bool):
            raise ValueError(f"{name} must be uint8 or float in [0, 1], got torch dtype {x.dtype}")
        x = x.float().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _channels_last(arr: np.ndarray, name: str, ndim: int, shape_desc: str, keep_alpha: bool) -> np.ndarray:
    if arr.ndim == ndim - 1:  # grey without channel axis
        arr = arr[..., None]
    if arr.ndim != ndim or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must have shape {shape_desc} (channels last, C in 1/3/4), got {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4 and not keep_alpha:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def write_mp4(path: str | os.PathLike, frames: Any, fps: float = 24.0, *, quality: float | None = 8.0) -> Path:
    """Write ``frames [T,H,W,3]`` (uint8, or float in [0,1]) as an H.264/yuv420p MP4, atomically.

    ``quality`` is imageio-ffmpeg's 0..10 scale (higher is better; ``None`` lets ffmpeg choose).
    Odd sizes are padded to even by edge replication. Returns the path written.
    """
    arr = _channels_last(to_uint8(frames, name="frames"), "frames", 4, "[T, H, W, C]", keep_alpha=False)
    if arr.shape[0] == 0:
        raise ValueError("frames is empty: write_mp4 needs at least one frame")
    if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    _, h, w, _ = arr.shape
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    import imageio.v2 as iio

    with atomic_path(path) as tmp:
        writer = iio.get_writer(
            str(tmp), format="FFMPEG", mode="I", fps=float(fps), codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, quality=quality, ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],
        )
        try:
            for frame in arr:
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def write_png(path: str | os.PathLike, img: Any) -> Path:
    """Write one image ``[H,W,C]`` / ``[H,W]`` (uint8, or float in [0,1]; C in 1/3/4) as PNG, atomically."""
    arr = _channels_last(to_uint8(img), "image", 3, "[H, W, C]", keep_alpha=True)
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


def make_grid(images: Any, ncols: int | None = None, *, pad: int = 0, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``images [N,H,W,C]`` into a uint8 grid ``[rows*H + pads, ncols*W + pads, C]``.

    ``ncols`` defaults to ``ceil(sqrt(N))``; empty cells and the ``pad`` pixels between tiles are filled
    with ``pad_value`` (in [0,1]).
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([to_uint8(im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3), np.uint8)
    arr = _channels_last(to_uint8(images, name="images"), "images", 4, "[N, H, W, C]", keep_alpha=True)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("images is empty: a grid needs at least one image")
    ncols = int(math.ceil(math.sqrt(n))) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = int(math.ceil(n / ncols))
    fill = int(round(min(max(pad_value, 0.0), 1.0) * 255))
    grid = np.full((nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = arr[i]
    return grid


def write_png_grid(path: str | os.PathLike, images: Any, ncols: int | None = None, *, pad: int = 0,
                   pad_value: float = 1.0) -> np.ndarray:
    """Write ``images [N,H,W,C]`` tiled ``ncols`` wide (see ``make_grid``) as one PNG; returns the grid."""
    grid = make_grid(images, ncols, pad=pad, pad_value=pad_value)
    write_png(path, grid)
    return grid


def _frame_indices(total: int, num_frames: int | None) -> list[int]:
    if num_frames is None:
        return list(range(total))
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    if num_frames == 1:
        return [0]
    return [int(round(i * (total - 1) / (num_frames - 1))) for i in range(num_frames)]


def _read_decord(path: Path, num_frames: int | None) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(vr)
    if total == 0:
        raise ValueError("the video has no frames")
    return vr.get_batch(_frame_indices(total, num_frames)).asnumpy()


def _read_imageio(path: Path, num_frames: int | None) -> np.ndarray:
    import imageio.v3 as iio

    frames = iio.imread(path, index=None)  # all frames: [T,H,W,C] (or [H,W,C] for a still)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.shape[0] == 0:
        raise ValueError("the video has no frames")
    return frames[_frame_indices(frames.shape[0], num_frames)]


def read_video(path: str | os.PathLike, num_frames: int | None = None,
               size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Read a video as float ``[T,H,W,3]`` in [0, 1].

    ``num_frames`` samples that many frames uniformly over the clip (first and last included; ``None``
    reads all). ``size`` resizes to ``(H, W)`` (an int means square) with antialiased bilinear
    filtering. Raises ``ValueError("could not read video '<path>': <why>; expected an mp4/webm/gif file")``
    for a missing or undecodable file.
    """
    p = Path(path)
    if size is not None:
        hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"size must be an int or (height, width) with positive values, got {size!r}")
    if not p.exists():
        raise ValueError(f"could not read video '{path}': file not found; {VIDEO_HINT}")
    if not p.is_file():
        raise ValueError(f"could not read video '{path}': not a regular file; {VIDEO_HINT}")
    errors: list[str] = []
    frames = None
    for reader in (_read_decord, _read_imageio):
        try:
            frames = reader(p, num_frames)
            break
        except ImportError as exc:
            errors.append(f"{reader.__name__[6:]} unavailable ({exc})")
        except Exception as exc:  # decoders raise assorted types (DECORDError, OSError, RuntimeError...)
            errors.append(f"{reader.__name__[6:]}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    if frames is None:
        raise ValueError(f"could not read video '{path}': {'; '.join(errors)}; {VIDEO_HINT}")
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3]
    out = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)
    if size is not None and tuple(out.shape[1:3]) != hw:
        out = F.interpolate(out.permute(0, 3, 1, 2), size=hw, mode="bilinear", align_corners=False,
                            antialias=True).clamp_(0.0, 1.0).permute(0, 2, 3, 1).contiguous()
    return out
