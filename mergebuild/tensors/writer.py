"""Stream a safetensors file to disk, tensor by tensor, atomically.

safetensors' own save_file needs every tensor in memory at once; a merge must not. The layout
(offsets) is fixed up front from dtypes and shapes, tensors are written in any order at their
offsets (so several threads can write), and the header is written last into space reserved for
it, which lets metadata that is only known at the end (hashes of the inputs) go into the header.
The reserved space is exact: the draft metadata holds placeholders as long as the hashes that
replace them. The file is a temp file beside the target, locked while it is written, until
commit() fsyncs and renames it: a crash never leaves a half-written output under the target's
name, and a temp whose lock is free belongs to a dead build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from mergebuild.dtypes import nbytes
from mergebuild.errors import BuildError
from mergebuild.portable import FileLock, RandomAccess, copy_range, fsync_dir, is_locked, replace, start_writeback
from mergebuild.tensors.header import MAX_HEADER

TEMP_MARK = ".mergebuild-tmp-"
HEADER_SLACK = 64  # bytes beyond the draft header; the draft is exact, this is a margin
WRITEBACK = 64 << 20  # bytes written between two requests to the OS to start writing them to disk
HOLD = 64 << 20  # bytes of tensors written ahead of the data hash that it may keep in memory
READ_BACK = 16 << 20  # bytes read back at a time to hash tensors it did not keep


@dataclass(frozen=True)
class Slot:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the data section
    nbytes: int


def header_bytes(slots: dict[str, Slot], metadata: dict[str, str]) -> bytes:
    doc: dict = {"__metadata__": metadata} if metadata else {}
    for name, slot in slots.items():
        doc[name] = {"dtype": slot.dtype, "shape": list(slot.shape),
                     "data_offsets": [slot.offset, slot.offset + slot.nbytes]}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def layout(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[dict[str, Slot], int]:
    """Slots for tensors written end to end, in order; and the data size."""
    slots, offset = {}, 0
    for name, dtype, shape in tensors:
        size = nbytes(dtype, shape)
        slots[name] = Slot(dtype, tuple(shape), offset, size)
        offset += size
    return slots, offset


_local = threading.local()


def _read_back_buffer() -> memoryview:
    """This thread's buffer for the bytes hashed back from a file being written, reused: a fresh
    one per tensor was zeroed and faulted in a page at a time (~60,000 page faults of an SD1.5
    output's writers)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(READ_BACK))
    return buf


def temp_name(path: Path, token: str) -> Path:
    return path.parent / f".{path.name}{TEMP_MARK}{token}"


def lock_name(temp: Path) -> Path:
    """The lock a writer holds while it writes `temp`: free means the temp is a dead build's."""
    return temp.with_name(temp.name + ".lock")


class SafetensorsWriter:
    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], draft_metadata: dict[str, str],
                 token: str, hash_as_written: bool = True):
        self.path = Path(path)
        # False: the data is hashed only by data_sha256(hasher), after the files before it (a
        # later shard of a folder: one sha256 runs over every shard in turn)
        self.hash_as_written = hash_as_written
        self.slots, self.data_size = layout(tensors)
        # the sha256 of the data follows the writes: each completed prefix of tensors is hashed
        # while later tensors are still being computed, from the bytes in hand: a tensor written
        # ahead of the hash (a batch of small tensors goes after the big ones around it) keeps
        # its bytes, up to HOLD of them, until the hash reaches it; beyond that it is read back
        self._order = list(self.slots)
        self._index = {name: i for i, name in enumerate(self._order)}
        self._done = bytearray(len(self._order))
        self._hashed = 0
        self._held: dict[int, memoryview] = {}
        self.release = None  # called with the bytes it kept once they are hashed: their memory may be reused
        self._held_bytes = 0
        self._hasher = hashlib.sha256()
        self._hash_lock = threading.Lock()
        self._dirty = 0  # bytes written since the OS was last asked to write back
        self._dirty_lock = threading.Lock()
        draft = len(header_bytes(self.slots, draft_metadata))
        self.header_size = (draft + HEADER_SLACK + 7) // 8 * 8
        if self.header_size > MAX_HEADER:
            raise BuildError(f"{self.path}: the header would take {self.header_size:,} bytes, over safetensors' "
                             f"limit of {MAX_HEADER:,}")
        self.token = token  # the build's (store/cache.py): which writers abort_all() may remove
        self.temp = temp_name(self.path, token)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(lock_name(self.temp))
        self.file = None
        try:  # from the lock on: a signal landing anywhere in here removes what was made
            self._lock.acquire()  # held while the temp is written; its file exists from here
            unfinished.add(self)
            self.file = RandomAccess(self.temp, writable=True, create=True)
            size = 8 + self.header_size + self.data_size
            self.file.preallocate(size)  # a full disk fails here, before any compute
            self.file.truncate(size)
        except BaseException:
            self.abort()
            raise

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def write(self, name: str, data, at: int = 0) -> bool:
        """Write the bytes of tensor `name` (or a part of them starting at byte `at`). True when
        the writer keeps `data` to hash it later: the caller must not write over it."""
        slot = self.slots[name]
        view = memoryview(data).cast("B")
        if at + len(view) > slot.nbytes:
            raise ValueError(f"{name}: {at + len(view)} bytes do not fit {slot.nbytes}")
        self.file.write_at(view, self.data_start + slot.offset + at)
        self._count_dirty(len(view))
        return self.mark_done(name, view) if at == 0 and len(view) == slot.nbytes else False

    def _count_dirty(self, size: int) -> None:
        """Every WRITEBACK bytes, start their way to disk: the fsync at commit then has little
        left to write (an SD1.5 output's fsync: 0.64-0.93 s before, 0.02 s after)."""
        with self._dirty_lock:  # not the hash lock, held while a tensor is hashed
            self._dirty += size
            kick = self._dirty >= WRITEBACK
            if kick:
                self._dirty = 0
        fd = self.file.fd if kick and self.file is not None else None
        if fd is not None:  # None: closed by an abort meanwhile
            start_writeback(fd)

    def copy_into(self, name: str, source: RandomAccess, offset: int) -> None:
        """Tensor `name` copied from another file, kernel-side where the OS can."""
        copy_range(source, offset, self.file, self.position(name), self.slots[name].nbytes)
        self._count_dirty(self.slots[name].nbytes)
        self.mark_done(name)

    def mark_done(self, name: str, written=None) -> bool:
        """Tensor `name` is fully written (its bytes `written`, when in hand): hash what is now
        contiguous. True when `written` is kept until the hash reaches it."""
        i = self._index[name]
        held = False
        with self._hash_lock:  # sha256 is one stream: waiting here costs no throughput
            self._done[i] = 1
            if not self.hash_as_written:
                return False
            if written is not None and i > self._hashed and self._held_bytes + len(written) <= HOLD:
                self._held[i], held = written, True
                self._held_bytes += len(written)
            elif written is not None and i == self._hashed:
                self._hasher.update(written)  # the bytes just written: no read back
                self._hashed += 1
            self._hash_done()
        return held

    def done_names(self) -> list[str]:
        return [n for n, i in self._index.items() if self._done[i]]

    def _advance_hash(self) -> None:
        with self._hash_lock:
            self._hash_done()

    def _hash_done(self) -> None:
        """Under the hash lock: hash the written tensors that follow the hashed prefix."""
        while self._hashed < len(self._order) and self._done[self._hashed]:
            held = self._held.pop(self._hashed, None)
            if held is not None:
                self._held_bytes -= len(held)
                self._hasher.update(held)
                if self.release is not None:
                    self.release(held)
            else:
                slot = self.slots[self._order[self._hashed]]
                self._hash_range(self._hasher, self.data_start + slot.offset, slot.nbytes)
            self._hashed += 1

    def _hash_range(self, hasher, position: int, size: int) -> None:
        end = position + size
        buf = _read_back_buffer()
        while position < end:
            view = buf[: min(len(buf), end - position)]
            self.file.read_into(view, position)
            hasher.update(view)
            position += len(view)

    def position(self, name: str) -> int:
        """The absolute offset of tensor `name` in the file."""
        return self.data_start + self.slots[name].offset

    def data_sha256(self, hasher=None):
        """sha256 of the tensor data (ModelSpec's hash_sha256, kohya's addnet hash), once every
        tensor is written. With `hasher`, the data is hashed into it from the start (shards)."""
        if hasher is not None:
            self._hash_range(hasher, self.data_start, self.data_size)
            return hasher
        self._advance_hash()
        if self._hashed < len(self._order):
            raise BuildError(f"{self.path}: tensor {self._order[self._hashed]!r} was never written")
        return self._hasher.copy()

    def commit(self, metadata: dict[str, str]) -> None:
        self.finish(metadata)
        replace(self.temp, self.path)
        fsync_dir(self.path.parent)
        self._unlock()

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header, make the file durable and close it (still under its temp name)."""
        header = header_bytes(self.slots, metadata)
        if len(header) > self.header_size:
            raise BuildError(f"{self.path}: the metadata outgrew the space reserved for the header "
                             f"({len(header)} > {self.header_size} bytes)")
        header = header + b" " * (self.header_size - len(header))
        self.file.write_at(self.header_size.to_bytes(8, "little") + header, 0)
        self.file.fsync()
        self.file.close()

    def salvage(self, pack: Path) -> list[tuple[str, int]] | None:
        """Move the temp file (its finished tensors) to `pack`: (name, absolute offset) of the
        tensors it holds, or None when it cannot be moved there (another file system)."""
        try:
            os.replace(self.temp, pack)  # Windows cannot rename an open file: then it is copied
        except OSError:
            return None
        self.file.close()
        self._unlock()
        return [(n, self.position(n)) for n in self.done_names()]

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        self.temp.unlink(missing_ok=True)
        self._unlock()

    def _unlock(self) -> None:
        self._lock.release()
        lock_name(self.temp).unlink(missing_ok=True)
        unfinished.discard(self)


class Unfinished:
    """The writers of this process not yet committed, salvaged or aborted. A stop signal can
    land between a writer's creation and the code that would abort it (its owner not yet
    assigned): abort_all() then removes its temp and lock rather than leaving them to the next
    build's sweep."""

    def __init__(self):
        self._live: dict[int, object] = {}
        self._lock = threading.Lock()

    def add(self, writer) -> None:
        with self._lock:
            self._live[id(writer)] = writer

    def discard(self, writer) -> None:
        with self._lock:
            self._live.pop(id(writer), None)

    def abort_all(self, token: str) -> None:
        """Abort the unfinished writers of the build `token` (another build in this process,
        a library user's thread, keeps its own)."""
        with self._lock:
            writers = [w for w in self._live.values() if w.token == token]
        for w in writers:
            w.abort()


unfinished = Unfinished()


def remove_stale_temps(path: Path) -> None:
    """Remove temp files and folders that a killed build left beside `path`: nobody holds their
    lock any more (whatever became of the PID that made them)."""
    prefix = f".{Path(path).name}{TEMP_MARK}"
    try:
        candidates = [p for p in Path(path).parent.iterdir() if p.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for p in candidates:
        if p.name.endswith(".lock"):
            if not p.with_name(p.name[: -len(".lock")]).exists() and not is_locked(p):
                p.unlink(missing_ok=True)  # a lock whose temp is gone
        elif p.is_dir() and not p.is_symlink():
            if not is_locked(p / FOLDER_LOCK):
                shutil.rmtree(p, ignore_errors=True)
        elif not is_locked(lock_name(p)):
            p.unlink(missing_ok=True)
            lock_name(p).unlink(missing_ok=True)


FOLDER_LOCK = ".mergebuild-lock"  # inside a folder output's temp folder, locked while it is written
