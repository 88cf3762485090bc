"""Content-addressed blobs: the raw bytes of one tensor at objects/ab/<digest>.

Writes go to tmp/ and are renamed into place, so a blob is complete or absent. Blobs are not
fsynced one by one: every read checks size and digest, and a bad blob is deleted and recomputed,
so even a blob torn by a power loss is never used. Reads copy into a buffer (no mapping), so a
blob truncated under a build is a miss, never SIGBUS.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebuild.portable import RandomAccess, disk_usage, is_locked, replace
from mergebuild.store.hashing import tensor_digest


class BlobStore:
    def __init__(self, root: Path, token: str):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self._objects = str(self.objects)
        self.tmp = self.root / "tmp"
        self.token = token  # this process's: temp names carry it, tmp/<token>.alive is locked by it

    def path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        # os.path on a string: checking 100k blobs is a planning cost, Path objects triple it
        return os.path.isfile(os.path.join(self._objects, digest[:2], digest[2:]))

    def put(self, digest: str, data) -> int:
        """Store bytes under their digest; the bytes the blob takes on disk (0 if it was there)."""
        target = self.path(digest)
        if target.exists():
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / f"{digest}.{self.token}.{os.urandom(4).hex()}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
            replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return disk_usage(os.stat(target))

    def get(self, digest: str, dtype: str, shape, nbytes: int, take=None):
        """The verified bytes of a blob, or None when it is missing or bad (a bad one is removed).
        take(nbytes): the buffer to read into (a pool's), else a fresh one."""
        target = self.path(digest)
        try:
            with RandomAccess(target) as f:
                data = _read(f, nbytes, take) if f.size() == nbytes else None
        except FileNotFoundError:
            return None
        except OSError:
            data = None
        if data is None or tensor_digest(dtype, shape, data) != digest:
            target.unlink(missing_ok=True)
            return None
        return data

    def all_digests(self):
        if not self.objects.is_dir():
            return
        for sub in self.objects.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    yield sub.name + f.name

    def remove(self, digest: str) -> int:
        target = self.path(digest)
        try:
            size = disk_usage(target.stat())
            target.unlink()
            return size
        except FileNotFoundError:
            return 0

    def clear_stale_tmp(self) -> None:
        """Remove temp files whose writing process is gone (killed mid-write): a temp's process
        holds the lock on tmp/<token>.alive while it lives, so a reused PID fools nothing."""
        if not self.tmp.is_dir():
            return
        for f in self.tmp.iterdir():
            if f.suffix == ".alive":
                if f.stem != self.token and not is_locked(f):
                    f.unlink(missing_ok=True)
                continue
            parts = f.name.split(".")
            token = parts[1] if len(parts) >= 3 else None
            if token != self.token and not is_locked(self.tmp / f"{token}.alive"):
                f.unlink(missing_ok=True)


def _read(f: RandomAccess, nbytes: int, take):
    if take is None:
        return f.read(nbytes, 0)
    buf = take(nbytes)
    f.read_into(buf, 0)
    return buf
