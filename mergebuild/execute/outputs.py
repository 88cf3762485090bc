"""A single-file output is written once, into the cache as a pack, and hard-linked to its target.

The pack's tensors are the cache entries of the target's merge (the index locates them in it),
so a target's bytes are written once instead of twice (blob + output). Where a hard link is not
possible (cache on another filesystem), the pack is copied. Either way the target appears
atomically: linked or copied to a temp name beside it, then renamed.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from mergebuild.store.cache import Cache
from mergebuild.tensors.writer import TEMP_MARK, SafetensorsWriter, fsync_dir


class PackedOutput:
    def __init__(self, cache: Cache, target: Path, tensors: list, draft_metadata: dict):
        self.cache, self.target = cache, Path(target)
        self.pack = cache.new_pack()
        self.writer = SafetensorsWriter(self.pack, tensors, draft_metadata)
        self.locations: list[tuple[str, int]] = []  # (digest, offset) of tensors computed into it
        self._lock = threading.Lock()  # writer threads report what they stored

    def write(self, name: str, data, at: int = 0) -> None:
        self.writer.write(name, data, at)

    def target_of(self, name: str) -> tuple[int, int]:
        return self.writer.target(name)

    def stored(self, name: str, digest: str) -> bool:
        """A computed tensor lives in this pack (no blob of its own)."""
        with self._lock:
            self.locations.append((digest, self.writer.position(name)))
        return True

    def mark_done(self, name: str) -> None:
        self.writer.mark_done(name)

    def data_sha256(self):
        return self.writer.data_sha256()

    def commit(self, metadata: dict[str, str]) -> None:
        self.writer.commit(metadata)
        self.cache.add_locations(self.pack, self.locations)
        publish(self.pack, self.target)

    def abort(self) -> None:
        self.writer.abort()


def publish(pack: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}{TEMP_MARK}{os.getpid()}"
    temp.unlink(missing_ok=True)
    try:
        os.link(pack, temp)
    except OSError:
        shutil.copyfile(pack, temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(temp, target)
    fsync_dir(target.parent)
