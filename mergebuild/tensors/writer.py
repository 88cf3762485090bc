"""Stream a safetensors file to disk, tensor by tensor, atomically.

safetensors' own save_file needs every tensor in memory at once; a merge must not. The layout
(offsets) is fixed up front from dtypes and shapes, tensors are written in any order with pwrite
(so several threads can write), and the header is written last into space reserved for it, which
lets metadata that is only known at the end (hashes of the inputs) go into the header. The file is
a temp file beside the target until commit() fsyncs and renames it: a crash never leaves a
half-written output under the target's name.
"""

from __future__ import annotations

import json
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from mergebuild.dtypes import nbytes

TEMP_MARK = ".mergebuild-tmp-"
HEADER_SLACK = 4096  # bytes reserved beyond the draft header, for metadata that grows


@dataclass(frozen=True)
class Slot:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the data section
    nbytes: int


class SafetensorsWriter:
    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], draft_metadata: dict[str, str]):
        self.path = Path(path)
        self.slots: dict[str, Slot] = {}
        offset = 0
        for name, dtype, shape in tensors:
            size = nbytes(dtype, shape)
            self.slots[name] = Slot(dtype, tuple(shape), offset, size)
            offset += size
        self.data_size = offset
        # the sha256 of the data follows the writes: each completed prefix of tensors is hashed
        # (from the page cache) while later tensors are still being computed
        self._order = list(self.slots)
        self._index = {name: i for i, name in enumerate(self._order)}
        self._done = bytearray(len(self._order))
        self._hashed = 0
        self._hasher = hashlib.sha256()
        self._hash_lock = threading.Lock()
        draft = len(self._header_bytes(draft_metadata))
        self.header_size = (draft + HEADER_SLACK + 7) // 8 * 8
        self.temp = self.path.parent / f".{self.path.name}{TEMP_MARK}{os.getpid()}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, 8 + self.header_size + self.data_size)

    def write(self, name: str, data, at: int = 0) -> None:
        """Write the bytes of tensor `name` (or a part of them starting at byte `at`)."""
        slot = self.slots[name]
        view = memoryview(data).cast("B")
        if at + len(view) > slot.nbytes:
            raise ValueError(f"{name}: {at + len(view)} bytes do not fit {slot.nbytes}")
        position = 8 + self.header_size + slot.offset + at
        complete = at == 0 and len(view) == slot.nbytes
        while view:
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written
        if complete:
            self.mark_done(name)

    def mark_done(self, name: str) -> None:
        """Tensor `name` is fully written (pwrite or copy_file_range): hash what is now contiguous."""
        self._done[self._index[name]] = 1
        self._advance_hash(wait=False)

    def _advance_hash(self, wait: bool) -> None:
        if not self._hash_lock.acquire(blocking=wait):
            return  # another thread is hashing; the final data_sha256() catches up
        try:
            while self._hashed < len(self._order) and (self._done[self._hashed] or wait):
                slot = self.slots[self._order[self._hashed]]
                self._hash_range(self._hasher, 8 + self.header_size + slot.offset, slot.nbytes)
                self._hashed += 1
        finally:
            self._hash_lock.release()

    def _hash_range(self, hasher, position: int, size: int) -> None:
        end = position + size
        while position < end:
            chunk = os.pread(self._fd, min(16 << 20, end - position), position)
            hasher.update(chunk)
            position += len(chunk)

    def position(self, name: str) -> int:
        """The absolute offset of tensor `name` in the file (for copy_file_range)."""
        return 8 + self.header_size + self.slots[name].offset

    def target(self, name: str) -> tuple[int, int]:
        """(fd, absolute offset) where tensor `name` goes, for copy_file_range."""
        return self._fd, self.position(name)

    def data_sha256(self, hasher=None):
        """sha256 of the tensor data (ModelSpec's hash_sha256, kohya's addnet hash), once every
        tensor is written. With `hasher`, the data is hashed into it from the start (shards)."""
        if hasher is not None:
            self._hash_range(hasher, 8 + self.header_size, self.data_size)
            return hasher
        self._advance_hash(wait=True)
        return self._hasher.copy()

    def commit(self, metadata: dict[str, str]) -> None:
        header = self._header_bytes(metadata)
        if len(header) > self.header_size:
            raise ValueError("metadata outgrew the space reserved for the header")
        header = header + b" " * (self.header_size - len(header))
        os.pwrite(self._fd, self.header_size.to_bytes(8, "little") + header, 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.temp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.temp.unlink(missing_ok=True)

    def _header_bytes(self, metadata: dict[str, str]) -> bytes:
        doc: dict = {"__metadata__": metadata} if metadata else {}
        for name, slot in self.slots.items():
            doc[name] = {
                "dtype": slot.dtype,
                "shape": list(slot.shape),
                "data_offsets": [slot.offset, slot.offset + slot.nbytes],
            }
        return json.dumps(doc, separators=(",", ":")).encode()


def remove_stale_temps(path: Path) -> None:
    """Remove temp files that a killed build left beside `path` (their process is gone)."""
    prefix = f".{Path(path).name}{TEMP_MARK}"
    try:
        candidates = [p for p in Path(path).parent.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for p in candidates:
        pid = p.name[len(prefix):]
        if pid.isdigit() and not pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
