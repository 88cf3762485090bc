"""Chunked results' memory is used again (execute/tensorio.py ResultBuffers), and never while
anything still reads it: an output's writer keeps the bytes of a tensor written ahead of its
hash, and hands them back only once hashed."""

from __future__ import annotations

import hashlib

import torch

from mergebuild.execute.tensorio import ResultBuffers, _address
from mergebuild.tensors.convert import to_bytes
from mergebuild.tensors.writer import SafetensorsWriter

MB = 1 << 20


def test_a_result_given_back_holds_the_next_one():
    results = ResultBuffers(smallest=MB)
    first = results.empty((512, 1024), "F32")  # 2 MB
    address = first.data_ptr()
    results.give(to_bytes(first))
    second = results.empty((500, 1024), "F32")  # fits the same buffer
    assert second.data_ptr() == address and second.shape == (500, 1024) and second.dtype == torch.float32
    third = results.empty((512, 1024), "F32")  # the buffer is lent: a new one
    assert third.data_ptr() != address


def test_small_results_and_other_memory_are_not_pooled():
    results = ResultBuffers(smallest=MB)
    small = results.empty((16, 16), "F16")
    results.give(to_bytes(small))
    foreign = torch.empty(1024, 1024)  # not lent by it
    results.give(to_bytes(foreign))
    assert results.empty((1024, 1024), "F32").data_ptr() != foreign.data_ptr()


def test_a_result_never_given_back_is_freed_and_forgotten():
    results = ResultBuffers(smallest=MB)
    lost = results.empty((1024, 1024), "F32")
    del lost  # a cluster worker's result leaves as bytes and is dropped
    assert len(results._lent) == 0


def test_the_writer_hands_back_kept_bytes_only_once_hashed(tmp_path):
    results = ResultBuffers(smallest=MB)
    tensors = [("a", "F32", (512, 1024)), ("b", "F32", (512, 1024))]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", tensors, {}, "tok")
    released = []

    def release(view):
        released.append(_address(view))
        results.give(view)

    writer.release = release
    a, b = results.empty((512, 1024), "F32"), results.empty((512, 1024), "F32")
    a.copy_(torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)))
    b.copy_(torch.randn(512, 1024, generator=torch.Generator().manual_seed(2)))
    expected = hashlib.sha256(to_bytes(a).tobytes() + to_bytes(b).tobytes()).hexdigest()
    assert writer.write("b", to_bytes(b)) is True  # ahead of the hash: kept, not handed back
    assert released == []
    assert writer.write("a", to_bytes(a)) is False  # hashed at once; then b, from the bytes kept
    assert released == [b.data_ptr()]
    reused = results.empty((512, 1024), "F32")
    assert reused.data_ptr() == b.data_ptr()
    reused.fill_(7.0)  # the next result writes over b's memory: the hash has it already
    assert writer.data_sha256().hexdigest() == expected
    writer.abort()
