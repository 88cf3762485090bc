"""The portable I/O layer: the one place OS differences live; everything else goes through it."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from mergebuild.portable import FileLock, RandomAccess, ShortRead, copy_range, file_stamp, is_locked

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

PACKAGE = Path(__file__).resolve().parents[2] / "mergebuild"
UNIX_ONLY = {"pread", "pwrite", "preadv", "pwritev", "copy_file_range", "posix_fallocate", "kill", "link", "fork"}


def test_only_portable_py_calls_unix_only_functions():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "portable.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in UNIX_ONLY:
                wrong.append(f"{path.relative_to(PACKAGE)}: os.{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr in ("name", "platform") and isinstance(node.value, ast.Name) \
                    and node.value.id in ("os", "sys"):
                wrong.append(f"{path.relative_to(PACKAGE)}: {node.value.id}.{node.attr} (ask portable.WINDOWS)")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                wrong += [f"{path.relative_to(PACKAGE)}: imports {n}" for n in names if n in ("fcntl", "msvcrt", "mmap", "ctypes")]
    assert not wrong, "\n".join(wrong)


def test_positional_reads_writes_and_copies(tmp_path):
    with RandomAccess(tmp_path / "f", writable=True, create=True) as f:
        f.write_at(b"hello world", 0)
        f.write_at(b"W", 6)
        assert bytes(f.read(5, 6)) == b"World"
        with RandomAccess(tmp_path / "g", writable=True, create=True) as g:
            copy_range(f, 6, g, 3, 5)
            assert bytes(g.read(8, 0)) == b"\0\0\0World"


def test_a_read_past_the_end_is_short_not_a_crash(tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    with RandomAccess(tmp_path / "f") as f, pytest.raises(ShortRead, match="2 bytes short"):
        f.read(4, 3)


def test_errors_on_a_descriptor_name_the_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    f = RandomAccess(tmp_path / "f")  # read-only: writing must fail, naming the file
    with pytest.raises(OSError) as info:
        f.write_at(b"y", 0)
    assert info.value.filename == str(tmp_path / "f")
    f.close()


def test_locks_die_with_their_holder(tmp_path):
    lock = FileLock(tmp_path / "l")
    assert lock.acquire(blocking=False)
    assert is_locked(tmp_path / "l")
    other = FileLock(tmp_path / "l")
    assert not other.acquire(blocking=False)
    lock.release()
    assert not is_locked(tmp_path / "l") and other.acquire(blocking=False)
    other.release()


def test_the_stamp_sees_a_rewrite_behind_a_restored_mtime(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"aaaa")
    before, stamp = f.stat(), file_stamp(f)
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert f.stat().st_mtime_ns == before.st_mtime_ns and file_stamp(f) != stamp


def test_the_portability_run_really_takes_the_unix_calls_away():
    if os.environ.get("MERGEBUILD_SIMULATED") != "no-unix":
        pytest.skip("only in the portability run (MERGEBUILD_SIMULATE=no-unix)")
    import importlib

    assert not hasattr(os, "pread") and not hasattr(os, "copy_file_range")
    with pytest.raises(ImportError):
        importlib.import_module("fcntl")
    with pytest.raises(OSError):
        os.link(__file__, __file__ + ".link")
    f = RandomAccess(Path(__file__))
    assert f._seek_lock is not None  # the seek + read path
    f.close()


def test_the_mmap_threshold_is_left_to_a_user_who_set_it(monkeypatch):
    from mergebuild import portable

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert portable._find_mallopt() is None
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert portable._find_mallopt() is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(portable.sys, "platform", "win32")
    assert portable._find_mallopt() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_mmap_threshold_is_set_through_glibc(monkeypatch):
    from mergebuild import portable

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    calls = []
    monkeypatch.setattr(portable, "_mallopt", [lambda param, value: calls.append((param, value)) or 1])
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    portable.set_mmap_threshold(portable.STREAMING_MMAP)
    assert calls == [(-3, 4 << 20), (-1, 64 << 20)]  # the heap keeps freed chunks for the next ones
    calls.clear()
    portable.set_mmap_threshold(portable.WHOLE_TENSOR_MMAP)
    assert calls == [(-3, 32 << 20), (-1, 64 << 20)]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own trim threshold is kept
    portable.set_mmap_threshold(portable.STREAMING_MMAP)
    assert calls == [(-3, 4 << 20)]
    if portable._find_mallopt() is None:
        pytest.skip("not glibc")
    portable._find_mallopt()(-3, portable.WHOLE_TENSOR_MMAP)  # callable as the build calls it


def test_writeback_is_asked_of_linux_only(monkeypatch, tmp_path):
    from mergebuild import portable

    monkeypatch.setattr(portable, "_sync_file_range", [])
    monkeypatch.setattr(portable.sys, "platform", "win32")
    with RandomAccess(tmp_path / "f", writable=True, create=True) as f:
        f.write_at(b"x" * 4096, 0)
        portable.start_writeback(f.fd)  # a no-op: nothing to call there
    assert portable._sync_file_range == [None]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's sync_file_range")
def test_writeback_starts_and_a_bad_descriptor_is_no_error(monkeypatch, tmp_path):
    from mergebuild import portable

    monkeypatch.setattr(portable, "_sync_file_range", [])
    with RandomAccess(tmp_path / "f", writable=True, create=True) as f:
        f.write_at(b"x" * (1 << 20), 0)
        portable.start_writeback(f.fd)
        fd = f.fd
    assert portable._sync_file_range[0] is not None  # found in glibc and musl alike
    portable.start_writeback(fd)  # closed by now: EBADF, which the fsync at commit would report
    assert (tmp_path / "f").read_bytes() == b"x" * (1 << 20)
