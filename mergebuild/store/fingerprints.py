"""The per-user fingerprint store: what hashing a file found, kept once per machine.

A source's sha256 (4.3 GB of SHA-256 for an SD1.5 pair), its tensors' xxh3 digests and a LoRA's
tensor-data sha256 cost the same for every project and every cache that reads the file. This
store keeps them under the file's identity, never its path: (device, file id, size, mtime_ns,
change time), as A1111 keeps its hash cache. So a file hashed by any project or cache on this
machine is not hashed again, and a file rewritten in place (even with its size and mtime put
back) is a miss: its change time moved.

One SQLite file, `fingerprints.sqlite`, in MERGEBUILD_HOME (default: the user's cache folder,
portable.user_cache_dir). WAL mode and one statement per write, so builds in several processes
read and write it at once on every OS (SQLite locks the file itself; no flock). It is a cache:
when it cannot be opened, written or read (an unwritable home, a corrupt file), the build says so
once and hashes as if it were empty. A row unused for EXPIRE_DAYS is dropped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mergebuild.portable import file_identity, user_cache_dir

ENV_HOME = "MERGEBUILD_HOME"
FILE_NAME = "fingerprints.sqlite"
# Bump when what a row means changes (the digest of a tensor, the content identity): older rows
# are dropped, never read as if they meant the new thing.
VERSION = 1
EXPIRE_DAYS = 180
SCHEMA = """
CREATE TABLE IF NOT EXISTS files(device INTEGER NOT NULL, inode INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, tensors TEXT, content TEXT, sha256 TEXT,
    addnet TEXT, used REAL NOT NULL, PRIMARY KEY(device, inode));
CREATE INDEX IF NOT EXISTS files_used ON files(used);
"""
# files_used: the expiry each opening runs reads the index, not every row (the rows hold whole
# tensor tables: scanning a store of 981 files, 32 MB, took 11 ms of every command)
Identity = tuple  # (device, inode, size, mtime_ns, ctime_ns): portable.file_identity


def home() -> Path:
    """Where per-user state lives: MERGEBUILD_HOME, else the user's cache folder."""
    value = os.environ.get(ENV_HOME)
    return Path(value).expanduser() if value else user_cache_dir("mergebuild")


def identity(path: Path, stamp: tuple) -> Identity | None:
    """The file's identity, if it still has `stamp` (size, mtime_ns, ctime_ns, inode) now:
    what was hashed under that stamp is what the store may keep."""
    try:
        now = file_identity(path)
    except OSError:
        return None
    device, inode, size, mtime, ctime = now
    return now if (size, mtime, ctime, inode) == tuple(stamp) else None


@dataclass(frozen=True)
class Known:
    tensors: dict | None  # name -> [dtype, shape, digest] (a safetensors file's)
    content: str | None
    sha256: str | None
    addnet: str | None  # sha256 of the tensor data (kohya's addnet hash)


# SQLite's own busy timeout (60 s) covers most waits, but some answers come at once, without
# it: another process converting a new store to WAL, or one's write racing another's snapshot.
# Such a busy database is tried again for up to BUSY_WAIT seconds before the store turns itself off
# (5 tries in 0.75 s were not enough for two processes under a loaded CI machine's test suite).
BUSY_WAIT = 15.0


class FingerprintStore:
    """One process's handle on the store; every method is safe to call from any thread and
    never raises: a failure turns the store off and leaves one warning (take_warning)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._opened = False
        self.problem: str | None = None  # why the store is off
        self._warned = False

    # public -------------------------------------------------------------------------------
    def lookup(self, key: Identity | None) -> Known | None:
        if not _usable(key):
            return None
        row = self._run("SELECT tensors, content, sha256, addnet FROM files WHERE device=? AND inode=? AND size=? "
                        "AND mtime_ns=? AND ctime_ns=?", key, fetch=True)
        if not row:
            return None
        tensors, content, sha256, addnet = row[0]
        try:
            table = json.loads(tensors) if tensors is not None else None
        except ValueError:
            table = None  # a damaged row: as if unknown
        if table is not None and not isinstance(table, dict):
            table = None
        self._run("UPDATE files SET used=? WHERE device=? AND inode=?", (time.time(), key[0], key[1]), quiet=True)
        return Known(table, content if table is not None else None, sha256, addnet)

    def save_tensors(self, key: Identity | None, tensors: dict, content: str) -> None:
        self._upsert(key, "tensors", json.dumps(tensors, separators=(",", ":")), "content", content)

    def save_sha256(self, key: Identity | None, sha256: str) -> None:
        self._upsert(key, "sha256", sha256)

    def save_addnet(self, key: Identity | None, addnet: str) -> None:
        self._upsert(key, "addnet", addnet)

    def take_warning(self) -> str | None:
        """The one line to show when the store is off (once per process)."""
        if self.problem is None or self._warned:
            return None
        self._warned = True
        return (f"the fingerprint store {self.path} cannot be used ({self.problem}): files are hashed as if it "
                f"were empty (set {ENV_HOME}, or delete the file to start a new one)")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # inside -------------------------------------------------------------------------------
    def _upsert(self, key: Identity | None, column: str, value: str, column2: str | None = None,
                value2: str | None = None) -> None:
        """Set columns of the row for `key`. A row for another state of the same file id is
        dropped first: that file is gone or changed. Each statement stands alone, so two
        processes writing at once leave a row that is right, or no row, and a reader sees the
        row whole or not at all."""
        if not _usable(key):
            return
        pairs = [(column, value)] + ([(column2, value2)] if column2 else [])
        device, inode, size, mtime, ctime = key
        self._run("DELETE FROM files WHERE device=? AND inode=? AND NOT (size=? AND mtime_ns=? AND ctime_ns=?)",
                  (device, inode, size, mtime, ctime))
        columns = [c for c, _ in pairs]
        # one statement, so another process's lookup never sees the row half made (no tensors yet)
        self._run(f"INSERT INTO files(device, inode, size, mtime_ns, ctime_ns, used, {', '.join(columns)}) "
                  f"VALUES(?,?,?,?,?,?{',?' * len(columns)}) ON CONFLICT(device, inode) DO UPDATE SET "
                  f"{', '.join(f'{c}=excluded.{c}' for c in columns)} WHERE size=excluded.size AND "
                  "mtime_ns=excluded.mtime_ns AND ctime_ns=excluded.ctime_ns", (*key, time.time(), *[v for _, v in pairs]))

    def _run(self, sql: str, params=(), fetch: bool = False, quiet: bool = False):
        """One statement; a failure turns the store off (quiet: is ignored, for what only helps)."""
        with self._lock:
            db = self._connection()
            if db is None:
                return None
            try:
                rows = _when_free(lambda: db.execute(sql, params).fetchall())
                return rows if fetch else None
            except (sqlite3.Error, OSError) as e:
                if not quiet:
                    self._turn_off(e)
                return None

    def _connection(self) -> sqlite3.Connection | None:
        if self._opened:
            return self._db
        self._opened = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            try:
                _when_free(lambda: _prepare(db))
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as e:
            self._turn_off(e)
            return None
        self._db = db
        return db

    def _turn_off(self, error: BaseException) -> None:
        self.problem = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None
        self._opened = True


def _prepare(db: sqlite3.Connection) -> None:
    """A new connection's set-up; each step may be run again (another process may be at it)."""
    db.execute("PRAGMA journal_mode=WAL")  # a file system without shared memory keeps the default
    db.execute("PRAGMA synchronous=NORMAL")
    if db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
        _start_over(db)
    db.executescript(SCHEMA)
    db.execute("DELETE FROM files WHERE used < ?", (time.time() - EXPIRE_DAYS * 86400,))


def _when_free(step):
    """`step()`, tried again while SQLite answers that the database is busy (BUSY_WAIT)."""
    deadline = time.monotonic() + BUSY_WAIT
    pause = 0.02
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            message = str(e)
            if ("locked" not in message and "busy" not in message) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _start_over(db: sqlite3.Connection) -> None:
    """A store of another version (or a new file): its table dropped and the version set, in one
    write transaction that checks the version again. Two processes opening a new store at once
    otherwise both saw version 0, and the second one's DROP took the rows the first had written
    meanwhile (test_several_processes_write_at_once lost rows this way under load)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
            db.execute("DROP TABLE IF EXISTS files")
            db.execute(f"PRAGMA user_version={VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _usable(key: Identity | None) -> bool:
    """A key that names one file: some file systems (FAT through FUSE, some network shares)
    report file id 0 for every file, which would let two files share a row."""
    return key is not None and key[1] != 0


_current: FingerprintStore | None = None
_current_lock = threading.Lock()


def user_store() -> FingerprintStore:
    """This process's store for the current MERGEBUILD_HOME (one connection open at a time:
    a process that changes the variable, as tests do, closes the old one)."""
    global _current
    folder = home()
    with _current_lock:
        if _current is None or _current.folder != folder:
            if _current is not None:
                _current.close()
            _current = FingerprintStore(folder)
        return _current


def close_user_store() -> None:
    """Close this process's store (a process about to end without its interpreter's teardown
    would otherwise leave the store's write-ahead log beside it)."""
    global _current
    with _current_lock:
        if _current is not None:
            _current.close()
            _current = None
