"""The cache folder: blobs + index + a lock, as one object.

Layout: objects/ab/<digest> (one tensor's bytes), index.sqlite (+ WAL), tmp/ (writes in
progress, and one locked <token>.alive file per live process), packs/ (tensors salvaged from an
interrupted build's output), lock (held by the build that runs), lock.info (who holds it).

A target's own tensors are not kept here: they live in the output file, which the index
locates them in (a location is used only while the file keeps the stamp recorded at commit).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from mergebuild.dtypes import nbytes as size_of
from mergebuild.errors import BuildError, MergebuildError
from mergebuild.portable import FileLock, RandomAccess, disk_usage, file_stamp, is_locked
from mergebuild.store.blobs import BlobStore
from mergebuild.store.hashing import tensor_digest
from mergebuild.store.index import Index
from mergebuild.store.tiers import TierStats

STALE_ALIVE_SECONDS = 60  # a liveness file younger than this may be about to be locked


class Cache:
    def __init__(self, root: Path, readonly_ok: bool = False):
        """readonly_ok: a command that only reads (-n, status, cache stats) opens a cache it
        cannot write read-only instead of failing."""
        self.root = Path(root)
        self.token = f"{os.getpid()}-{os.urandom(6).hex()}"  # random hex (uuid would import platform: ~4 ms)
        self.readonly = readonly_ok and self.root.is_dir() and not _writable(self.root)
        if not self.readonly:
            _make_folder(self.root)
        self.blobs = BlobStore(self.root, self.token)
        if self.readonly:
            self.index = _open_readonly(self.root)
        else:
            with self._init_lock():  # switching a new database to WAL is not busy-safe
                self.index = Index(self.root / "index.sqlite")
            if self.index.reset_from_old:
                shutil.rmtree(self.root / "packs", ignore_errors=True)  # the old layout's packs
        self.packs = self.root / "packs"
        self._valid: dict[str, bool] = {}  # file path -> its stamp is still the recorded one
        self._lock = threading.Lock()
        self._alive: FileLock | None = None
        self.remote = None  # a RemoteTier behind this cache, and how it is read (store/remote.py: attach_remote)
        self.remote_reads = None
        self.tier_stats = TierStats()  # what this process found and read locally

    @contextmanager
    def _init_lock(self):
        lock = FileLock(self.root / "init.lock")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # tensors by digest: a blob of its own, or a range of a recorded file -----------------
    def has(self, digest: str) -> bool:
        return self.blobs.has(digest) or self.locate(digest) is not None

    def has_many(self, digests: list[str]) -> set[str]:
        """Which of these digests have stored bytes (one index query for the lot)."""
        blobs = {d for d in digests if self.blobs.has(d)}
        located = self.index.locations_of([d for d in digests if d not in blobs])
        return blobs | {d for d, where in located.items() if any(self._file_valid(p) for p, _ in where)}

    def locate(self, digest: str) -> tuple[str, int] | None:
        """(file, offset) of a tensor inside a recorded file that is unchanged since."""
        for path, offset in self.index.locations_of([digest]).get(digest, ()):
            if self._file_valid(path):
                return path, offset
        return None

    def get(self, digest: str, dtype: str, shape, nbytes: int, take=None):
        """The verified bytes of a tensor, or None when missing or bad: locally, else from the
        remote tier (verified there, then kept as a local blob). take(nbytes): the buffer a
        local read goes into (execute/tensorio.py's pool), else a fresh one."""
        data = self._get_local(digest, dtype, shape, nbytes, take)
        if data is not None:
            with self._lock:
                self.tier_stats.local_bytes_read += nbytes
            return data
        return self.remote_reads.fetch(digest, dtype, shape, nbytes) if self.remote_reads is not None else None

    def _get_local(self, digest: str, dtype: str, shape, nbytes: int, take=None):
        data = self.blobs.get(digest, dtype, shape, nbytes, take)
        if data is not None:
            return data
        where = self.locate(digest)
        if where is None:
            return None
        try:
            with RandomAccess(Path(where[0])) as f:
                data = f.read(nbytes, where[1])
        except OSError:
            data = None
        if data is None or tensor_digest(dtype, shape, data) != digest:
            self.forget_file(where[0])  # the file changed in a way its stamp did not show
            return None
        return data

    # the tiers: what a cache key computed, found locally or on the remote ------------------
    def find_results(self, wanted: dict[str, tuple[str, tuple]]) -> dict[str, str]:
        """key -> digest of the keys whose result has stored bytes (wanted: key -> the result's
        dtype and shape): in this cache, else in the remote tier. What the remote's entries say is
        remembered in the index at once (so a no-op build asks the network nothing); with a
        remote, an entry whose bytes are not here stands for bytes there: fetched when read,
        verified, and recomputed when they are missing or bad."""
        found = self.index.lookup(list(wanted))
        stored = self.has_many(sorted(set(found.values())))
        remote = self.remote if self.remote is not None and not self.remote.dead else None
        hits = dict(found) if remote is not None else {k: d for k, d in found.items() if d in stored}
        with self._lock:
            self.tier_stats.local_hits += sum(1 for d in found.values() if d in stored)
        if remote is not None and len(hits) < len(wanted):
            learnt = remote.lookup({k: v for k, v in wanted.items() if k not in hits})
            if learnt and not self.readonly:
                self.index.record([(k, d, *wanted[k]) for k, d in learnt.items()], 0)  # the build touches them
            hits.update(learnt)
        if remote is not None:  # what the remote is to serve, in the order the build reads it
            self.remote_reads.expect({hits[k]: wanted[k] for k in wanted if k in hits and hits[k] not in stored})
        return hits

    def share(self, rows: list[tuple[str, str, str, tuple]]) -> None:
        """Entries just recorded here (key, digest, dtype, shape): to the remote too, blob then
        entry, in the background (their bytes read back from this cache, verified)."""
        if self.remote is not None and self.remote.writes:
            self.remote.push(rows, lambda d, dt, sh: self._get_local(d, dt, sh, size_of(dt, sh)))

    def _file_valid(self, path: str) -> bool:
        with self._lock:
            known = self._valid.get(path)
        if known is None:
            recorded = self.index.files().get(path)
            try:
                known = recorded is not None and file_stamp(path) == tuple(recorded[0])
            except OSError:
                known = False
            with self._lock:
                self._valid[path] = known
        return known

    def save_file(self, path: Path, kind: str, owner: str | None, rows: list[tuple[str, int]]) -> None:
        """Record a committed file that holds tensors: (digest, offset) of each."""
        self.index.save_file(str(path), file_stamp(path), kind, owner, rows)
        with self._lock:
            self._valid.pop(str(path), None)

    def forget_file(self, path: str) -> None:
        self.index.forget_file(path)
        with self._lock:
            self._valid[path] = False

    # temp files and liveness --------------------------------------------------------------
    def alive(self) -> None:
        """Before this process writes temps: hold tmp/<token>.alive, so other processes know its
        temps are in use (a PID alone can be reused)."""
        if self._alive is None:
            _make_folder(self.blobs.tmp)
            self._alive = FileLock(self.blobs.tmp / f"{self.token}.alive")
            self._alive.acquire()

    def clear_stale(self) -> None:
        """Remove what killed processes left half-written (run under the exclusive lock)."""
        tmp = self.blobs.tmp
        if tmp.is_dir():
            now = time.time()
            for f in tmp.glob("*.alive"):
                try:
                    young = now - f.stat().st_mtime < STALE_ALIVE_SECONDS
                except FileNotFoundError:
                    continue
                if f.stem != self.token and not young and not is_locked(f):
                    f.unlink(missing_ok=True)
        self.blobs.clear_stale_tmp()

    def new_pack(self) -> Path:
        _make_folder(self.packs)
        return self.packs / f"salvage-{os.urandom(16).hex()}.safetensors"

    # the build lock ---------------------------------------------------------------------
    @contextmanager
    def exclusive(self, timeout: float | None = None, on_wait=None):
        """Held for a whole build or gc: a second process waits (saying for whom, through
        on_wait), then finds the work done. timeout: seconds to wait at most (None: forever)."""
        lock = FileLock(self.root / "lock")
        if not lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait(self._holder())
            deadline = None if timeout is None else time.monotonic() + timeout
            while not lock.acquire(blocking=False):  # polling keeps Ctrl-C and SIGTERM working
                if deadline is not None and time.monotonic() >= deadline:
                    lock.release()
                    raise BuildError(f"{self.root}: another build still holds the cache after {timeout:g} s "
                                     f"({self._holder() or 'unknown process'}); try again later")
                time.sleep(0.2)
        try:
            self._write_holder()
            yield
        finally:
            lock.release()

    def _write_holder(self) -> None:
        info = self.root / "lock.info"
        try:
            info.write_text(f"{os.getpid()} {time.time():.0f}\n")
        except OSError:
            pass  # only a courtesy for waiting builds

    def _holder(self) -> str:
        try:
            pid, started = (self.root / "lock.info").read_text().split()[:2]
            return f"build PID {pid} (started {time.strftime('%H:%M', time.localtime(float(started)))})"
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        self.index.close()
        if self._alive is not None:
            self._alive.release()
            (self.blobs.tmp / f"{self.token}.alive").unlink(missing_ok=True)
            self._alive = None

    # sizes --------------------------------------------------------------------------------
    def pack_files(self) -> list[Path]:
        return sorted(self.packs.glob("*.safetensors")) if self.packs.is_dir() else []

    def usage(self) -> dict[str, int]:
        """Bytes on disk of everything the cache keeps, by kind (what `du` counts)."""
        kinds = {"intermediates": 0, "earlier output tensors": 0, "imported sources": 0, "salvaged": 0}
        names = {"merge": "intermediates", "replaced": "earlier output tensors", "import": "imported sources",
                 "salvage": "salvaged"}
        for kind, total in self.index.blob_bytes().items():
            kinds[names.get(kind, kind)] = kinds.get(names.get(kind, kind), 0) + (total or 0)
        kinds["salvaged"] += sum(_disk(p) for p in self.pack_files())
        kinds["index"] = sum(_disk(p) for p in self.root.glob("index.sqlite*"))
        tmp = self.blobs.tmp
        kinds["in progress"] = sum(_disk(p) for p in tmp.iterdir()) if tmp.is_dir() else 0
        tune = self.root / "tune"
        kinds["tune studies"] = sum(_disk(p) for p in tune.rglob("*") if p.is_file()) if tune.is_dir() else 0
        kinds["locks"] = sum(_disk(self.root / n) for n in ("lock", "lock.info", "init.lock"))
        folders = [self.root, tmp, self.packs, tune, self.blobs.objects]
        if self.blobs.objects.is_dir():
            folders += [p for p in self.blobs.objects.iterdir() if p.is_dir()]
        kinds["folders"] = sum(_disk(p) for p in folders)
        return kinds


def _writable(root: Path) -> bool:
    index = root / "index.sqlite"
    return os.access(root, os.W_OK) and (not index.exists() or os.access(index, os.W_OK))


def _disk(path: Path) -> int:
    try:
        return disk_usage(path.stat())
    except OSError:
        return 0


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise MergebuildError(f"{path}: the cache expects a folder here, but it is a file; "
                              "move it away or name another cache (--cache-dir)")
    path.mkdir(parents=True, exist_ok=True)


def _open_readonly(root: Path) -> Index:
    index = root / "index.sqlite"
    if not index.exists():
        raise MergebuildError(f"{root}: the cache is read-only and has no index yet; "
                              "name a writable cache (--cache-dir)")
    return Index(index, readonly=True)
