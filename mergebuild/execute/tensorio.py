"""Moving tensor bytes: read a TensorRef (file range or verified blob), copy a file range."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

from mergebuild.dtypes import nbytes
from mergebuild.plan.sources import TensorRef
from mergebuild.store.cache import Cache

CHUNK = 64 << 20


def read_range(path: Path, begin: int, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done : done + CHUNK]], begin + done)
            if n == 0:
                raise OSError(f"{path}: unexpected end of file")
            done += n
    finally:
        os.close(fd)
    return buf


class SourceMaps:
    """Read source tensors as read-only mappings of their byte range: a view of the page cache,
    with no copy and no fresh memory to fault in (measured: fresh buffers for every read cost
    more kernel time than the reads themselves here). Each tensor gets its own small mapping,
    unmapped when its last view goes, so the process's resident memory stays bounded."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def view(self, path: Path, begin: int, size: int) -> memoryview:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, size + begin - start, access=mmap.ACCESS_READ, offset=start)
        return memoryview(mapped)[begin - start :]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_ref(ref: TensorRef, cache: Cache, maps: SourceMaps | None = None):
    """The bytes of a tensor (a bytearray, or a read-only view of a mapped source); None when it
    lives in the cache and is missing or bad there."""
    size = nbytes(ref.dtype, ref.shape)
    if ref.file is not None:
        if maps is not None and size:
            return maps.view(ref.file, ref.begin, size)
        return read_range(ref.file, ref.begin, size)
    return cache.get(ref.digest, ref.dtype, ref.shape, size)


def copy_range(src: Path, begin: int, size: int, dst_fd: int, dst_offset: int) -> None:
    """Copy bytes between files inside the kernel where it can (copy_file_range)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(fd, dst_fd, size - done, begin + done, dst_offset + done)
            except OSError:
                n = 0
            if n == 0:  # not supported here (or a short copy): fall back to read + write
                chunk = os.pread(fd, min(CHUNK, size - done), begin + done)
                if not chunk:
                    raise OSError(f"{src}: unexpected end of file")
                n = os.pwrite(dst_fd, chunk, dst_offset + done)
            done += n
    finally:
        os.close(fd)
