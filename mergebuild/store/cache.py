"""The cache folder: blobs + packs + index + a lock, as one object.

Layout: objects/ab/<digest> (one tensor's bytes), packs/<id>.safetensors (an output written into
the cache, its tensors located by the index; the target is a hard link to it, so a target's
tensors are written once), index.sqlite (+ WAL), tmp/ (writes in progress), lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from mergebuild.store.hashing import tensor_digest
from mergebuild.tensors.writer import TEMP_MARK, pid_alive

from mergebuild.store.blobs import BlobStore
from mergebuild.store.index import Index


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        with _flocked(self.root / "init.lock"):  # switching a new database to WAL is not busy-safe
            self.index = Index(self.root / "index.sqlite")
        self.packs = self.root / "packs"
        self._locations: dict[str, tuple[str, int]] | None = None
        self._lock = threading.Lock()

    # tensors by digest: a blob of its own, or a range of a pack --------------------------
    def has(self, digest: str) -> bool:
        if self.blobs.has(digest):
            return True
        where = self.locations().get(digest)
        return where is not None and (self.packs / where[0]).exists()

    def get(self, digest: str, dtype: str, shape, nbytes: int) -> bytearray | None:
        """The verified bytes of a tensor, or None when missing or bad (bad ones are forgotten)."""
        data = self.blobs.get(digest, dtype, shape, nbytes)
        if data is not None:
            return data
        where = self.locations().get(digest)
        if where is None:
            return None
        try:
            data = _pread(self.packs / where[0], where[1], nbytes)
        except OSError:
            data = None
        if data is None or tensor_digest(dtype, shape, data) != digest:
            with self._lock:
                self._locations.pop(digest, None)
            self.index.forget_locations([digest])
            return None
        return data

    def locations(self) -> dict[str, tuple[str, int]]:
        with self._lock:
            if self._locations is None:
                self._locations = self.index.locations()
            return self._locations

    def clear_stale(self) -> None:
        """Remove what killed processes left half-written: blob temps and pack temps."""
        self.blobs.clear_stale_tmp()
        for temp in self.packs.glob(f".*{TEMP_MARK}*") if self.packs.exists() else ():
            pid = temp.name.rsplit(TEMP_MARK, 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                temp.unlink(missing_ok=True)

    def new_pack(self) -> Path:
        self.packs.mkdir(parents=True, exist_ok=True)
        return self.packs / f"{uuid.uuid4().hex}.safetensors"

    def add_locations(self, pack: Path, rows: list[tuple[str, int]]) -> None:
        self.index.save_locations([(d, pack.name, offset) for d, offset in rows])
        with self._lock:
            if self._locations is not None:
                self._locations.update({d: (pack.name, offset) for d, offset in rows})

    def exclusive(self):
        """Held for a whole build or gc: a second process waits, then finds the work done."""
        return _flocked(self.root / "lock")

    def close(self) -> None:
        self.index.close()

    def size_on_disk(self) -> tuple[int, int]:
        """(number of blobs and packs, bytes) in objects/ and packs/."""
        count = total = 0
        for digest in self.blobs.all_digests():
            count += 1
            total += self.blobs.path(digest).stat().st_size
        for pack in self.packs.glob("*.safetensors") if self.packs.exists() else ():
            count += 1
            total += pack.stat().st_size
        return count, total

    def collect_packs(self, referenced: set[str]) -> tuple[int, int]:
        """Delete packs none of whose tensors is referenced; (packs removed, bytes freed)."""
        by_pack: dict[str, list[str]] = {}
        for digest, (pack, _) in self.locations().items():
            by_pack.setdefault(pack, []).append(digest)
        removed = freed = 0
        for path in self.packs.glob("*.safetensors") if self.packs.exists() else ():
            digests = by_pack.get(path.name, [])
            if not any(d in referenced for d in digests):
                freed += path.stat().st_size
                path.unlink()
                self.index.forget_locations(digests)
                removed += 1
        return removed, freed


@contextmanager
def _flocked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _pread(path: Path, offset: int, size: int) -> bytearray | None:
    buf = bytearray(size)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(buf)
    return buf if got == size else None
