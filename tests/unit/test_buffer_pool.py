"""Read buffers used again (execute/tensorio.py BufferPool): a buffer comes back only once nothing
reads it, is never handed out twice at once, and the pool stays within its limit. End to end, a
build whose read buffers are recycled tensor after tensor writes the formula's bits."""

from __future__ import annotations

import numpy as np
import torch

from mergebuild.execute.batching import SMALL
from mergebuild.execute.tensorio import BufferPool
from tests.conftest import build_json, load, mergefile, write_model


def test_a_buffer_given_back_is_refilled_for_a_tensor_that_fits():
    pool = BufferPool(limit=8 << 20)
    first = pool.take(3000)
    assert len(first) == 3000 and first.dtype == np.uint8
    pool.give(first)
    again = pool.take(2500)
    assert len(again) == 2500 and np.shares_memory(again, first)  # the same memory, not a new page
    bigger = pool.take(5 << 20)  # nothing free fits: a new buffer
    assert not np.shares_memory(bigger, again)


def test_a_buffer_given_back_twice_is_handed_out_once():
    pool = BufferPool(limit=8 << 20)
    buf = pool.take(100)
    pool.give(buf)
    pool.give(buf)
    a, b = pool.take(100), pool.take(100)
    assert not np.shares_memory(a, b)


def test_the_smallest_fit_and_never_a_buffer_over_twice_the_size():
    step = BufferPool.STEP
    pool = BufferPool(limit=16 * step)
    small, large, huge = pool.take(10), pool.take(2 * step), pool.take(4 * step)
    for buf in (huge, large, small):
        pool.give(buf)
    assert np.shares_memory(pool.take(5), small)  # 1 MB, not 2 or 4
    assert np.shares_memory(pool.take(step + 1), large)  # needs 2 MB
    assert not np.shares_memory(pool.take(step), huge)  # 4 MB is over twice what 1 MB needs


def test_buffers_in_use_and_waiting_stay_within_the_limit():
    step = BufferPool.STEP
    pool = BufferPool(limit=3 * step)
    a, b = pool.take(step), pool.take(step)
    pool.give(a)
    pool.give(b)
    assert pool._free_bytes + pool._taken <= pool.limit
    c = pool.take(3 * step)  # fits none: the waiting ones make room for it, the oldest first
    assert pool._free_bytes + pool._taken <= pool.limit
    pool.give(c)
    assert pool._free_bytes + pool._taken <= pool.limit
    assert np.shares_memory(pool.take(3 * step), c)


def test_memory_the_pool_did_not_make_is_never_pooled():
    pool = BufferPool()
    foreign = np.empty(4 << 20, dtype=np.uint8)
    pool.give(foreign[:100])  # a view of someone else's array (a cached tensor, a read window)
    pool.give(foreign)
    assert not np.shares_memory(pool.take(100), foreign)


def test_zero_bytes():
    pool = BufferPool()
    empty = pool.take(0)
    assert len(empty) == 0
    pool.give(empty)


def test_recycled_read_buffers_give_the_formula_bits(tmp_path, monkeypatch):
    """Many tensors of many sizes (each read into a buffer another tensor used before), two
    dtypes, a merge kept as blobs and one that reads them into the pool's buffers too: every
    result equals torch's formula on these inputs."""
    g = torch.Generator().manual_seed(7)
    shapes = [(n,) for n in (70_000, 300_000, 5_000, 1_200_000, 90_000, 700_000)] * 4
    a = {f"t{i:02d}": torch.randn(s, generator=g).to(torch.float16 if i % 2 else torch.bfloat16)
         for i, s in enumerate(shapes)}
    b = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in a.items()}
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    mergefile(tmp_path / "mergefile.toml", """
[models.A]
path = "a.safetensors"
[models.B]
path = "b.safetensors"
[merges.m]
method = "weighted_sum"
inputs = ["A", "B"]
alpha = 0.3
[merges.d]
method = "add_difference"
inputs = ["m", "A", "B"]
alpha = 0.6
output = "d.safetensors"
""")
    taken, given = [], []
    take, give = BufferPool.take, BufferPool.give
    monkeypatch.setattr(BufferPool, "take", lambda self, n: (taken.append(n), take(self, n))[1])
    monkeypatch.setattr(BufferPool, "give", lambda self, view: (given.append(len(view)), give(self, view)))
    build_json(cwd=tmp_path)
    unbatched = [k for k, v in a.items() if v.numel() > SMALL]  # small ones travel in batches (batching.py)
    assert len(taken) == len(given) == 5 * len(unbatched)  # m's 2 inputs and d's 3 (m's from its blobs)
    out = load(tmp_path / "d.safetensors")
    for k in a:
        m = torch.lerp(a[k].float(), b[k].float(), 0.3).to(a[k].dtype)
        expected = torch.add(m.float(), a[k].float() - b[k].float(), alpha=0.6).to(a[k].dtype)
        assert torch.equal(out[k], expected), k
