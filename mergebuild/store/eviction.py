"""Keeping the cache bounded: a size limit enforced after every build, and `cache gc`.

What counts is every byte the cache keeps outside the outputs (blobs, salvaged packs, the
index). Over the limit, the least recently used blobs that no registered Mergefile's last build
needs are evicted first. A Mergefile that no longer exists stops protecting anything. When what
the current targets need is itself over the limit, it is kept, and the caller warns.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import UsageError
from mergebuild.portable import disk_usage
from mergebuild.store.cache import Cache

# 50 GB: about seven SDXL-sized intermediates or twenty-five SD1.5 fp16 ones, enough to keep a
# lineage and a few tweaks of it warm, and small beside the disks people keep models on
DEFAULT_LIMIT = 50 * 10**9
ENV_LIMIT = "MERGEBUILD_CACHE_LIMIT"
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@dataclass
class Eviction:
    limit: int
    before: int = 0
    after: int = 0
    blobs_removed: int = 0
    needed: int = 0  # bytes of protected blobs (what the current targets need)

    @property
    def over(self) -> bool:
        return self.after > self.limit


def parse_size(text: str, what: str) -> int:
    m = SIZE.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{what}: expected bytes or a size such as \"50GB\", got {text!r}")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "B").upper()])


def own_limit(setting: int | None) -> int:
    """This Mergefile's limit: MERGEBUILD_CACHE_LIMIT, else [settings] cache_limit, else the default."""
    env = os.environ.get(ENV_LIMIT)
    if env:
        return parse_size(env, ENV_LIMIT)
    return setting or DEFAULT_LIMIT


def registered(cache: Cache) -> dict[str, int | None]:
    """The Mergefiles that use this cache and still exist (the others are forgotten)."""
    out = {}
    for path, limit in cache.index.mergefiles().items():
        if Path(path).is_file():
            out[path] = limit
        else:
            cache.index.forget_mergefile(path)
    return out


def effective_limit(cache: Cache, mergefile: str, own: int) -> int:
    """Two Mergefiles with different limits on one cache: the smaller wins."""
    others = [limit or DEFAULT_LIMIT for path, limit in registered(cache).items() if path != mergefile]
    return min([own] + others)


def protected(cache: Cache) -> set[str]:
    return cache.index.live_digests(list(registered(cache)))


def total_bytes(cache: Cache) -> int:
    return sum(cache.usage().values())


def enforce_limit(cache: Cache, limit: int) -> Eviction:
    """Evict least recently used, unprotected blobs (and salvaged packs) until under `limit`.
    The index's own bytes move as it changes, so the total is measured again after each pass."""
    result = Eviction(limit, before=total_bytes(cache))
    if result.before <= limit:  # nothing to evict: no pass over every blob and what protects it
        result.after = result.before
        return result
    keep = protected(cache)
    rows = cache.index.blob_rows()
    result.needed = sum(disk for d, disk, _, _ in rows if d in keep)
    candidates = [(d, disk) for d, disk, _kind, _last in rows if d not in keep]
    total = result.before
    if total > limit:
        for path in cache.pack_files():  # salvaged work of builds that never finished: first to go
            total -= _remove_pack(cache, path)
    while total > limit and candidates:
        doomed, over = [], total - limit
        while candidates and over > 0:
            digest, disk = candidates.pop(0)
            cache.blobs.remove(digest)
            doomed.append(digest)
            over -= disk
        _forget(cache, doomed)
        result.blobs_removed += len(doomed)
        total = total_bytes(cache)
    result.after = total_bytes(cache)
    return result


def collect(cache: Cache, keep_builds: int) -> dict:
    """`cache gc`: drop entries not used by the last `keep_builds` builds and not needed by a
    registered Mergefile, then every blob and pack nothing refers to."""
    before = total_bytes(cache)
    keep = protected(cache)
    recent = cache.index.recent_builds(keep_builds)
    min_build = min(recent) if recent else cache.index.counts()["builds"] + 10**12
    dropped = cache.index.drop_entries_older_than(min_build, keep)
    referenced = keep | cache.index.fingerprint_digests() | {d for d, _, _ in cache.index.entry_infos()}
    doomed = [d for d in cache.blobs.all_digests() if d not in referenced]
    for digest in doomed:
        cache.blobs.remove(digest)
    _forget(cache, doomed)
    packs = 0
    for path in cache.pack_files():
        if not any(d in referenced for d in cache.index.located_digests(str(path))):
            _remove_pack(cache, path)
            packs += 1
    cache.clear_stale()
    return {"entries_removed": len(dropped), "blobs_removed": len(doomed) + packs,
            "bytes_freed": max(0, before - total_bytes(cache))}


def _remove_pack(cache: Cache, path: Path) -> int:
    try:
        size = disk_usage(path.stat())
        path.unlink()
    except OSError:
        size = 0
    cache.forget_file(str(path))
    return size


def _forget(cache: Cache, digests: list[str]) -> None:
    """Blobs gone: their rows, and every entry that pointed at them (an entry never points at
    bytes that are not stored), except where a recorded file still holds the tensor."""
    if not digests:
        return
    cache.index.forget_blobs(digests)
    still = cache.has_many(digests)
    cache.index.forget_entries_of([d for d in digests if d not in still])
