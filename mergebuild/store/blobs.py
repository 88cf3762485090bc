"""Content-addressed blobs: the raw bytes of one tensor at objects/ab/<digest>.

Writes go to tmp/ and are renamed into place, so a blob is complete or absent. Blobs are not
fsynced one by one: every read checks size and digest, and a bad blob is deleted and recomputed,
so even a blob torn by a power loss is never used.
"""

from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

from mergebuild.store.hashing import tensor_digest
from mergebuild.tensors.writer import pid_alive


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, digest: str, data) -> None:
        target = self.path(digest)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / f"{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def get(self, digest: str, dtype: str, shape, nbytes: int):
        """The verified bytes of a blob (a read-only mapping of the file: no copy, no fresh
        memory), or None when it is missing or bad (a bad one is removed)."""
        target = self.path(digest)
        try:
            with open(target, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != nbytes:
                    data = None
                elif nbytes == 0:
                    data = bytearray()
                else:
                    data = memoryview(mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ))
        except FileNotFoundError:
            return None
        if data is None or tensor_digest(dtype, shape, data) != digest:
            target.unlink(missing_ok=True)
            return None
        return data

    def all_digests(self):
        if not self.objects.exists():
            return
        for sub in self.objects.iterdir():
            for f in sub.iterdir():
                yield sub.name + f.name

    def remove(self, digest: str) -> int:
        target = self.path(digest)
        try:
            size = target.stat().st_size
            target.unlink()
            return size
        except FileNotFoundError:
            return 0

    def clear_stale_tmp(self) -> None:
        """Remove temp files whose writing process is gone (killed mid-write)."""
        if not self.tmp.exists():
            return
        for f in self.tmp.iterdir():
            parts = f.name.split(".")
            if len(parts) >= 2 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                f.unlink(missing_ok=True)
