"""Reading the remote tier from behind the local cache: tensors fetched with read-ahead, verified,
kept as local blobs.

A build reads a merge's tensors in the order planning looked their keys up, so when it needs a
tensor from the remote it fetches it together with the next ones the remote named (up to
READ_AHEAD of them, READ_AHEAD_BYTES in all): one concurrent round of requests instead of one
round trip per tensor. A tensor never read is never fetched unless it follows one that is (at
most a read-ahead's worth). After the build, the blobs of fetched tensors an output now holds are
dropped: the output is the one copy of a target's tensors, as in a local build.
"""

from __future__ import annotations

import threading

READ_AHEAD = 32
READ_AHEAD_BYTES = 64 << 20
SCAN = 4 * READ_AHEAD  # entries looked at past the one read, at most


class RemoteReads:
    def __init__(self, cache, tier):
        self.cache, self.tier = cache, tier
        self._lock = threading.Lock()
        self._order: list[tuple[str, str, tuple]] = []  # (digest, dtype, shape) in lookup order
        self._position: dict[str, int] = {}
        self._inflight: dict[str, threading.Event] = {}
        self.fetched: set[str] = set()  # digests fetched into local blobs

    def expect(self, results: dict[str, tuple[str, tuple]]) -> None:
        """Tensors (digest -> dtype, shape) the remote is to serve, in the order they will be read."""
        with self._lock:
            for digest, (dtype, shape) in results.items():
                if digest not in self._position:
                    self._position[digest] = len(self._order)
                    self._order.append((digest, dtype, tuple(shape)))

    def fetch(self, digest: str, dtype: str, shape, nbytes: int):
        """The verified bytes of a tensor from the remote (None: it has them not, or wrong)."""
        with self._lock:
            other = self._inflight.get(digest)
        if other is not None:  # another reader thread is fetching it now
            other.wait()
            data = self.cache._get_local(digest, dtype, shape, nbytes)
            if data is not None:
                return data
        batch = self._batch(digest, dtype, shape, nbytes)
        try:
            got = self.tier.get_many(batch)
            if not self.cache.readonly and got:
                self._keep(got)
        finally:
            with self._lock:
                for d, *_ in batch:
                    event = self._inflight.pop(d, None)
                    if event is not None:
                        event.set()
        return got.get(digest)

    def _batch(self, digest: str, dtype: str, shape, nbytes: int) -> list[tuple]:
        """This tensor and the next ones expected that are neither here nor being fetched."""
        from mergebuild.dtypes import nbytes as size_of

        with self._lock:
            batch, total = [(digest, dtype, tuple(shape), nbytes)], nbytes
            position = self._position.get(digest)
            if position is not None and not self.cache.readonly:
                for d, dt, sh in self._order[position + 1 : position + 1 + SCAN]:
                    size = size_of(dt, sh)
                    if len(batch) >= READ_AHEAD or total + size > READ_AHEAD_BYTES:
                        break
                    if d in self._inflight or d in self.fetched or self.cache.blobs.has(d):
                        continue
                    batch.append((d, dt, sh, size))
                    total += size
            for d, *_ in batch:
                self._inflight.setdefault(d, threading.Event())
        return batch

    def _keep(self, got: dict) -> None:
        with self._lock:
            self.fetched.update(got)
        self.cache.alive()
        rows = [(d, self.cache.blobs.put(d, data), "merge") for d, data in got.items()]
        self.cache.index.save_blobs([r for r in rows if r[1]], 0)  # the build touches what it used

    def drop_copies_in_outputs(self) -> None:
        """After a build: fetched tensors an output now holds keep no blob copy."""
        with self._lock:
            fetched, self.fetched = sorted(self.fetched), set()
        located = self.cache.index.locations_of(fetched)
        doomed = [d for d, where in located.items() if any(self.cache._file_valid(p) for p, _ in where)]
        for digest in doomed:
            self.cache.blobs.remove(digest)
        self.cache.index.forget_blobs(doomed)
