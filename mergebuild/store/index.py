"""The cache index: SQLite in WAL mode, safe for several mergebuild processes at once.

Tables:
- entries: cache key of a merged tensor -> digest of its result (plus dtype and shape, so its
  bytes can be verified without their producer) and the last build that used it;
- blobs: the tensors stored as files of their own in objects/, with the bytes each takes on
  disk, its kind (merge result, imported legacy source, salvaged) and the last build that used
  it: what the cache limit counts and evicts least-recently-used first;
- fingerprints: a source file's stamp (size, mtime_ns, ctime_ns, inode) -> its tensors' digests,
  its content identity and sha256, so an unchanged file is never hashed twice;
- files: the stamp of each file that holds located tensors (an output, a folder's shard, a pack
  of tensors salvaged from an interrupted build). A location is used only while its file still
  has that stamp: an output the user moved, edited or deleted is simply not used;
- locations: digest -> (file, offset) for tensors stored inside such files;
- outputs: what each output holds (its identity), the day it was built, the file whose stamp
  stands for it; output_hashes: an output file's stamp -> its sha256 (what the lineage of the
  merges made from it names it by, A1111's and Civitai's hash), so it is hashed once;
- builds: one row per build; mergefiles: every Mergefile that used the cache, with its
  cache_limit; live: per Mergefile and merge, the digests its last build needed (protected
  from eviction while that Mergefile exists);
- recipes / recipe_nodes: per Mergefile and merge, the identities of every node its last build
  was made from, and those nodes by identity (what -v and explain diff against);
- plan_summaries: a complete merge's plan (recipe node, identity, task table) under the hash
  of what planning it depends on, so an unchanged merge is not planned again (planning/shortcut.py);
- stats: per cache key, how far the result moved from each input (execute/stats.py);
  merge_runs: per Mergefile and merge, its last build (counts, seconds, statistics by block):
  what `mergebuild report` shows without reading a model.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from mergebuild.errors import MergebuildError
from mergebuild.store.sqlite import Serialized, Transaction, connect

SCHEMA_VERSION = "2"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(key TEXT PRIMARY KEY, digest TEXT NOT NULL, dtype TEXT NOT NULL,
    shape TEXT NOT NULL, last_build INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_digest ON entries(digest);
CREATE TABLE IF NOT EXISTS blobs(digest TEXT PRIMARY KEY, disk INTEGER NOT NULL, kind TEXT NOT NULL,
    last_build INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints(path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, tensors TEXT NOT NULL, content TEXT NOT NULL, sha256 TEXT);
CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, kind TEXT NOT NULL, owner TEXT);
CREATE TABLE IF NOT EXISTS locations(digest TEXT NOT NULL, path TEXT NOT NULL, offset INTEGER NOT NULL,
    PRIMARY KEY(digest, path));
CREATE INDEX IF NOT EXISTS locations_path ON locations(path);
CREATE TABLE IF NOT EXISTS outputs(path TEXT PRIMARY KEY, identity TEXT NOT NULL, date TEXT NOT NULL,
    marker TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS output_hashes(path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS builds(id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL,
    mergefile TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mergefiles(path TEXT PRIMARY KEY, last_build INTEGER NOT NULL, cache_limit INTEGER);
CREATE TABLE IF NOT EXISTS live(mergefile TEXT NOT NULL, merge TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY(mergefile, merge, digest));
CREATE INDEX IF NOT EXISTS live_digest ON live(digest);
CREATE TABLE IF NOT EXISTS recipes(mergefile TEXT NOT NULL, merge TEXT NOT NULL, closure TEXT NOT NULL,
    PRIMARY KEY(mergefile, merge));
CREATE TABLE IF NOT EXISTS recipe_nodes(identity TEXT PRIMARY KEY, node TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats(key TEXT PRIMARY KEY, stats TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS merge_runs(mergefile TEXT NOT NULL, merge TEXT NOT NULL, build INTEGER NOT NULL,
    finished REAL NOT NULL, run TEXT NOT NULL, PRIMARY KEY(mergefile, merge));
CREATE TABLE IF NOT EXISTS plan_summaries(key TEXT PRIMARY KEY, merge TEXT NOT NULL, identity TEXT NOT NULL,
    meta TEXT NOT NULL, tasks BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS plan_summaries_merge ON plan_summaries(merge);
"""
# The blobs' bytes by kind, kept by SQLite as rows come and go (whichever mergebuild writes
# them), so a build's size check reads a few rows, not every blob (a chain of 50 merges over
# SDXL's 2531 keys has 123k: that scan took 57 ms of each no-op build, and grows with merges).
# Filled once from the blobs of an index made before them.
TOTALS = (
    "CREATE TABLE IF NOT EXISTS blob_totals(kind TEXT PRIMARY KEY, disk INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS blobs_added AFTER INSERT ON blobs BEGIN INSERT INTO blob_totals "
    "VALUES(NEW.kind, NEW.disk) ON CONFLICT(kind) DO UPDATE SET disk = disk + excluded.disk; END",
    "CREATE TRIGGER IF NOT EXISTS blobs_removed AFTER DELETE ON blobs BEGIN UPDATE blob_totals "
    "SET disk = disk - OLD.disk WHERE kind = OLD.kind; END",
    "CREATE TRIGGER IF NOT EXISTS blobs_changed AFTER UPDATE OF disk, kind ON blobs BEGIN UPDATE blob_totals "
    "SET disk = disk - OLD.disk WHERE kind = OLD.kind; INSERT INTO blob_totals VALUES(NEW.kind, NEW.disk) "
    "ON CONFLICT(kind) DO UPDATE SET disk = disk + excluded.disk; END",
)
TOTALS_NAMES = ("blob_totals", "blobs_added", "blobs_removed", "blobs_changed")
BATCH = 500


def _stamp_row(stamp) -> tuple:
    size, mtime, ctime, inode = stamp
    return size, mtime, ctime, inode


class Index:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.db = Serialized(connect(self.path, readonly), self.path)
        if readonly:
            version = self._schema_version()
            if version is not None and version != SCHEMA_VERSION:
                raise MergebuildError(f"{self.path}: cache index version {version}, expected {SCHEMA_VERSION}; "
                                      "run a build to start a new index")
            return
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        version = self._schema_version()
        if version is not None and version != SCHEMA_VERSION:
            self.reset_from_old = version
            self._drop_all()
        else:
            self.reset_from_old = None
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (SCHEMA_VERSION,))
        self._keep_totals()

    def _keep_totals(self) -> None:
        """blob_totals and its triggers (TOTALS), made and filled from the blobs where missing."""
        def present() -> int:
            names = ",".join("?" * len(TOTALS_NAMES))
            return self.db.execute(f"SELECT COUNT(*) FROM sqlite_master WHERE name IN ({names})",
                                   TOTALS_NAMES).fetchone()[0]

        if present() == len(TOTALS_NAMES):
            return
        with self.transaction():  # another process may be doing the same: one of them does it
            if present() == len(TOTALS_NAMES):
                return
            for statement in TOTALS:
                self.db.execute(statement)
            self.db.execute("DELETE FROM blob_totals")
            self.db.execute("INSERT INTO blob_totals SELECT kind, SUM(disk) FROM blobs GROUP BY kind")

    def _schema_version(self) -> str | None:
        try:
            row = self.db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        except sqlite3.OperationalError:
            return None  # a new, empty database
        return row[0] if row else None

    def _drop_all(self) -> None:
        """An index an older mergebuild wrote: its keys mean other things now. Start afresh (the
        blobs stay until eviction; the next build recomputes what it needs)."""
        tables = [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                                "AND name NOT LIKE 'sqlite_%'")]
        with self.transaction():
            for table in tables:
                self.db.execute(f'DROP TABLE IF EXISTS "{table}"')

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        return Transaction(self.db)

    def _many(self, sql: str, rows) -> None:
        if self.readonly:
            return
        with self.transaction():
            self.db.executemany(sql, rows)

    def _select_in(self, sql: str, values: list) -> list:
        """Rows of `sql` (with one `IN ({})` placeholder) for values, in batches."""
        rows = []
        for i in range(0, len(values), BATCH):
            part = values[i : i + BATCH]
            rows += self.db.execute(sql.format(",".join("?" * len(part))), part)
        return rows

    # entries ------------------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> dict[str, str]:
        """The digests of those keys that have an entry."""
        return dict(self._select_in("SELECT key, digest FROM entries WHERE key IN ({})", keys))

    def record(self, rows: list[tuple[str, str, str, tuple]], build_id: int) -> None:
        """Record computed tensors: (key, digest, dtype, shape). Call only once their bytes are
        stored (a blob, or a committed file's location)."""
        self._many("INSERT OR REPLACE INTO entries VALUES(?,?,?,?,?)",
                   [(k, d, dt, json.dumps(list(s)), build_id) for k, d, dt, s in rows])

    def touch(self, keys: list[str], digests: list[str], build_id: int) -> None:
        """Mark entries and blobs as used by this build (least recently used go first)."""
        if self.readonly:
            return
        with self.transaction():
            for i in range(0, len(keys), BATCH):
                part = keys[i : i + BATCH]
                self.db.execute(f"UPDATE entries SET last_build=? WHERE key IN ({','.join('?' * len(part))})",
                                [build_id, *part])
            for i in range(0, len(digests), BATCH):
                part = digests[i : i + BATCH]
                self.db.execute(f"UPDATE blobs SET last_build=? WHERE digest IN ({','.join('?' * len(part))})",
                                [build_id, *part])

    def entry_infos(self):
        """(digest, dtype, shape) of every distinct result the index knows of."""
        for digest, dtype, shape in self.db.execute("SELECT DISTINCT digest, dtype, shape FROM entries"):
            yield digest, dtype, tuple(json.loads(shape))

    def shapes_of(self, digests: list[str]) -> dict[str, tuple[str, tuple]]:
        """digest -> (dtype, shape), from the entries that produced them."""
        rows = self._select_in("SELECT digest, dtype, shape FROM entries WHERE digest IN ({})", digests)
        return {d: (dt, tuple(json.loads(sh))) for d, dt, sh in rows}

    def forget_entries_of(self, digests: list[str]) -> int:
        if not digests or self.readonly:
            return 0
        with self.transaction():
            before = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            self.db.executemany("DELETE FROM entries WHERE digest=?", [(d,) for d in digests])
            return before - self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def drop_entries_older_than(self, min_build: int, protected: set[str]) -> list[str]:
        """Delete entries last used before min_build whose digest is not protected; their digests."""
        doomed = [(k, d) for k, d, b in self.db.execute("SELECT key, digest, last_build FROM entries")
                  if b < min_build and d not in protected]
        self._many("DELETE FROM entries WHERE key=?", [(k,) for k, _ in doomed])
        return [d for _, d in doomed]

    # blobs --------------------------------------------------------------------------------
    def save_blobs(self, rows: list[tuple[str, int, str]], build_id: int) -> None:
        """(digest, bytes on disk, kind) of blobs just stored."""
        self._many("INSERT INTO blobs VALUES(?,?,?,?) ON CONFLICT(digest) DO UPDATE SET last_build=excluded.last_build",
                   [(d, disk, kind, build_id) for d, disk, kind in rows])

    def blob_rows(self) -> list[tuple[str, int, str, int]]:
        """(digest, disk, kind, last_build) of every blob, least recently used first."""
        return list(self.db.execute("SELECT digest, disk, kind, last_build FROM blobs ORDER BY last_build, digest"))

    def forget_blobs(self, digests: list[str]) -> None:
        self._many("DELETE FROM blobs WHERE digest=?", [(d,) for d in digests])

    def blob_bytes(self) -> dict[str, int]:
        """Bytes on disk of the blobs, by kind."""
        try:
            return dict(self.db.execute("SELECT kind, disk FROM blob_totals"))
        except sqlite3.OperationalError:  # opened read-only, made before blob_totals: count them
            return dict(self.db.execute("SELECT kind, SUM(disk) FROM blobs GROUP BY kind"))

    # located tensors (outputs, shards, packs) --------------------------------------------
    def save_file(self, path: str, stamp, kind: str, owner: str | None, rows: list[tuple[str, int]]) -> None:
        """A file that holds tensors: its stamp and (digest, offset) of each; replaces what was
        recorded for that path before."""
        if self.readonly:
            return
        with self.transaction():
            self.db.execute("DELETE FROM locations WHERE path=?", (path,))
            self.db.execute("INSERT OR REPLACE INTO files VALUES(?,?,?,?,?,?,?)", (path, *_stamp_row(stamp), kind, owner))
            self.db.executemany("INSERT OR REPLACE INTO locations VALUES(?,?,?)", [(d, path, o) for d, o in rows])

    def forget_file(self, path: str) -> None:
        if self.readonly:
            return
        with self.transaction():
            self.db.execute("DELETE FROM locations WHERE path=?", (path,))
            self.db.execute("DELETE FROM files WHERE path=?", (path,))

    def files(self, kind: str | None = None) -> dict[str, tuple]:
        """path -> (stamp, kind, owner) of recorded files."""
        rows = self.db.execute("SELECT path, size, mtime_ns, ctime_ns, inode, kind, owner FROM files")
        return {p: ((s, m, c, i), k, o) for p, s, m, c, i, k, o in rows if kind is None or k == kind}

    def locations_of(self, digests: list[str]) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for d, p, o in self._select_in("SELECT digest, path, offset FROM locations WHERE digest IN ({})", digests):
            out.setdefault(d, []).append((p, o))
        return out

    def located_digests(self, path: str) -> list[str]:
        return [d for (d,) in self.db.execute("SELECT digest FROM locations WHERE path=?", (path,))]

    def located_in(self, path: str) -> list[tuple[str, int]]:
        return list(self.db.execute("SELECT digest, offset FROM locations WHERE path=?", (path,)))

    def location_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM locations").fetchone()[0]

    # outputs ------------------------------------------------------------------------------
    def output(self, path: str) -> tuple[str, str, str] | None:
        """(identity, date, marker) recorded for an output path."""
        row = self.db.execute("SELECT identity, date, marker FROM outputs WHERE path=?", (path,)).fetchone()
        return tuple(row) if row else None

    def save_output(self, path: str, identity: str, date: str, marker: str) -> None:
        if not self.readonly:
            self.db.execute("INSERT OR REPLACE INTO outputs VALUES(?,?,?,?)", (path, identity, date, marker))

    def output_sha256(self, path: str, stamp) -> str | None:
        """The sha256 recorded for an output file in this state (None: not known)."""
        try:
            row = self.db.execute("SELECT sha256 FROM output_hashes WHERE path=? AND size=? AND mtime_ns=? "
                                  "AND ctime_ns=? AND inode=?", (path, *_stamp_row(stamp))).fetchone()
        except sqlite3.OperationalError:  # a read-only index from before the table
            return None
        return row[0] if row else None

    def save_output_sha256(self, path: str, stamp, sha256: str) -> None:
        if not self.readonly:
            self.db.execute("INSERT OR REPLACE INTO output_hashes VALUES(?,?,?,?,?,?)",
                            (path, *_stamp_row(stamp), sha256))

    def forget_output(self, path: str) -> None:
        if not self.readonly:
            self.db.execute("DELETE FROM outputs WHERE path=?", (path,))

    # builds, Mergefiles, what they need ---------------------------------------------------
    def start_build(self, mergefile: str, cache_limit: int | None) -> int:
        cur = self.db.execute("INSERT INTO builds(started, mergefile) VALUES(?,?)", (time.time(), mergefile))
        self.db.execute("INSERT OR REPLACE INTO mergefiles VALUES(?,?,?)", (mergefile, cur.lastrowid, cache_limit))
        return cur.lastrowid

    def recent_builds(self, n: int) -> list[int]:
        if n <= 0:
            return []
        return [r[0] for r in self.db.execute("SELECT id FROM builds ORDER BY id DESC LIMIT ?", (n,))]

    def mergefiles(self) -> dict[str, int | None]:
        """Every Mergefile that built with this cache -> its cache_limit (None: the default)."""
        return dict(self.db.execute("SELECT path, cache_limit FROM mergefiles"))

    def forget_mergefile(self, path: str) -> None:
        if self.readonly:
            return
        with self.transaction():
            for table in ("mergefiles", "live"):
                column = "path" if table == "mergefiles" else "mergefile"
                self.db.execute(f"DELETE FROM {table} WHERE {column}=?", (path,))
            self.db.execute("DELETE FROM recipes WHERE mergefile=?", (path,))

    def save_live(self, mergefile: str, merge: str, digests: set[str], keep_merges: set[str]) -> None:
        """The digests `merge` of `mergefile` needs now; merges no longer in it need nothing."""
        if self.readonly:
            return
        with self.transaction():
            self.db.execute("DELETE FROM live WHERE mergefile=? AND merge=?", (mergefile, merge))
            self.db.executemany("INSERT OR IGNORE INTO live VALUES(?,?,?)", [(mergefile, merge, d) for d in digests])
            known = {m for (m,) in self.db.execute("SELECT DISTINCT merge FROM live WHERE mergefile=?", (mergefile,))}
            for gone in known - keep_merges:
                self.db.execute("DELETE FROM live WHERE mergefile=? AND merge=?", (mergefile, gone))

    def live_digests(self, mergefiles: list[str]) -> set[str]:
        return {d for (d,) in self._select_in("SELECT DISTINCT digest FROM live WHERE mergefile IN ({})", mergefiles)}

    def fingerprint_digests(self) -> set[str]:
        """Digests of imported legacy sources (their tensors live as blobs)."""
        refs: set[str] = set()
        for (tensors,) in self.db.execute("SELECT tensors FROM fingerprints"):
            refs.update(t[2] for t in json.loads(tensors).values())
        return refs

    def counts(self) -> dict[str, int]:
        one = lambda q: self.db.execute(q).fetchone()[0]  # noqa: E731
        return {
            "entries": one("SELECT COUNT(*) FROM entries"),
            "builds": one("SELECT COUNT(*) FROM builds"),
            "fingerprints": one("SELECT COUNT(*) FROM fingerprints"),
            "mergefiles": one("SELECT COUNT(*) FROM mergefiles"),
        }

    # fingerprints -------------------------------------------------------------------------
    def fingerprint(self, path: str, stamp) -> tuple[dict, str, str | None] | None:
        """(tensor table, content identity, sha256) recorded for this file in this state."""
        row = self.db.execute(
            "SELECT tensors, content, sha256 FROM fingerprints WHERE path=? AND size=? AND mtime_ns=? "
            "AND ctime_ns=? AND inode=?", (path, *_stamp_row(stamp))).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), row[1], row[2]

    def save_fingerprint(self, path: str, stamp, tensors: dict, content: str, sha256: str | None) -> None:
        if not self.readonly:
            self.db.execute("INSERT OR REPLACE INTO fingerprints VALUES(?,?,?,?,?,?,?,?)",
                            (path, *_stamp_row(stamp), json.dumps(tensors), content, sha256))

    def save_sha256(self, path: str, stamp, sha256: str) -> None:
        if not self.readonly:
            self.db.execute("UPDATE fingerprints SET sha256=? WHERE path=? AND size=? AND mtime_ns=? AND ctime_ns=? "
                            "AND inode=?", (sha256, path, *_stamp_row(stamp)))

    def fingerprint_bytes(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(LENGTH(tensors)), 0) FROM fingerprints").fetchone()[0]

    # statistics and runs, for the report --------------------------------------------------
    def save_stats(self, rows: list[tuple[str, dict]]) -> None:
        self._many("INSERT OR REPLACE INTO stats VALUES(?,?)", [(k, json.dumps(v)) for k, v in rows])

    def stats_of(self, keys: list[str]) -> dict[str, dict]:
        return {k: json.loads(v) for k, v in self._select_in("SELECT key, stats FROM stats WHERE key IN ({})", keys)}

    def save_run(self, mergefile: str, merge: str, build_id: int, run: dict) -> None:
        if not self.readonly:
            self.db.execute("INSERT OR REPLACE INTO merge_runs VALUES(?,?,?,?,?)",
                            (mergefile, merge, build_id, time.time(), json.dumps(run)))

    def runs(self, mergefile: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT merge, build, finished, run FROM merge_runs WHERE mergefile=?", (mergefile,))
        return {m: {**json.loads(r), "build": b, "finished": f} for m, b, f, r in rows}

    # recipes ------------------------------------------------------------------------------
    def last_closure(self, mergefile: str, merge: str) -> dict[str, str] | None:
        row = self.db.execute("SELECT closure FROM recipes WHERE mergefile=? AND merge=?", (mergefile, merge)).fetchone()
        return json.loads(row[0]) if row else None

    def recipe_nodes(self, identities: list[str]) -> dict[str, dict]:
        rows = self._select_in("SELECT identity, node FROM recipe_nodes WHERE identity IN ({})", identities)
        return {i: json.loads(n) for i, n in rows}

    def save_closure(self, mergefile: str, merge: str, closure: dict[str, str], nodes: dict[str, dict]) -> None:
        if self.readonly:
            return
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO recipes VALUES(?,?,?)", (mergefile, merge, json.dumps(closure)))
            self.db.executemany("INSERT OR IGNORE INTO recipe_nodes VALUES(?,?)",
                                [(i, json.dumps(n, sort_keys=True)) for i, n in nodes.items()])

    # plan summaries (planning/shortcut.py) -------------------------------------------------
    def plan_summary(self, key: str) -> tuple[str, str] | None:
        """(identity, meta) of the merge planned under this key, or None."""
        try:
            row = self.db.execute("SELECT identity, meta FROM plan_summaries WHERE key=?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a read-only index from before the table
            return None
        return tuple(row) if row else None

    def plan_summary_tasks(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT tasks FROM plan_summaries WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def save_plan_summary(self, key: str, merge: str, identity: str, meta: str, tasks: bytes, keep: int) -> None:
        """Remember a merge's plan; only the `keep` newest of each merge name stay."""
        if self.readonly:
            return
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO plan_summaries VALUES(?,?,?,?,?)", (key, merge, identity, meta, tasks))
            self.db.execute("DELETE FROM plan_summaries WHERE merge=? AND rowid NOT IN (SELECT rowid FROM "
                            "plan_summaries WHERE merge=? ORDER BY rowid DESC LIMIT ?)", (merge, merge, keep))

    def forget_plan_summaries(self) -> None:
        if not self.readonly:
            self.db.execute("DELETE FROM plan_summaries")
