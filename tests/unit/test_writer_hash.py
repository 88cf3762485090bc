"""The writer's sha256 of the tensor data (ModelSpec's hash_sha256) is hashed as tensors are
written, from the bytes in hand (those written ahead of the hash kept, up to HOLD bytes), else
read back: whatever the order, the threads and the hold, it is hashlib's sha256 of the data
section."""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import mergebuild.tensors.writer as writer_module
from mergebuild.errors import BuildError
from mergebuild.portable import RandomAccess
from mergebuild.tensors.writer import SafetensorsWriter


@pytest.mark.parametrize("hold", [writer_module.HOLD, 150_000, 0])  # all held, some read back, none held
@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled", "threads", "copied and written"])
def test_data_sha256_whatever_the_order(tmp_path, monkeypatch, order, hold):
    monkeypatch.setattr(writer_module, "HOLD", hold)
    rng = random.Random(order)
    sizes = [rng.choice([1, 2, 3, 64, 1000, 70_000]) for _ in range(60)]
    tensors = [(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    data = {name: bytes(rng.getrandbits(8) for _ in range(shape[0])) for name, _, shape in tensors}
    source = tmp_path / "source.bin"
    source.write_bytes(b"".join(data[n] for n, _, _ in tensors))
    offsets, at = {}, 0
    for name, _, shape in tensors:
        offsets[name], at = at, at + shape[0]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", tensors, {"k": "v"}, "tok")
    names = [n for n, _, _ in tensors]
    if order == "reversed":
        names.reverse()
    elif order in ("shuffled", "threads", "copied and written"):
        rng.shuffle(names)
    with RandomAccess(source) as src:
        def put(name):
            if order == "copied and written" and int(name[1:]) % 3 == 0:
                writer.copy_into(name, src, offsets[name])  # kernel-side: no bytes in hand
            else:
                writer.write(name, bytearray(data[name]))

        if order in ("threads", "copied and written"):
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(put, names))
        else:
            for name in names:
                put(name)
        digest = writer.data_sha256().hexdigest()
    writer.commit({"k": "v"})
    raw = (tmp_path / "out.safetensors").read_bytes()
    body = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert body == b"".join(data[n] for n, _, _ in tensors)
    assert digest == hashlib.sha256(body).hexdigest()


def test_a_tensor_never_written_is_an_error_not_a_hash_of_zeros(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [("a", "U8", (4,)), ("b", "U8", (4,))], {}, "tok")
    writer.write("b", bytearray(b"bbbb"))
    with pytest.raises(BuildError, match="'a' was never written"):
        writer.data_sha256()
    writer.abort()


def test_a_later_shard_is_hashed_once_after_the_ones_before_it(tmp_path):
    """A folder's shards share one sha256 in shard order: a later shard neither hashes nor holds
    bytes as they are written, and data_sha256(hasher) continues the hash over its data."""
    first = SafetensorsWriter(tmp_path / "1.safetensors", [("a", "U8", (3,))], {}, "tok")
    later = SafetensorsWriter(tmp_path / "2.safetensors", [("b", "U8", (2,)), ("c", "U8", (2,))], {}, "tok",
                              hash_as_written=False)
    later.write("c", bytearray(b"cc"))
    later.write("b", bytearray(b"bb"))
    first.write("a", bytearray(b"aaa"))
    assert later._hashed == 0 and not later._held
    digest = later.data_sha256(first.data_sha256()).hexdigest()
    assert digest == hashlib.sha256(b"aaabbcc").hexdigest()
    first.abort()
    later.abort()


def test_writeback_is_started_every_writeback_bytes_written_or_copied(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writer_module, "WRITEBACK", 10_000)
    monkeypatch.setattr(writer_module, "start_writeback", calls.append)
    tensors = [(f"t{i}", "U8", (3_000,)) for i in range(10)]
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(3_000))
    writer = SafetensorsWriter(tmp_path / "out.safetensors", tensors, {}, "tok")
    with RandomAccess(source) as src:
        for i, (name, _, _) in enumerate(tensors):
            if i % 2:
                writer.copy_into(name, src, 0)
            else:
                writer.write(name, bytearray(3_000))
    assert calls == [writer.file.fd] * 2  # after 12,000 and 24,000 of the 30,000 bytes
    writer.commit({})
    assert len((tmp_path / "out.safetensors").read_bytes()) == 8 + writer.header_size + 30_000
