"""The remote tier's rules on a shared folder (file://): verified reads, no entry without its
blob, harmless concurrent writers, entries that lie ignored, secrets redacted."""

from __future__ import annotations

import json
import threading

import pytest

from mergebuild.errors import BuildError
from mergebuild.store.hashing import tensor_digest
from mergebuild.store.remote import RemoteTier
from mergebuild.store.tiers import redact

pytest.importorskip("fsspec")
DTYPE, SHAPE = "F16", (4, 8)


def tensor(seed: int) -> tuple[str, bytes]:
    data = bytes((seed * 7 + i) % 251 for i in range(64))
    return tensor_digest(DTYPE, SHAPE, data), data


def tier(tmp_path, mode="readwrite") -> RemoteTier:
    t = RemoteTier(f"file://{tmp_path / 'remote'}", {}, mode)
    assert t.probe()
    return t


def test_a_blob_round_trips_verified_and_a_wrong_one_is_never_served_again(tmp_path):
    t = tier(tmp_path)
    digest, data = tensor(1)
    t.put_blob(digest, data)
    assert bytes(t.get(digest, DTYPE, SHAPE, len(data))) == data
    path = tmp_path / "remote" / "v1" / "blobs" / digest[:2] / digest
    path.write_bytes(data[:-1] + b"\x00")  # the remote lies
    calls = []
    original = t._read_many
    t._read_many = lambda p, limits: calls.append(p) or original(p, limits)
    assert t.get(digest, DTYPE, SHAPE, len(data)) is None
    assert t.get(digest, DTYPE, SHAPE, len(data)) is None
    assert len(calls) == 1 and t.stats.bad_blobs == 1  # known bad: not fetched again
    assert t.get(digest, DTYPE, (8, 4), len(data)) is None  # another shape is another tensor


def test_entries_that_lie_about_dtype_or_shape_or_are_malformed_are_misses(tmp_path):
    t = tier(tmp_path)
    digest, data = tensor(2)
    t.put_blob(digest, data)
    t.put_entry("a" * 32, digest, DTYPE, SHAPE)
    t.put_entry("b" * 32, digest, "F32", SHAPE)
    (tmp_path / "remote" / "v1" / "entries" / "cc").mkdir(parents=True)
    (tmp_path / "remote" / "v1" / "entries" / "cc" / ("c" * 32)).write_text("{not json")
    fresh = tier(tmp_path)
    found = fresh.lookup({"a" * 32: (DTYPE, SHAPE), "b" * 32: (DTYPE, SHAPE), "c" * 32: (DTYPE, SHAPE),
                          "d" * 32: (DTYPE, SHAPE)})
    assert found == {"a" * 32: digest}
    assert fresh.stats.remote_hits == 1 and fresh.stats.remote_misses == 3


def test_no_entry_is_written_when_its_blob_could_not_be(tmp_path):
    t = tier(tmp_path)
    digest, data = tensor(3)
    other, other_data = tensor(4)
    t.push([("e" * 32, digest, DTYPE, SHAPE), ("f" * 32, other, DTYPE, SHAPE)],
           lambda d, dt, sh: None if d == digest else other_data)  # the first one's bytes are gone
    t.finish()
    entries = {p.name for p in (tmp_path / "remote" / "v1" / "entries").rglob("*") if p.is_file()}
    assert entries == {"f" * 32}
    assert json.loads((tmp_path / "remote" / "v1" / "entries" / "ff" / ("f" * 32)).read_text())["digest"] == other


def test_concurrent_writers_of_the_same_blob_and_entry_are_harmless(tmp_path):
    digest, data = tensor(5)
    tiers = [tier(tmp_path) for _ in range(6)]
    seen = []

    def write(t):
        for _ in range(20):
            t.put_blob(digest, data)
            t.put_entry("9" * 32, digest, DTYPE, SHAPE)

    def read():
        reader = tier(tmp_path, "read")
        for _ in range(200):
            got = reader.get(digest, DTYPE, SHAPE, len(data))
            if got is not None:
                seen.append(bytes(got))
            reader._bad.clear()

    threads = [threading.Thread(target=write, args=(t,)) for t in tiers] + [threading.Thread(target=read)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(s == data for s in seen)  # a reader saw the whole blob or nothing, never part of one
    assert tier(tmp_path, "read").stats.bad_blobs == 0
    leftovers = [p for p in (tmp_path / "remote").rglob("*.tmp")]
    assert not leftovers


def test_require_makes_an_unreachable_remote_an_error_and_other_modes_a_warning(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t = RemoteTier(f"file://{blocker}/remote", {}, "readwrite")
    assert not t.probe() and t.dead and len(t.warnings) == 1
    assert t.lookup({"a" * 32: (DTYPE, SHAPE)}) == {}
    with pytest.raises(BuildError, match="require"):
        RemoteTier(f"file://{blocker}/remote", {}, "require").probe()


def test_redact_hides_userinfo_secret_options_and_aws_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-123")
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIA1234",
               "client_kwargs": {"aws_session_token": "tok-abcdef"}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    text = "s3://joe:hunter22@bucket/x failed with AKIA1234 tok-abcdef env-secret-123 at http://127.0.0.1:9000"
    shown = redact(text, options)
    for secret in ("hunter22", "joe", "AKIA1234", "tok-abcdef", "env-secret-123"):
        assert secret not in shown
    assert "s3://***@bucket/x" in shown and "http://127.0.0.1:9000" in shown


def test_a_longer_blob_is_bad_and_an_empty_entry_is_a_miss(tmp_path):
    t = tier(tmp_path)
    digest, data = tensor(6)
    t.put_blob(digest, data + b"more")  # a remote that returns more than the tensor holds
    assert t.get(digest, DTYPE, SHAPE, len(data)) is None and t.stats.bad_blobs == 1
    entry = tmp_path / "remote" / "v1" / "entries" / "ee" / ("e" * 32)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"")
    assert t.lookup({"e" * 32: (DTYPE, SHAPE)}) == {} and not t.dead and not t.warnings
