"""The blob store verifies what it reads; the index remembers fingerprints and entries."""

from __future__ import annotations

import os

from mergebuild.store.blobs import BlobStore
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import tensor_digest


def test_blob_round_trip_and_corruption_detected(tmp_path):
    store = BlobStore(tmp_path)
    data = bytes(range(16))
    digest = tensor_digest("F32", (4,), data)
    store.put(digest, data)
    assert store.get(digest, "F32", (4,), 16) == bytearray(data)
    assert tensor_digest("F32", (2, 2), data) != digest  # same bytes, other shape: another digest
    store.put(digest, data)
    path = store.path(digest)
    path.write_bytes(b"\xff" + data[1:])
    assert store.get(digest, "F32", (4,), 16) is None
    assert not path.exists()  # a bad blob is removed, so it is recomputed


def test_digest_covers_dtype_shape_and_bytes():
    data = bytes(8)
    digests = {tensor_digest("F32", (2,), data), tensor_digest("I32", (2,), data), tensor_digest("F32", (1, 2), data),
               tensor_digest("F32", (2,), bytes(7) + b"\x01")}
    assert len(digests) == 4


def test_stale_tmp_of_dead_process_is_cleared(tmp_path):
    store = BlobStore(tmp_path)
    store.tmp.mkdir(parents=True)
    dead = store.tmp / "abc.999999999.x"
    mine = store.tmp / f"abc.{os.getpid()}.x"
    dead.write_bytes(b"1")
    mine.write_bytes(b"1")
    store.clear_stale_tmp()
    assert not dead.exists() and mine.exists()


def test_index_fingerprints_follow_stat(tmp_path):
    cache = Cache(tmp_path / "cache")
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc")
    stat = f.stat()
    cache.index.save_fingerprint(str(f), stat, {"t": ["F32", [1], "d1"]}, None)
    assert cache.index.fingerprint(str(f), stat) == ({"t": ["F32", [1], "d1"]}, None)
    cache.index.save_sha256(str(f), stat, "s" * 64)
    assert cache.index.fingerprint(str(f), stat)[1] == "s" * 64
    f.write_bytes(b"abcd")
    assert cache.index.fingerprint(str(f), f.stat()) is None


def test_index_entries_and_gc_selection(tmp_path):
    cache = Cache(tmp_path / "cache")
    b1 = cache.index.start_build("mf")
    cache.index.record([("k1", "d1", "F32", (1,)), ("k2", "d2", "F32", (1,))], b1)
    b2 = cache.index.start_build("mf")
    cache.index.touch(["k2"], b2)
    assert cache.index.lookup(["k1", "k2", "k3"]) == {"k1": "d1", "k2": "d2"}
    assert cache.index.drop_entries_except(set(), min_build=b2) == 1
    assert cache.index.lookup(["k1", "k2"]) == {"k2": "d2"}
