"""The index's SQLite connection: one connection shared by a build's threads, each statement
under one lock, transactions that hold it, errors that name the database."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if not readonly:
        return sqlite3.connect(path, timeout=600, isolation_level=None, check_same_thread=False)
    # read-only commands (-n, status, cache stats) on a cache they cannot write: open it
    # read-only, or as immutable when even the WAL's shared memory cannot be made
    uri = path.absolute().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)


class Rows(list):
    """A statement's rows, read while the lock was held."""

    lastrowid: int | None = None

    def fetchone(self):
        return self[0] if self else None


class Serialized:
    """One SQLite connection shared by the build's threads (a reader thread that heals a bad
    blob writes to the index too): every statement runs under one lock and its rows are read
    before the lock is released; a transaction holds the lock throughout."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db = db
        self.path = path
        self.lock = threading.RLock()

    def execute(self, sql: str, params=()) -> Rows:
        with self.lock, _named(self.path):
            cursor = self._db.execute(sql, params)
            rows = Rows(cursor.fetchall())
            rows.lastrowid = cursor.lastrowid
            return rows

    def executemany(self, sql: str, rows) -> None:
        with self.lock, _named(self.path):
            self._db.executemany(sql, rows)

    def executescript(self, script: str) -> None:
        with self.lock, _named(self.path):
            self._db.executescript(script)

    def close(self) -> None:
        with self.lock:
            self._db.close()


class _named:
    """SQLite's errors do not say which database: attach the index's path for the message."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, sqlite3.Error) and not hasattr(error, "index_path"):
            error.index_path = str(self.path)
        return False


class Transaction:
    def __init__(self, db: Serialized):
        self.db = db

    def __enter__(self):
        self.db.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.db.lock.release()
            raise
        return self.db

    def __exit__(self, kind, value, tb):
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.db.lock.release()
