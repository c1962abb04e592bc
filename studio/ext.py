"""Build-on-first-use loader for the kernels in ``cuda_ext/`` (one place for every extension).

Layout: ``<root>/torch<version>/<name>/<key>/`` where ``<root>`` is ``$STUDIO_EXT_DIR`` (default
``~/.cache/studio/ext``) and ``<key>`` hashes everything that decides the binary: the extension's sources
and the local headers they include (by content), the build flags, CUDA or not, the Python ABI tag and the
compiler (``$CXX``, ``$CUDA_HOME``). So two checkouts or versions of the project never rebuild each other's
extension, and a changed kernel gets a fresh folder instead of a rebuild in place. The sources are staged
(copied) into ``<key>/src`` and compiled from there, so two checkouts with identical sources share one build.

A finished build is marked by ``<key>/ok``; loading a marked build takes no lock. Building takes an exclusive
``flock`` on ``<key>/build.lock`` (``msvcrt.locking`` on Windows): the operating system drops it when its
owner dies, so a builder killed mid-build (SIGKILL, OOM, power loss) never blocks the next one, which also
removes torch's own stale baton file (``<key>/lock``; only a holder of our lock can be inside torch's build
for that folder). A live builder is waited for with a note on stderr and at most ``$STUDIO_EXT_LOCK_TIMEOUT``
seconds (default 1800: a first CUDA build takes minutes); then :class:`ExtensionLockTimeout` names the lock
file, its holder and the fix. ``studio build-ext`` pre-builds every extension.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from cuda_ext import SOURCE_DIR
from studio.errors import UserError

_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}
_process_lock = threading.RLock()  # one builder per process (flock also excludes other threads, this is cheaper)

LOCK_NAME = "build.lock"  #: our lock file inside a build folder
TORCH_BATON = "lock"  #: torch.utils.cpp_extension's own lock file (a FileBaton: waits forever while it exists)
MARKER = "ok"  #: written after a build loaded successfully
DEFAULT_LOCK_TIMEOUT_S = 1800.0
NOTE_AFTER_S = 1.0  #: print the "waiting for another builder" note after this long


class ExtensionLockTimeout(UserError, RuntimeError):
    """Waited too long for another process building the same extension. A ``RuntimeError`` as every other
    load failure (so ``available()`` falls back), and a ``UserError``: its message names the lock and the fix."""


def cache_dir() -> Path:
    """The cache folder of this torch version (extensions are in ``<name>/<key>/`` below it)."""
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


# ---------------------------------------------------------------------------------------------------------
# Build key: sources + their local includes (by content), flags, ABI, compiler
# ---------------------------------------------------------------------------------------------------------

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def source_closure(sources: list[str]) -> list[str]:
    """``sources`` (paths relative to ``cuda_ext/``) and every local header they include, transitively, as
    sorted relative paths. ``#include "x"`` resolves against the including file's folder, then ``cuda_ext/``."""
    root = SOURCE_DIR.resolve()
    seen: set[str] = set()
    todo = [(root / s).resolve() for s in sources]
    while todo:
        path = todo.pop()
        rel = path.relative_to(root).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for inc in _INCLUDE.findall(path.read_text(errors="replace")):
            for base in (path.parent, root):
                cand = (base / inc).resolve()
                if cand.is_file() and cand.is_relative_to(root):
                    todo.append(cand)
                    break
    return sorted(seen)


def build_key(name: str, sources: list[str], *, cuda: bool = False, extra_cflags: list[str] | None = None,
              extra_cuda_cflags: list[str] | None = None, extra_ldflags: list[str] | None = None) -> str:
    """16 hex digits of a SHA-256 over everything that decides the compiled binary (see the module doc)."""
    h = hashlib.sha256()

    def put(*parts: object) -> None:
        for p in parts:
            b = p if isinstance(p, bytes) else repr(p).encode()
            h.update(len(b).to_bytes(8, "little") + b)

    put(name, list(sources), bool(cuda), list(extra_cflags or []), list(extra_ldflags or []),
        list(extra_cuda_cflags or []) if cuda else [], sys.implementation.cache_tag, sys.platform,
        torch.__version__, os.environ.get("CXX", ""))
    if cuda:
        put(torch.version.cuda, os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "",
            os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    for rel in source_closure(sources):
        put(rel, (SOURCE_DIR / rel).read_bytes())
    return h.hexdigest()[:16]


def build_dir(name: str, sources: list[str], **flags) -> Path:
    """``cache_dir() / name / build_key(name, sources, **flags)``."""
    return cache_dir() / name / build_key(name, sources, **flags)


# ---------------------------------------------------------------------------------------------------------
# A lock that dies with its owner
# ---------------------------------------------------------------------------------------------------------

def _try_lock(fd: int) -> bool:
    """Non-blocking exclusive lock on ``fd``; True if taken. Released by the OS when the owner dies."""
    try:
        import fcntl
    except ImportError:  # Windows
        try:
            import msvcrt
        except ImportError:  # neither: no inter-process lock (torch's baton still serialises the build)
            return True
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # a file system without flock support (some network mounts): go on unlocked, not hang
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True
        raise


def _unlock(fd: int) -> None:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
    except ImportError:
        try:
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except (ImportError, OSError):
            pass


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "unknown process"


def lock_timeout() -> float:
    """Seconds to wait for another builder (``$STUDIO_EXT_LOCK_TIMEOUT``, default 1800)."""
    raw = os.environ.get("STUDIO_EXT_LOCK_TIMEOUT", "")
    try:
        v = float(raw) if raw.strip() else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        v = DEFAULT_LOCK_TIMEOUT_S
    return v if v == v and v >= 0 else DEFAULT_LOCK_TIMEOUT_S  # NaN / negative: the default


@contextmanager
def build_lock(folder: Path, *, name: str = "extension", timeout: float | None = None,
               poll_s: float = 0.1) -> Iterator[Path]:
    """Hold the exclusive build lock of ``folder`` (``folder/build.lock``) for the ``with`` block.

    Waits for a live holder (a note on stderr after ``NOTE_AFTER_S``), at most ``timeout`` seconds (default
    :func:`lock_timeout`), then raises :class:`ExtensionLockTimeout`. A dead holder's lock is free at once.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    timeout = lock_timeout() if timeout is None else timeout
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        start = time.monotonic()
        noted = False
        while not _try_lock(fd):
            waited = time.monotonic() - start
            if waited >= timeout:
                raise ExtensionLockTimeout(
                    f"timed out after {waited:.0f}s waiting for the build lock of native extension '{name}': "
                    f"{lock} is held by {_holder(lock)}. If that process is still compiling, wait for it "
                    f"(or set STUDIO_EXT_LOCK_TIMEOUT to wait longer); if it is hung, stop it. A crashed "
                    f"process releases this lock by itself, so deleting the file is never needed.")
            if not noted and waited >= NOTE_AFTER_S:
                print(f"studio: waiting for another process building native extension '{name}' "
                      f"(lock {lock}, held by {_holder(lock)}; giving up after {timeout:.0f}s)",
                      file=sys.stderr, flush=True)
                noted = True
            time.sleep(min(poll_s, max(0.0, timeout - waited)) or poll_s)
        try:  # who holds it, for the messages of those who wait (informational only)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()} on {_hostname()}\n".encode())
        except OSError:
            pass
        try:
            yield lock
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _hostname() -> str:
    try:
        return os.uname().nodename
    except AttributeError:
        return os.environ.get("COMPUTERNAME", "?")


# ---------------------------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------------------------

def _lib_path(folder: Path, name: str) -> Path:
    return folder / (name + (".pyd" if sys.platform == "win32" else ".so"))


def _import(folder: Path, name: str) -> ModuleType:
    path = _lib_path(folder, name)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stage(folder: Path, sources: list[str]) -> Path:
    """Copy the sources and their local headers into ``folder/src`` (same relative layout); its path."""
    src = folder / "src"
    for rel in source_closure(sources):
        dst = src / rel
        data = (SOURCE_DIR / rel).read_bytes()
        if dst.is_file() and dst.read_bytes() == data:
            continue  # unchanged: keep its timestamp, so ninja does not rebuild
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    return src


def _build(name: str, sources: list[str], folder: Path, *, cuda: bool, extra_cflags: list[str] | None,
           extra_cuda_cflags: list[str] | None, extra_ldflags: list[str] | None, force: bool = False) -> ModuleType:
    from torch.utils import cpp_extension

    with build_lock(folder, name=name):
        marker = folder / MARKER
        if force:  # the marked build did not import: build it again
            marker.unlink(missing_ok=True)
        elif marker.is_file() and _lib_path(folder, name).is_file():  # built while we waited
            return _import(folder, name)
        # Under our lock nobody else is inside torch's build for this folder: a baton left here was left by
        # a process that died mid-build, and torch would wait for it forever.
        (folder / TORCH_BATON).unlink(missing_ok=True)
        src = _stage(folder, sources)
        print(f"studio: building native extension '{name}' (first use; cached in {folder})", file=sys.stderr,
              flush=True)
        mod = cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in sources],
            extra_cflags=extra_cflags or [],
            extra_cuda_cflags=extra_cuda_cflags or [],
            extra_ldflags=extra_ldflags or [],
            extra_include_paths=[str(src)],
            build_directory=str(folder),
            with_cuda=cuda,
            verbose=bool(os.environ.get("STUDIO_EXT_VERBOSE")),
        )
        tmp = folder / f"{MARKER}.tmp{os.getpid()}"
        tmp.write_text(f"{name}\n")
        os.replace(tmp, marker)
        return mod


def load(name: str, sources: list[str], *, cuda: bool = False, extra_cflags: list[str] | None = None,
         extra_cuda_cflags: list[str] | None = None, extra_ldflags: list[str] | None = None) -> ModuleType:
    """Compile (or reuse) extension ``name`` from ``sources`` (paths relative to ``cuda_ext/``).

    Raises ``RuntimeError`` with the compiler's message on failure (:class:`ExtensionLockTimeout`, also a
    ``RuntimeError``, when another builder holds the lock too long); the error is remembered so a failing
    build is attempted once per process.
    """
    with _process_lock:
        if name in _loaded:
            return _loaded[name]
        if name in _errors:
            raise RuntimeError(_errors[name])
        flags = dict(cuda=cuda, extra_cflags=extra_cflags, extra_cuda_cflags=extra_cuda_cflags,
                     extra_ldflags=extra_ldflags)
        try:
            folder = build_dir(name, sources, **flags)
            if (folder / MARKER).is_file() and _lib_path(folder, name).is_file():
                try:
                    mod = _import(folder, name)  # built before: no lock, no compiler
                except ImportError:  # a damaged file: rebuild it
                    mod = _build(name, sources, folder, force=True, **flags)
            else:
                mod = _build(name, sources, folder, **flags)
        except ExtensionLockTimeout as e:
            _errors[name] = str(e)
            raise
        except Exception as e:  # compiler missing, compile error, ...
            text = str(e).strip()
            msg = f"could not build extension '{name}': {text.splitlines()[-1] if text else repr(e)}"
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
