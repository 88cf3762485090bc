"""The blob store verifies what it reads; the index remembers fingerprints and entries."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys

from mergebuild.portable import FileLock, file_stamp
from mergebuild.store.blobs import BlobStore
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import tensor_digest
from tests.conftest import ROOT, SIM

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)


def test_blob_round_trip_and_corruption_detected(tmp_path):
    store = BlobStore(tmp_path, "tok")
    store.tmp.mkdir(parents=True)
    data = bytes(range(16))
    digest = tensor_digest("F32", (4,), data)
    assert store.put(digest, data) > 0  # bytes it takes on disk
    assert bytes(store.get(digest, "F32", (4,), 16)) == data
    assert tensor_digest("F32", (2, 2), data) != digest  # same bytes, other shape: another digest
    assert store.put(digest, data) == 0  # already there
    path = store.path(digest)
    path.write_bytes(b"\xff" + data[1:])
    assert store.get(digest, "F32", (4,), 16) is None
    assert not path.exists()  # a bad blob is removed, so it is recomputed


def test_a_truncated_blob_is_a_miss_not_a_crash(tmp_path):
    store = BlobStore(tmp_path, "tok")
    store.tmp.mkdir(parents=True)
    data = bytes(range(64))
    digest = tensor_digest("U8", (64,), data)
    store.put(digest, data)
    store.path(digest).write_bytes(data[:10])
    assert store.get(digest, "U8", (64,), 64) is None


def test_digest_covers_dtype_shape_and_bytes():
    data = bytes(8)
    digests = {tensor_digest("F32", (2,), data), tensor_digest("I32", (2,), data), tensor_digest("F32", (1, 2), data),
               tensor_digest("F32", (2,), bytes(7) + b"\x01")}
    assert len(digests) == 4


def test_stale_tmp_is_judged_by_its_process_lock_not_its_pid(tmp_path):
    """A temp whose process holds its .alive lock stays; one whose lock is free goes, even when
    its PID is alive (reused): here the "dead" temp carries this very process's PID."""
    store = BlobStore(tmp_path, "mine")
    store.tmp.mkdir(parents=True)
    alive = FileLock(store.tmp / "other.alive")
    alive.acquire()
    held = store.tmp / "abc.other.x"
    dead = store.tmp / f"abc.{os.getpid()}-dead.x"
    mine = store.tmp / "abc.mine.x"
    for p in (held, dead, mine):
        p.write_bytes(b"1")
    store.clear_stale_tmp()
    assert held.exists() and mine.exists() and not dead.exists()
    alive.release()
    store.clear_stale_tmp()
    assert not held.exists()


def test_index_fingerprints_follow_the_stamp(tmp_path):
    cache = Cache(tmp_path / "cache")
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc")
    st = file_stamp(f)
    cache.index.save_fingerprint(str(f), st, {"t": ["F32", [1], "d1"]}, "c1", None)
    assert cache.index.fingerprint(str(f), st) == ({"t": ["F32", [1], "d1"]}, "c1", None)
    cache.index.save_sha256(str(f), st, "s" * 64)
    assert cache.index.fingerprint(str(f), st)[2] == "s" * 64
    mtime = f.stat().st_mtime_ns
    f.write_bytes(b"abd")  # same size, mtime put back: only the ctime tells
    os.utime(f, ns=(mtime, mtime))
    assert cache.index.fingerprint(str(f), file_stamp(f)) is None


def test_index_entries_and_gc_selection(tmp_path):
    cache = Cache(tmp_path / "cache")
    b1 = cache.index.start_build("mf", None)
    cache.index.record([("k1", "d1", "F32", (1,)), ("k2", "d2", "F32", (1,))], b1)
    b2 = cache.index.start_build("mf", None)
    cache.index.touch(["k2"], [], b2)
    assert cache.index.lookup(["k1", "k2", "k3"]) == {"k1": "d1", "k2": "d2"}
    assert cache.index.drop_entries_older_than(b2, protected=set()) == ["d1"]
    assert cache.index.lookup(["k1", "k2"]) == {"k2": "d2"}


def test_a_second_process_waits_and_says_for_whom(tmp_path):
    cache = Cache(tmp_path / "cache")
    code = ("import sys; from mergebuild.store.cache import Cache; c = Cache(sys.argv[1]); seen = []\n"
            "try:\n"
            "    with c.exclusive(timeout=0.5, on_wait=seen.append): print('got it')\n"
            "except Exception as e: print(seen, e)\n")
    with cache.exclusive():
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SIM)])}).stdout
    assert f"build PID {os.getpid()}" in out and "still holds the cache after 0.5 s" in out
