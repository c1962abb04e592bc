"""The native-extension build cache (studio.ext): folders keyed by the sources' hash, and a build lock that
dies with its owner (a SIGKILLed builder never blocks the next one; a live one is waited for, then a clear
timeout). No compiler runs here: ``torch.utils.cpp_extension.load`` is replaced by a fake that keeps torch's
own ``lock`` baton semantics (a leftover baton would make the real one wait forever)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from studio import ext

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the holder subprocesses use fcntl.flock")

NAME = "studio_fake_ext"
SOURCES = ["cpu/fake.cpp"]


@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    """A private cuda_ext source tree, cache root and loader state; a fake compiler that records its calls."""
    src = tmp_path / "cuda_ext"
    (src / "cpu").mkdir(parents=True)
    (src / "common").mkdir()
    (src / "cpu" / "fake.cpp").write_text('#include "../common/inc.h"\nint f() { return K; }\n')
    (src / "common" / "inc.h").write_text("#define K 1\n")
    monkeypatch.setattr(ext, "SOURCE_DIR", src)
    monkeypatch.setenv("STUDIO_EXT_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ext, "_loaded", {})
    monkeypatch.setattr(ext, "_errors", {})
    calls: list[str] = []

    def fake_load(*, name, sources, build_directory, **kw):
        from torch.utils.file_baton import FileBaton

        baton = FileBaton(os.path.join(build_directory, "lock"))
        if not baton.try_acquire():  # torch would now wait, forever if the baton is stale
            raise AssertionError(f"torch's baton {build_directory}/lock exists: the real load would hang")
        try:
            for s in sources:
                assert Path(s).is_file() and str(build_directory) in s, s  # compiled from the staged copy
            Path(build_directory, name + ".so").write_bytes(b"not really a library")
            calls.append(build_directory)
        finally:
            baton.release()
        return types.ModuleType(name)

    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return types.SimpleNamespace(src=src, calls=calls)


def _holder(folder: Path, *, torch_baton: bool) -> subprocess.Popen:
    """A process that takes ``folder``'s build lock (as a builder does), optionally leaves torch's baton as a
    builder inside ``cpp_extension.load`` would, says ``ready`` and sleeps."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        folder = {str(folder)!r}
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, {ext.LOCK_NAME!r}), os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0); os.write(fd, f"pid {{os.getpid()}} on test\\n".encode())
        if {torch_baton!r}:
            os.close(os.open(os.path.join(folder, "lock"), os.O_CREAT | os.O_EXCL))
        print("ready", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_build_folder_is_keyed_by_sources_and_flags(fake_tree):
    key = ext.build_key(NAME, SOURCES, extra_cflags=["-O3"])
    assert key == ext.build_key(NAME, SOURCES, extra_cflags=["-O3"])  # stable
    assert ext.source_closure(SOURCES) == ["common/inc.h", "cpu/fake.cpp"]  # local includes, transitively
    assert ext.build_key(NAME, SOURCES, extra_cflags=["-O2"]) != key  # flags
    assert ext.build_key(NAME, SOURCES, extra_cflags=["-O3"], cuda=True) != key
    (fake_tree.src / "common" / "inc.h").write_text("#define K 2\n")  # an included header's content
    assert ext.build_key(NAME, SOURCES, extra_cflags=["-O3"]) != key
    folder = ext.build_dir(NAME, SOURCES)
    assert folder.parent == ext.cache_dir() / NAME and len(folder.name) == 16


def test_killed_builder_does_not_block_the_next_build(fake_tree, monkeypatch):
    monkeypatch.setenv("STUDIO_EXT_LOCK_TIMEOUT", "20")
    folder = ext.build_dir(NAME, SOURCES)
    p = _holder(folder, torch_baton=True)  # killed mid-build: our lock file and torch's baton stay behind
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    p.stdout.close()
    assert (folder / ext.LOCK_NAME).exists() and (folder / "lock").exists()
    t0 = time.monotonic()
    mod = ext.load(NAME, SOURCES)
    assert time.monotonic() - t0 < 5, "waited for a dead builder"
    assert mod.__name__ == NAME and fake_tree.calls == [str(folder)]
    assert (folder / ext.MARKER).is_file() and not (folder / "lock").exists()
    assert (folder / "src" / "common" / "inc.h").read_text() == "#define K 1\n"  # staged copy

    # A finished build loads without the lock (a live holder does not delay it) and without the compiler.
    monkeypatch.setattr(ext, "_loaded", {})
    monkeypatch.setattr(ext, "_import", lambda f, n: types.ModuleType(n + "_imported"))
    q = _holder(folder, torch_baton=False)
    try:
        assert ext.load(NAME, SOURCES).__name__ == NAME + "_imported"
    finally:
        q.kill()
        q.wait(timeout=10)
        q.stdout.close()
    assert fake_tree.calls == [str(folder)]


def test_live_builder_is_waited_for_then_times_out_with_a_message(fake_tree, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_EXT_LOCK_TIMEOUT", "1.5")
    folder = ext.build_dir(NAME, SOURCES)
    p = _holder(folder, torch_baton=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ext.ExtensionLockTimeout) as info:
            ext.load(NAME, SOURCES)
        waited = time.monotonic() - t0
    finally:
        p.kill()
        p.wait(timeout=10)
        p.stdout.close()
    msg = str(info.value)
    assert 1.4 < waited < 10
    assert str(folder / ext.LOCK_NAME) in msg and f"pid {p.pid}" in msg and "STUDIO_EXT_LOCK_TIMEOUT" in msg
    assert isinstance(info.value, RuntimeError)  # available() falls back like for any other load failure
    err = capsys.readouterr().err
    assert "waiting for another process building native extension" in err and str(folder / ext.LOCK_NAME) in err
    assert fake_tree.calls == []
    # remembered: the next call fails at once instead of waiting again
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        ext.load(NAME, SOURCES)
    assert time.monotonic() - t0 < 0.5 and ext.load_error(NAME) == msg


def test_lock_is_released_after_a_failed_build(fake_tree, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken(**kw):
        raise RuntimeError("error: expected ';' before '}' token")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(RuntimeError, match="could not build extension 'studio_fake_ext': error: expected"):
        ext.load(NAME, SOURCES)
    folder = ext.build_dir(NAME, SOURCES)
    with ext.build_lock(folder, name=NAME, timeout=0.5):  # free again
        pass
    assert not (folder / ext.MARKER).exists()
