"""The cache index: SQLite in WAL mode, safe for several mergebuild processes at once.

Tables:
- entries: cache key of a merged tensor -> digest of its result (plus dtype and shape, so a blob
  can be verified without its producer), and the last build that used it (for gc);
- fingerprints: a source file's stat (size, mtime_ns, inode) -> its tensors' digests and sha256,
  so an unchanged file is never hashed twice;
- outputs: an output file's stat -> the digest of what it holds (skip rewriting it);
- locations: digest -> (pack file, offset) for tensors stored inside a pack (an output written
  into the cache and hard-linked to its target) rather than as a blob of their own;
- builds: one row per build (gc keeps the entries of the last N);
- recipes: the recipe each merge was last built with (to explain what changed).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from mergebuild.errors import MergebuildError

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(key TEXT PRIMARY KEY, digest TEXT NOT NULL, dtype TEXT NOT NULL,
    shape TEXT NOT NULL, last_build INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_digest ON entries(digest);
CREATE TABLE IF NOT EXISTS fingerprints(path TEXT PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, tensors TEXT NOT NULL, sha256 TEXT);
CREATE TABLE IF NOT EXISTS outputs(path TEXT PRIMARY KEY, digest TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS builds(id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL,
    mergefile TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS locations(digest TEXT PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS recipes(mergefile TEXT NOT NULL, merge TEXT NOT NULL, recipe TEXT NOT NULL,
    PRIMARY KEY(mergefile, merge));
"""
BATCH = 500


class Index:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = _Serialized(sqlite3.connect(self.path, timeout=600, isolation_level=None, check_same_thread=False))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (SCHEMA_VERSION,))
        version = self.db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise MergebuildError(f"{self.path}: cache index version {version}, expected {SCHEMA_VERSION}; "
                                  "delete the cache folder to start afresh")

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        return _Transaction(self.db)

    # entries ------------------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> dict[str, str]:
        """The digests of those keys that have an entry."""
        found = {}
        for i in range(0, len(keys), BATCH):
            part = keys[i : i + BATCH]
            marks = ",".join("?" * len(part))
            found.update(self.db.execute(f"SELECT key, digest FROM entries WHERE key IN ({marks})", part))
        return found

    def record(self, rows: list[tuple[str, str, str, tuple]], build_id: int) -> None:
        """Record computed tensors: (key, digest, dtype, shape)."""
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO entries VALUES(?,?,?,?,?)",
                [(k, d, dt, json.dumps(list(s)), build_id) for k, d, dt, s in rows],
            )

    def touch(self, keys: list[str], build_id: int) -> None:
        with self.transaction():
            for i in range(0, len(keys), BATCH):
                part = keys[i : i + BATCH]
                marks = ",".join("?" * len(part))
                self.db.execute(f"UPDATE entries SET last_build=? WHERE key IN ({marks})", [build_id, *part])

    def forget(self, key: str) -> None:
        self.db.execute("DELETE FROM entries WHERE key=?", (key,))

    def blob_infos(self):
        """(digest, dtype, shape) of every blob the index knows of."""
        for digest, dtype, shape in self.db.execute("SELECT DISTINCT digest, dtype, shape FROM entries"):
            yield digest, dtype, tuple(json.loads(shape))

    # locations in packs -------------------------------------------------------------------
    def locations(self) -> dict[str, tuple[str, int]]:
        return {d: (p, o) for d, p, o in self.db.execute("SELECT digest, pack, offset FROM locations")}

    def save_locations(self, rows: list[tuple[str, str, int]]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO locations VALUES(?,?,?)", rows)

    def forget_locations(self, digests: list[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM locations WHERE digest=?", [(d,) for d in digests])

    # builds and gc ------------------------------------------------------------------------
    def start_build(self, mergefile: str) -> int:
        cur = self.db.execute("INSERT INTO builds(started, mergefile) VALUES(?,?)", (time.time(), mergefile))
        return cur.lastrowid

    def recent_builds(self, n: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM builds ORDER BY id DESC LIMIT ?", (n,))]

    def drop_entries_except(self, keep_keys: set[str], min_build: int) -> int:
        """Delete entries not in keep_keys and last used before min_build; returns how many."""
        doomed = [
            k
            for (k, b) in self.db.execute("SELECT key, last_build FROM entries")
            if b < min_build and k not in keep_keys
        ]
        with self.transaction():
            self.db.executemany("DELETE FROM entries WHERE key=?", [(k,) for k in doomed])
        return len(doomed)

    def referenced_digests(self) -> set[str]:
        refs = {d for (d,) in self.db.execute("SELECT DISTINCT digest FROM entries")}
        for (tensors,) in self.db.execute("SELECT tensors FROM fingerprints"):
            refs.update(t[2] for t in json.loads(tensors).values())
        return refs

    def counts(self) -> dict[str, int]:
        one = lambda q: self.db.execute(q).fetchone()[0]  # noqa: E731
        return {
            "entries": one("SELECT COUNT(*) FROM entries"),
            "builds": one("SELECT COUNT(*) FROM builds"),
            "fingerprints": one("SELECT COUNT(*) FROM fingerprints"),
        }

    # fingerprints -------------------------------------------------------------------------
    def fingerprint(self, path: str, stat) -> tuple[dict, str | None] | None:
        row = self.db.execute(
            "SELECT tensors, sha256 FROM fingerprints WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
            (path, stat.st_size, stat.st_mtime_ns, stat.st_ino),
        ).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), row[1]

    def save_fingerprint(self, path: str, stat, tensors: dict, sha256: str | None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO fingerprints VALUES(?,?,?,?,?,?)",
            (path, stat.st_size, stat.st_mtime_ns, stat.st_ino, json.dumps(tensors), sha256),
        )

    def save_sha256(self, path: str, stat, sha256: str) -> None:
        self.db.execute(
            "UPDATE fingerprints SET sha256=? WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
            (sha256, path, stat.st_size, stat.st_mtime_ns, stat.st_ino),
        )

    # outputs ------------------------------------------------------------------------------
    def output_digest(self, path: str, stat) -> str | None:
        row = self.db.execute(
            "SELECT digest FROM outputs WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
            (path, stat.st_size, stat.st_mtime_ns, stat.st_ino),
        ).fetchone()
        return row[0] if row else None

    def save_output(self, path: str, stat, digest: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO outputs VALUES(?,?,?,?,?)",
            (path, digest, stat.st_size, stat.st_mtime_ns, stat.st_ino),
        )

    # recipes ------------------------------------------------------------------------------
    def last_recipe(self, mergefile: str, merge: str) -> dict | None:
        row = self.db.execute("SELECT recipe FROM recipes WHERE mergefile=? AND merge=?", (mergefile, merge)).fetchone()
        return json.loads(row[0]) if row else None

    def save_recipe(self, mergefile: str, merge: str, recipe: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO recipes VALUES(?,?,?)", (mergefile, merge, json.dumps(recipe)))


class _Rows(list):
    """A statement's rows, read while the lock was held."""

    lastrowid: int | None = None

    def fetchone(self):
        return self[0] if self else None


class _Serialized:
    """One SQLite connection shared by the build's threads (a reader thread that heals a bad
    blob writes to the index too): every statement runs under one lock and its rows are read
    before the lock is released; a transaction holds the lock throughout."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.lock = threading.RLock()

    def execute(self, sql: str, params=()) -> _Rows:
        with self.lock:
            cursor = self._db.execute(sql, params)
            rows = _Rows(cursor.fetchall())
            rows.lastrowid = cursor.lastrowid
            return rows

    def executemany(self, sql: str, rows) -> None:
        with self.lock:
            self._db.executemany(sql, rows)

    def executescript(self, script: str) -> None:
        with self.lock:
            self._db.executescript(script)

    def close(self) -> None:
        with self.lock:
            self._db.close()


class _Transaction:
    def __init__(self, db: _Serialized):
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
