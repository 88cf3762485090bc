"""The cache folder: blobs + index + a lock, as one object.

Layout: objects/ab/<digest> (tensor bytes), index.sqlite (+ WAL), tmp/ (writes in progress), lock.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from mergebuild.store.blobs import BlobStore
from mergebuild.store.index import Index


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.index = Index(self.root / "index.sqlite")

    @contextmanager
    def exclusive(self):
        """Held for a whole build or gc: a second process waits, then finds the work done."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        self.index.close()

    def size_on_disk(self) -> tuple[int, int]:
        """(number of blobs, bytes) in objects/."""
        count = total = 0
        for digest in self.blobs.all_digests():
            count += 1
            total += self.blobs.path(digest).stat().st_size
        return count, total
