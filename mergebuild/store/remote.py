"""The remote cache tier: tensors and cache entries shared between machines on any fsspec URL
(s3:// through s3fs, file:// for a shared folder), behind the local cache.

Layout under the URL (the format's version is in the path, so a later one can live beside it):
  v1/FORMAT                    a marker: the URL is a mergebuild remote cache
  v1/blobs/ab/<digest>         one tensor's bytes (content-addressed: the digest covers dtype, shape, bytes)
  v1/entries/ab/<key>          {"digest", "dtype", "shape"}: what a cache key computed
Rules (the local cache's): every blob read is verified against its digest, so a remote that
lies or loses data costs time, never correctness (a bad blob is not used, is never fetched again
by this process, and the next good result overwrites it); an entry is written only after its
blob; writers race harmlessly (the same name always gets the same bytes; shared folders get a
temp name then a rename, object stores' puts are atomic). mergebuild never deletes anything
here: the store's own lifecycle rules bound it.

A remote that fails (unreachable, dies mid-build, refuses access) is one warning line and the
build goes on local-only, unless the mode is `require`: then it is a one-line error (exit 1).
fsspec and s3fs are imported only here, and only when a remote is configured.
"""

from __future__ import annotations

import errno
import json
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mergebuild.errors import BuildError, UsageError
from mergebuild.portable import replace
from mergebuild.store.hashing import tensor_digest
from mergebuild.store.tiers import MODES, TierStats, redact

FORMAT = "v1"
UPLOAD_THREADS = 4
UPLOAD_CHUNK, UPLOAD_CHUNK_BYTES = 32, 32 << 20  # rows per round of concurrent puts, and their bytes
# a dead endpoint should cost seconds, not botocore's minutes of retries; remote_options' own
# config_kwargs win
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
LOCAL = ("file", "local")
MAX_ENTRY = 4096  # bytes of an entry read at most (they take about 120)


class RemoteTier:
    """One remote cache, opened for a build (or a worker). Thread-safe."""

    def __init__(self, url: str, options: dict | None, mode: str, token: str = ""):
        if mode not in MODES or mode == "off":
            raise UsageError(f"--remote-cache {mode!r}: expected one of {', '.join(MODES[1:])}")
        self.url, self.options, self.mode = url, dict(options or {}), mode
        self.shown = redact(url, self.options)  # what messages, stats and logs may say of it
        self.writes = mode in ("readwrite", "require")
        self.token = token or uuid.uuid4().hex[:12]
        self.stats = TierStats()
        self.warnings: list[str] = []
        self.dead = False
        self._lock = threading.Lock()
        self._found: dict[str, str] = {}  # key -> digest, entries read this process
        self._missing: set[str] = set()  # keys the remote had no entry for
        self._bad: set[str] = set()  # digests whose remote bytes were wrong: never fetched again
        self._uploads: dict[str, Future] = {}  # digest -> its upload, this process
        self._pool: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None  # the first failure in a background upload
        self.fs, self.root = None, ""  # connected on first use (_open)
        self._open_lock = threading.Lock()
        _check_installed(self.url)

    # opening ------------------------------------------------------------------------------
    def _open(self) -> bool:
        """Connect on first use, so a build that finds everything in the local cache never
        imports s3fs nor contacts the remote; False once the remote has failed."""
        if self.fs is None and not self.dead:
            with self._open_lock:
                if self.fs is None and not self.dead:
                    fs, root = self._connect()
                    if fs is not None and self._check_marker(fs, root):
                        self.root, self.fs = root, fs
        return self.fs is not None and not self.dead

    def _connect(self):
        import fsspec

        protocol = self.url.split("://", 1)[0].lower()
        options = dict(self.options)
        if protocol in LOCAL:
            options.setdefault("auto_mkdir", True)
        if protocol in ("s3", "s3a"):
            options["config_kwargs"] = {**S3_CONFIG, **options.get("config_kwargs", {})}
        try:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **options)
        except ImportError as e:
            raise UsageError(f"remote_cache {self.shown}: {redact(str(e), self.options)} "
                             "(pip install 'mergebuild[remote]')") from None
        except (TypeError, ValueError) as e:  # a bad URL or option, said in one line
            raise UsageError(f"remote_cache {self.shown}: cannot open it: {self._describe(e)}") from None
        except Exception as e:  # noqa: BLE001 - file systems that connect when made (ftp, sftp)
            self._failed(e, "cannot be reached")
            return None, ""
        return fs, f"{root.rstrip('/')}/{FORMAT}"

    def probe(self) -> bool:
        """Reach the remote now: False (with a warning) when it cannot be used; raises under
        `require`."""
        return self._open()

    def _check_marker(self, fs, root: str) -> bool:
        """The first contact: read the marker; a new remote gets it when this process may write."""
        marker = f"{root}/FORMAT"
        try:
            try:
                fs.cat_file(marker)
            except FileNotFoundError:
                if self.writes:
                    _put(fs, marker, f"mergebuild remote cache {FORMAT}\n".encode(), self.token)
            return True
        except Exception as e:  # noqa: BLE001
            self._failed(e, "cannot be reached")
            return False

    # reading ------------------------------------------------------------------------------
    def lookup(self, wanted: dict[str, tuple[str, tuple]]) -> dict[str, str]:
        """key -> digest for the keys the remote has an entry for, whose dtype and shape are the
        ones expected (wanted: key -> (dtype, shape)). One batch of reads; misses are remembered."""
        with self._lock:
            found = {k: self._found[k] for k in wanted if k in self._found}
            ask = [k for k in wanted if k not in found and k not in self._missing]
        if not ask or not self._open():
            return found
        paths = {self._entry(k): k for k in ask}
        try:
            replies = self._read_many(list(paths), [MAX_ENTRY] * len(paths))
        except Exception as e:  # noqa: BLE001
            self._failed(e, "failed while reading entries")
            return found
        failures = [r for r in replies.values() if isinstance(r, Exception) and not _is_miss(r)]
        if failures:
            self._failed(failures[0], "failed while reading entries")
            return found
        with self._lock:
            for path, key in paths.items():
                digest = _entry_digest(replies.get(path), *wanted[key])
                if digest is None:
                    self._missing.add(key)
                    self.stats.remote_misses += 1
                else:
                    self._found[key] = found[key] = digest
                    self.stats.remote_hits += 1
                    self.stats.bytes_down += len(replies[path])
        return found

    def get(self, digest: str, dtype: str, shape, nbytes: int):
        """The verified bytes of a blob, or None (missing, wrong, or the remote is down)."""
        return self.get_many([(digest, dtype, shape, nbytes)]).get(digest)

    def get_many(self, wanted: list[tuple[str, str, tuple, int]]) -> dict[str, bytearray]:
        """digest -> verified bytes of those of these blobs (digest, dtype, shape, nbytes) the
        remote has right, fetched concurrently; the others are absent."""
        with self._lock:
            wanted = [w for w in wanted if w[0] not in self._bad]
        empty = {w[0]: bytearray() for w in wanted if w[3] == 0 and tensor_digest(w[1], w[2], b"") == w[0]}
        wanted = [w for w in wanted if w[0] not in empty]  # no elements: nothing to fetch
        if not wanted or not self._open():
            return empty
        paths = {self._blob(w[0]): w for w in wanted}
        try:
            replies = self._read_many(list(paths), [w[3] + 1 for w in paths.values()])  # one more: a longer blob is bad
        except Exception as e:  # noqa: BLE001
            self._failed(e, "failed while reading tensors")
            return empty
        failures = [r for r in replies.values() if isinstance(r, Exception) and not _is_miss(r)]
        if failures:
            self._failed(failures[0], "failed while reading tensors")
            return empty
        good = empty
        for path, (digest, dtype, shape, nbytes) in paths.items():
            data = replies.get(path)
            if not isinstance(data, (bytes, bytearray)):
                continue  # not there: lost, or never stored
            ok = len(data) == nbytes and tensor_digest(dtype, shape, data) == digest
            with self._lock:
                self.stats.bytes_down += len(data)
                if ok:
                    self.stats.blobs_down += 1
                else:
                    self._bad.add(digest)
                    self.stats.bad_blobs += 1
            if ok:
                good[digest] = bytearray(data)  # a writable buffer, as local reads give
        return good

    def _read_many(self, paths: list[str], limits: list[int]) -> dict:
        """path -> its first `limit` bytes at most, or the exception reading it raised
        (concurrent on object stores; a range read, so an object larger than expected costs
        no memory and no HEAD request)."""
        replies = self.fs.cat_ranges(paths, [0] * len(paths), limits, on_error="return")
        return dict(zip(paths, replies))

    # writing ------------------------------------------------------------------------------
    def put_blob(self, digest: str, data) -> None:
        """Store a tensor's bytes under their digest (call only with bytes that hash to it)."""
        self._put(self._blob(digest), data)  # the entry waits for it (push, or the caller)
        with self._lock:
            self.stats.blobs_up += 1
            self.stats.bytes_up += len(data)

    def put_entry(self, key: str, digest: str, dtype: str, shape) -> None:
        """Record key -> digest; only once the blob is stored (put_blob returned)."""
        body = _entry_body(digest, dtype, shape)
        self._put(self._entry(key), body)
        with self._lock:
            self.stats.entries_up += 1
            self.stats.bytes_up += len(body)
            self._found[key] = digest
            self._missing.discard(key)

    def push(self, rows: list[tuple[str, str, str, tuple]], read) -> None:
        """In the background: the rows' blobs (bytes from read(digest, dtype, shape), None when
        they are gone), then their entries, in chunks of concurrent puts. rows: (key, digest,
        dtype, shape) the local cache just recorded, so they are trusted."""
        if not self.writes or self.dead or not rows:
            return
        from mergebuild.dtypes import nbytes

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="remote-up")
            chunk, size, later = [], 0, []
            for row in rows:
                if row[1] in self._uploads:
                    later.append((self._uploads[row[1]], row))  # its blob is on its way already
                    continue
                chunk.append(row)
                size += nbytes(row[2], row[3])
                if len(chunk) >= UPLOAD_CHUNK or size >= UPLOAD_CHUNK_BYTES:
                    self._submit_chunk(chunk, read)
                    chunk, size = [], 0
            if chunk:
                self._submit_chunk(chunk, read)
            for blob, row in later:
                self._pool.submit(self._entry_after, blob, row)

    def _submit_chunk(self, rows: list[tuple], read) -> None:
        future = self._pool.submit(self._upload_chunk, rows, read)
        for row in rows:
            self._uploads.setdefault(row[1], future)

    def _upload_chunk(self, rows: list[tuple], read) -> set[str]:
        """Blobs first, then the entries of those stored: the digests stored."""
        if self.dead:
            return set()
        blobs = {}
        for _key, digest, dtype, shape in rows:
            if digest not in blobs:
                data = read(digest, dtype, shape)
                if data is not None:
                    blobs[digest] = data
        entries = {self._entry(k): _entry_body(d, dt, sh) for k, d, dt, sh in rows if d in blobs}
        try:
            self._put_many({self._blob(d): data for d, data in blobs.items()})
            with self._lock:
                self.stats.blobs_up += len(blobs)
                self.stats.bytes_up += sum(len(d) for d in blobs.values())
            self._put_many(entries)
        except Exception as e:  # noqa: BLE001
            self._background_failure(e)
            return set()
        with self._lock:
            self.stats.entries_up += len(entries)
            self.stats.bytes_up += sum(len(b) for b in entries.values())
        return set(blobs)

    def _entry_after(self, blob: Future, row: tuple) -> None:
        key, digest, dtype, shape = row
        if digest not in blob.result() or self.dead:
            return  # no entry without its bytes
        try:
            self.put_entry(key, digest, dtype, shape)
        except Exception as e:  # noqa: BLE001
            self._background_failure(e)

    def _put_many(self, objects: dict[str, bytes]) -> None:
        if not objects:
            return
        if not self._open():
            raise BuildError(f"remote cache {self.shown} cannot be reached")
        if _is_local(self.fs):
            for path, data in objects.items():
                _put(self.fs, path, data, self.token)
        else:
            self.fs.pipe({p: bytes(d) for p, d in objects.items()})  # concurrent puts, each atomic

    def finish(self) -> None:
        """Wait for the uploads; under `require`, a failed one fails the build."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if self._failure is not None and self.mode == "require":
            failure, self._failure = self._failure, None
            raise failure

    def close(self) -> None:
        """Stop: uploads not started are dropped (a build that stopped early shares less)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # helpers ------------------------------------------------------------------------------
    def _blob(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest[:2]}/{digest}"

    def _entry(self, key: str) -> str:
        return f"{self.root}/entries/{key[:2]}/{key}"

    def _put(self, path: str, data) -> None:
        if not self._open():
            raise BuildError(f"remote cache {self.shown} cannot be reached")
        _put(self.fs, path, data, self.token)

    def _describe(self, e: BaseException) -> str:
        text = " ".join(str(e).split()) or type(e).__name__
        return redact(text, self.options)[:300]

    def _background_failure(self, e: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = BuildError(f"remote cache {self.shown} failed while storing: {self._describe(e)}")
        if self.mode != "require":
            self._failed(e, "failed while storing")
        else:
            self.dead = True

    def _failed(self, e: BaseException, what: str) -> None:
        """Under `require`: a one-line error. Else: one warning, and local-only from now on."""
        message = f"remote cache {self.shown} {what}: {self._describe(e)}"
        if self.mode == "require":
            self.dead = True
            raise BuildError(f"{message} (--remote-cache=require)") from None
        with self._lock:
            if self.dead:
                return
            self.dead = True
            self.stats.errors += 1
            self.warnings.append(f"{message}; going on with the local cache only")


def _check_installed(url: str) -> None:
    """fsspec (and s3fs for s3://) are there, found without importing them (that waits for use)."""
    from importlib.util import find_spec

    protocol = url.split("://", 1)[0].lower()
    needed = ["fsspec"] + (["s3fs"] if protocol in ("s3", "s3a") else [])
    for name in needed:
        try:
            missing = find_spec(name) is None
        except (ImportError, ValueError):  # a module set to None, or broken
            missing = True
        if missing:
            raise UsageError(f"remote_cache {redact(url)} needs {name}: pip install 'mergebuild[remote]'")


def _put(fs, path: str, data, token: str) -> None:
    """Write a whole object: an object store's put is atomic; a folder's file goes to a temp name
    then is renamed (readers see the whole blob or none; same-name writers race harmlessly)."""
    if not _is_local(fs):
        fs.pipe_file(path, bytes(data))
        return
    temp = f"{path}.{token}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fs.pipe_file(temp, bytes(data))
        replace(Path(temp), Path(path))
    except BaseException:
        try:
            fs.rm_file(temp)
        except Exception:  # noqa: BLE001 - it may never have been made
            pass
        raise


def _is_miss(error: Exception) -> bool:
    """A read that found no usable object (absent; empty, so no range of it exists): not a
    failure of the remote."""
    return isinstance(error, FileNotFoundError) or (isinstance(error, OSError) and error.errno == errno.EINVAL)


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in LOCAL for p in protocols)


def _entry_body(digest: str, dtype: str, shape) -> bytes:
    return json.dumps({"digest": digest, "dtype": dtype, "shape": list(shape)}, separators=(",", ":")).encode()


def _entry_digest(reply, dtype: str, shape) -> str | None:
    """An entry's digest when it is well-formed and for a tensor of this dtype and shape."""
    if not isinstance(reply, (bytes, bytearray)):
        return None
    try:
        doc = json.loads(reply)
        digest = doc["digest"]
        ok = doc["dtype"] == dtype and list(doc["shape"]) == list(shape) and isinstance(digest, str)
    except (ValueError, KeyError, TypeError):
        return None
    return digest if ok and len(digest) == 32 and all(c in "0123456789abcdef" for c in digest) else None
