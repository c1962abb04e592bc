"""Atomic file writes: the single place where the studio writes files.

Every writer produces its bytes in a temporary file *in the destination folder* (same filesystem, so
the final ``os.replace`` is an atomic rename) and renames it over the target only once the write has
succeeded. A crash or exception mid-write leaves the previous file (if any) untouched and no partial
file behind.

The temporary name keeps the target's suffix (``.x.mp4.tmp-1a2b.mp4``) so tools that infer the format
from the extension (ffmpeg, imageio, PIL) behave exactly as they would on the final path.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable where the platform allows it (POSIX); harmless elsewhere.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it.

    The parent folder is created if needed. The yielded path exists as an empty placeholder file that
    writers may overwrite, truncate or replace freely.

    >>> with atomic_path("out/video.mp4") as tmp:   # doctest: +SKIP
    ...     write_with_any_library(tmp)
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer removed the temporary file {tmp} before it could be renamed to {target}")
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the final path."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically; returns the final path."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)
