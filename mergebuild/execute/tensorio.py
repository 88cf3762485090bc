"""Moving tensor bytes: read a TensorRef (a source's byte range or a verified cached tensor).

Source files are read with positional reads into buffers through a bounded set of open files:
a file truncated under a build gives a clean error instead of SIGBUS, and the number of
descriptors stays small whatever the number of sources or tensors.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path

from mergebuild.dtypes import nbytes
from mergebuild.errors import BuildError
from mergebuild.planning.sources import TensorRef
from mergebuild.portable import RandomAccess, ShortRead
from mergebuild.store.cache import Cache

MAX_OPEN = 64  # source and output files open at once (each read by many threads through one descriptor)


class OpenFiles:
    """Files open for positional reads, least recently used closed first beyond MAX_OPEN."""

    def __init__(self, limit: int = MAX_OPEN):
        self.limit = limit
        self._files: OrderedDict[str, RandomAccess] = OrderedDict()
        self._users: dict[str, int] = {}
        self._replaced: list[tuple[str, RandomAccess]] = []  # forgotten while in use
        self._lock = threading.Lock()

    def acquire(self, path: Path) -> RandomAccess:
        key = str(path)
        with self._lock:
            f = self._files.get(key)
            if f is None:
                f = self._files[key] = RandomAccess(Path(path))
                self._close_unused()
            self._files.move_to_end(key)
            self._users[key] = self._users.get(key, 0) + 1
            return f

    def release(self, path: Path) -> None:
        with self._lock:
            key = str(path)
            self._users[key] -= 1
            for old in [(k, f) for k, f in self._replaced if k == key and not self._users[key]]:
                self._replaced.remove(old)
                old[1].close()
            self._close_unused()

    def _close_unused(self) -> None:
        while len(self._files) > self.limit:
            idle = next((k for k in self._files if not self._users.get(k)), None)
            if idle is None:
                return  # every open file is being read right now
            self._files.pop(idle).close()

    def forget(self, path: Path) -> None:
        """A file (or folder of shards) replaced on disk: later reads open the new one (a handle
        kept open on the old inode would read the new file's offsets from the old bytes)."""
        root = str(path)
        with self._lock:
            for key in [k for k in self._files if k == root or k.startswith(root + "/") or k.startswith(root + "\\")]:
                f = self._files.pop(key)
                if self._users.get(key):
                    self._replaced.append((key, f))  # closed once its last reader releases it
                else:
                    f.close()

    def read(self, path: Path, offset: int, size: int) -> bytearray:
        f = self.acquire(path)
        try:
            return f.read(size, offset)
        finally:
            self.release(path)

    def read_into(self, path: Path, offset: int, buf):
        f = self.acquire(path)
        try:
            f.read_into(buf, offset)
            return buf
        finally:
            self.release(path)

    def close(self) -> None:
        with self._lock:
            for f in [*self._files.values(), *(f for _, f in self._replaced)]:
                f.close()
            self._files.clear()
            self._replaced.clear()


class BufferPool:
    """Read buffers used again. A fresh buffer costs the kernel a page fault and a zeroed page
    for every page read into it (1.5 s of system time for an SD1.5 pair's 4.3 GB); a buffer
    given back, once nothing reads it any more, is refilled instead. A tensor takes the smallest
    free buffer that holds it and is at most twice its size (a small tensor must not use up the
    buffer a large one needs). Its buffers, in use and waiting, stay within `limit` bytes (the
    longest-waiting dropped first), so a build's memory stays what the staging window allows.
    Buffers are sized in steps of STEP bytes, so that one fits neighbours of similar sizes."""

    STEP = 1 << 20

    def __init__(self, limit: int = 128 << 20, count_taken: bool = True):
        self.limit = limit
        self.count_taken = count_taken  # False: `limit` bounds the waiting buffers alone
        self._free: list = []  # numpy uint8 arrays, the longest-waiting first
        self._free_bytes = 0
        self._taken = 0  # bytes of the pool's buffers in use (taken, not given back)
        self._mine: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a buffer it made
        self._lock = threading.Lock()

    def take(self, size: int):
        """A buffer of exactly `size` bytes (a view of a pooled one when one fits)."""
        import numpy  # here, not at the top: a no-op build reads no tensor bytes

        capacity = -(-max(size, 1) // self.STEP) * self.STEP
        with self._lock:
            fits = [(len(b), i) for i, b in enumerate(self._free) if capacity <= len(b) <= 2 * capacity]
            if fits:
                buf = self._free.pop(min(fits)[1])
                self._free_bytes -= len(buf)
            else:
                buf = None
                self._drop_beyond(self.limit - capacity)
            self._taken += (capacity if buf is None else len(buf)) if self.count_taken else 0
        if buf is None:
            buf = numpy.empty(capacity, dtype=numpy.uint8)
            with self._lock:
                self._mine[id(buf)] = buf
        return buf[:size]

    def give(self, view) -> None:
        """A buffer from take(), which nothing will read again."""
        buf = getattr(view, "base", None)
        if buf is None or len(buf) > self.limit:
            return
        with self._lock:
            if self._mine.get(id(buf)) is not buf or any(b is buf for b in self._free):
                return  # not one of its buffers (never pool another's memory), or already back
            self._taken -= len(buf) if self.count_taken else 0
            self._free.append(buf)
            self._free_bytes += len(buf)
            self._drop_beyond(self.limit)

    def _drop_beyond(self, limit: int) -> None:
        """Under the lock: drop waiting buffers, the longest-waiting first, until the pool's
        buffers are within `limit` bytes."""
        while self._free and self._free_bytes + self._taken > limit:
            self._free_bytes -= len(self._free.pop(0))


class ResultBuffers:
    """The memory of chunked methods' results, used again. A fresh result above glibc's mmap
    threshold is a mapping of its own, zeroed and faulted in a page at a time as the method
    writes it (an SD1.5 fp16 merge: ~0.5 million faults, about 1 s of the main thread); a result
    given back once stored is written over instead. Only what nothing reads any more comes back
    (an output's writer may keep a tensor's bytes until its hash reaches them); a result never
    given back (a cluster worker's, a failed store's) is freed as before."""

    def __init__(self, smallest: int, limit: int = 128 << 20):
        self.smallest = smallest  # bytes: smaller results come from the heap, already used again
        self._pool = BufferPool(limit, count_taken=False)  # results in flight are bounded by the writers' window
        self._lent: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # address -> a buffer lent
        self._lock = threading.Lock()

    def empty(self, shape, dtype: str):
        """An uninitialised CPU tensor, on a given-back result's memory when one fits."""
        from mergebuild.torchlazy import torch, torch_dtype

        size = nbytes(dtype, shape)
        if size < self.smallest:
            return torch.empty(shape, dtype=torch_dtype(dtype))
        buf = self._pool.take(size)
        with self._lock:
            self._lent[_address(buf)] = buf
        return torch.from_numpy(buf).view(torch_dtype(dtype)).reshape(shape)

    def give(self, data) -> None:
        """The bytes of a result (tensors/convert.to_bytes) that nothing will read again; a no-op
        for any other memory."""
        if len(data) < self.smallest:
            return
        with self._lock:
            buf = self._lent.pop(_address(data), None)
        if buf is not None:
            self._pool.give(buf)


def _address(data) -> int:
    import numpy

    return numpy.frombuffer(data, dtype=numpy.uint8).__array_interface__["data"][0]


def read_ref(ref: TensorRef, cache: Cache, files: OpenFiles, pool: BufferPool | None = None):
    """The bytes of a tensor; None when it lives in the cache and is missing or bad there. A
    source's or a blob's bytes go into a buffer from `pool` when one is given (the caller gives
    it back)."""
    size = nbytes(ref.dtype, ref.shape)
    if ref.file is None:
        if ref.digest is None:  # not known (a summarized merge re-planned after its blobs went bad): a miss
            return None
        return cache.get(ref.digest, ref.dtype, ref.shape, size, pool.take if pool is not None else None)
    try:
        if pool is not None:
            return files.read_into(ref.file, ref.begin, pool.take(size))
        return files.read(ref.file, ref.begin, size)
    except ShortRead as e:
        raise BuildError(f"{ref.file}: {e.strerror}; the source changed during the build, nothing from it "
                         "was recorded") from None
