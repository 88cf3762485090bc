"""The per-user fingerprint store (store/fingerprints.py): keyed by the file's identity, safe when
files change in place, when several processes write it, and when it cannot be used at all."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mergebuild.portable import file_identity, file_stamp, user_cache_dir
from mergebuild.store import fingerprints
from mergebuild.store.fingerprints import FingerprintStore, identity, user_store
from tests.conftest import ROOT

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)


def test_home_follows_mergebuild_home_else_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBUILD_HOME", str(tmp_path / "h"))
    assert fingerprints.home() == tmp_path / "h"
    assert user_store().path == tmp_path / "h" / "fingerprints.sqlite"
    monkeypatch.delenv("MERGEBUILD_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    where = fingerprints.home()
    assert where.name == "mergebuild" and where.is_relative_to(tmp_path)  # never the real home in a test
    if sys.platform not in ("win32", "darwin"):
        assert where == tmp_path / "xdg" / "mergebuild"
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: ignore a relative one
        assert user_cache_dir("mergebuild") == tmp_path / "user" / ".cache" / "mergebuild"


def test_a_row_is_found_only_for_the_same_file_in_the_same_state(tmp_path):
    store = FingerprintStore(tmp_path)
    key = (1, 2, 100, 10, 20)
    store.save_tensors(key, {"w": ["F16", [2], "d" * 32]}, "content")
    store.save_sha256(key, "a" * 64)
    known = store.lookup(key)
    assert known.tensors == {"w": ["F16", [2], "d" * 32]} and known.content == "content"
    assert known.sha256 == "a" * 64 and known.addnet is None
    for other in [(1, 2, 100, 10, 21), (1, 2, 100, 11, 20), (1, 2, 101, 10, 20), (1, 3, 100, 10, 20), (9, 2, 100, 10, 20)]:
        assert store.lookup(other) is None, other  # another ctime, mtime, size, inode or device
    store.save_sha256((1, 2, 100, 10, 21), "b" * 64)  # the same file id in a new state replaces the row
    assert store.lookup(key) is None
    assert store.lookup((1, 2, 100, 10, 21)) == fingerprints.Known(None, None, "b" * 64, None)


def test_a_file_system_without_file_ids_is_not_trusted(tmp_path):
    store = FingerprintStore(tmp_path)
    store.save_sha256((1, 0, 100, 10, 20), "a" * 64)  # inode 0: every file of such a share has it
    assert store.lookup((1, 0, 100, 10, 20)) is None


def test_identity_only_for_the_stamp_the_file_still_has(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"12345678")
    st = file_stamp(f)
    assert identity(f, st) == file_identity(f) and identity(f, st)[1:] == (st[3], st[0], st[1], st[2])
    assert identity(f, (st[0] + 1, *st[1:])) is None
    assert identity(tmp_path / "gone", st) is None


def test_rewritten_in_place_with_size_and_mtime_put_back_is_a_miss(tmp_path):
    import time

    f = tmp_path / "m.bin"
    f.write_bytes(b"a" * 64)
    before = file_identity(f)
    user_store().save_sha256(before, "0" * 64)
    time.sleep(0.05)  # the change time's clock ticks coarsely on some file systems
    with open(f, "r+b") as g:  # same size, other bytes, mtime restored: only the ctime tells
        g.write(b"b" * 64)
    os.utime(f, ns=(before[3], before[3]))
    now = file_identity(f)
    assert now[:4] == before[:4] and now[4] != before[4]
    assert user_store().lookup(now) is None


def test_several_processes_write_at_once(tmp_path):
    script = (
        "import sys; from mergebuild.store.fingerprints import FingerprintStore\n"
        "s = FingerprintStore(sys.argv[1]); w = int(sys.argv[2])\n"
        "for i in range(150):\n"
        "    s.save_tensors((w, i + 1, 1, 2, 3), {'t': ['F16', [1], str(i)]}, 'c%d' % i)\n"
        "    s.save_sha256((w, i + 1, 1, 2, 3), '%064x' % i)\n"
        "    assert s.lookup((1 - w, i // 2 + 1, 1, 2, 3)) is None or s.lookup((1 - w, i // 2 + 1, 1, 2, 3)).content\n"
        "assert s.problem is None, s.problem\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(w)], env=env) for w in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = FingerprintStore(tmp_path)
    for w in (0, 1):
        for i in range(150):
            known = store.lookup((w, i + 1, 1, 2, 3))
            assert known.sha256 == "%064x" % i and known.tensors == {"t": ["F16", [1], str(i)]}


def test_a_database_busy_at_once_is_waited_for_not_turned_off(tmp_path, monkeypatch):
    """SQLite answers some contention with "database is locked" at once, past its busy timeout
    (a store being converted to WAL by another process): the opening and the statements try
    again, so 12 such answers in a row, from the very first statement, cost a wait, not the store."""
    import sqlite3

    from mergebuild.store import fingerprints

    class Contended:
        def __init__(self, db):
            self.db, self.busy_left = db, 12

        def execute(self, *args):
            if self.busy_left:
                self.busy_left -= 1
                raise sqlite3.OperationalError("database is locked")
            return self.db.execute(*args)

        def __getattr__(self, name):
            return getattr(self.db, name)

    connect = sqlite3.connect
    made = []
    monkeypatch.setattr(fingerprints.sqlite3, "connect", lambda *a, **k: made.append(Contended(connect(*a, **k))) or made[-1])
    store = FingerprintStore(tmp_path)
    store.save_sha256((1, 2, 3, 4, 5), "a" * 64)
    assert store.problem is None and made[0].busy_left == 0
    made[0].busy_left = 12
    assert store.lookup((1, 2, 3, 4, 5)).sha256 == "a" * 64 and store.problem is None
    monkeypatch.setattr(fingerprints, "BUSY_WAIT", 0.3)  # a database that stays locked: given up, not hung on
    made[0].busy_left = 10**9
    store.save_sha256((1, 2, 3, 4, 6), "b" * 64)
    assert store.problem == "database is locked" and "hashed as if it were empty" in store.take_warning()


def test_unusable_store_warns_once_and_does_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = FingerprintStore(blocker)  # MERGEBUILD_HOME naming a file: nothing can be created there
    assert store.lookup((1, 2, 3, 4, 5)) is None
    store.save_sha256((1, 2, 3, 4, 5), "a" * 64)
    warning = store.take_warning()
    assert warning is not None and str(blocker) in warning and "hashed as if it were empty" in warning
    assert store.take_warning() is None  # once


def test_corrupt_store_warns_and_a_damaged_row_is_a_miss(tmp_path):
    (tmp_path / "fingerprints.sqlite").write_bytes(b"garbage " * 512)
    store = FingerprintStore(tmp_path)
    assert store.lookup((1, 2, 3, 4, 5)) is None and store.take_warning() is not None
    good = FingerprintStore(tmp_path / "ok")
    good.save_tensors((1, 2, 3, 4, 5), {"t": ["F16", [1], "x"]}, "c")
    db = sqlite3.connect(good.path)
    db.execute("UPDATE files SET tensors='{not json'")
    db.commit()
    db.close()
    assert good.lookup((1, 2, 3, 4, 5)).tensors is None and good.problem is None


def test_an_older_store_version_starts_afresh(tmp_path):
    store = FingerprintStore(tmp_path)
    store.save_sha256((1, 2, 3, 4, 5), "a" * 64)
    store.close()
    db = sqlite3.connect(tmp_path / "fingerprints.sqlite")
    db.execute(f"PRAGMA user_version={fingerprints.VERSION + 1}")
    db.close()
    assert FingerprintStore(tmp_path).lookup((1, 2, 3, 4, 5)) is None


def test_tests_never_use_the_real_home():
    home = Path(os.environ["MERGEBUILD_HOME"])
    assert home != user_cache_dir("mergebuild") and "mb-home" in home.name


def test_a_second_opener_that_saw_the_old_version_keeps_the_first_ones_rows(tmp_path):
    """Two processes open a new store at once: both read version 0, the first makes the table
    and writes a row, then the second starts over. Its start-over checks the version again
    under the write lock, so the row stays."""
    first = FingerprintStore(tmp_path)
    first.save_sha256((1, 1, 1, 2, 3), "%064x" % 7)
    late = sqlite3.connect(tmp_path / "fingerprints.sqlite", isolation_level=None)
    fingerprints._start_over(late)  # what the second opener runs after its stale look at the version
    late.close()
    assert FingerprintStore(tmp_path).lookup((1, 1, 1, 2, 3)).sha256 == "%064x" % 7
    old = sqlite3.connect(tmp_path / "fingerprints.sqlite", isolation_level=None)
    old.execute("PRAGMA user_version=0")  # a store of another version is still started over
    fingerprints._start_over(old)
    old.close()
    assert FingerprintStore(tmp_path).lookup((1, 1, 1, 2, 3)) is None
