"""Computing a merge's whole-model statistic (planning/statistics.py), before its tensors.

The statistic's compute reads the tensors it declared through a StatisticReader: loaded on
demand (from the sources, or verified from the cache), converted to the compute dtype on the
CPU, and kept in a least-recently-used window of BUDGET bytes, so a statistic over a whole
model holds a group of tensors at a time, not the model. Its outputs are checked against what
it declared, stored as blobs and recorded (only after the sources are re-checked), then the
merge's tasks find their digests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from mergebuild.errors import BuildError, InputError
from mergebuild.planning.statistics import CACHED, DIRTY, resolve_statistic
from mergebuild.portable import release_freed_memory
from mergebuild.store.hashing import tensor_digest

BUDGET = 1 << 30  # bytes of loaded tensors a statistic keeps between reads
_HEALING = threading.Lock()


class StatisticReader:
    """What compute() reads tensors with: load(i, name) -> input i's tensor, float, on the CPU."""

    def __init__(self, executor, stat, inputs: list[str], budget: int = BUDGET):
        self._executor, self._stat, self._inputs, self.budget = executor, stat, inputs, budget
        self._declared = set(stat.spec.reads)
        self._kept: OrderedDict[tuple[int, str], object] = OrderedDict()
        self._bytes = 0
        self.loads = 0  # tensors read from storage (a re-read after eviction counts again)

    def shape(self, i: int, name: str) -> tuple[int, ...]:
        return tuple(self._executor.plan.ref(self._inputs[i], name).shape)

    def load(self, i: int, name: str):
        if (i, name) not in self._declared:
            raise ValueError(f"the statistic read {name!r} of input {i}, which it did not declare")
        key = (i, name)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        from mergebuild.tensors.convert import from_bytes

        ref = self._executor.plan.ref(self._inputs[i], name)
        data = self._executor._load(self._inputs[i], name)
        tensor = from_bytes(data, ref.dtype, ref.shape).to(self._executor.transfer.compute_dtype)
        self.loads += 1
        size = tensor.numel() * tensor.element_size()
        while self._kept and self._bytes + size > self.budget:
            _, old = self._kept.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        if size <= self.budget:
            self._kept[key] = tensor
            self._bytes += size
        return tensor

    def close(self) -> None:
        """Drop the window (the merge's tasks come next: their memory must not stack on it)."""
        self._kept.clear()
        self._bytes = 0


def run_statistic(executor, merge) -> None:
    """Compute the merge's statistic if its key is not cached; store and record its outputs."""
    ensure_statistic(executor, merge.statistic)


def ensure_statistic(executor, stat) -> None:
    """A statistic node (a merge's, or a computed source: planning/computed.py) computed if dirty."""
    resolve_statistic(executor.plan, stat, executor.cache, executor.force)
    if stat.state == DIRTY:
        _compute(executor, stat)


def reload_statistic(executor, node: str, tensor: str):
    """A statistic's output found missing or bad when a task reads it: computed again, then read."""
    from mergebuild.execute.tensorio import read_ref

    stat = executor.plan.statistics[node]
    with _HEALING:  # reader threads that find it bad at once: one computes, the others read its result
        data = read_ref(stat.ref(tensor), executor.cache, executor.files)
        if data is not None:
            return data
        _compute(executor, stat)
        data = read_ref(stat.ref(tensor), executor.cache, executor.files)
    if data is None:
        raise BuildError(f"[merges.{stat.merge}] {stat.spec.name}: its output {tensor!r} cannot be kept in the cache")
    return data


def _compute(executor, stat) -> None:
    started = time.perf_counter()
    inputs = list(stat.inputs) or list(executor.plan.merges[stat.merge].spec.inputs)
    reader = StatisticReader(executor, stat, inputs)
    progress = executor.progress
    label = f"{stat.node}: {stat.spec.name}" if stat.where else f"{stat.merge}: {stat.spec.name}"
    progress.start(label, 0, 0)
    try:
        result = stat.spec.compute(reader, **stat.spec.params)
    except (InputError, BuildError):
        raise
    except ValueError as e:  # the model does not fit what the statistic expects
        raise InputError(f"[{stat.table}] {stat.spec.name}: {e}") from None
    except Exception as e:
        raise BuildError(f"[{stat.table}] {stat.spec.name} failed: {e}") from e
    finally:
        progress.finish(label)
        reader.close()
        release_freed_memory()  # glibc keeps the window's freed pages otherwise (docs/methods.md)
    digests = {name: _store(executor, stat, name, result) for name in stat.spec.outputs}
    executor.records.verify_sources()  # nothing computed from a file that changed is recorded
    executor.records.flush()
    stat.digests, stat.state, stat.seconds = digests, CACHED, time.perf_counter() - started


def _store(executor, stat, name: str, result: dict) -> str:
    from mergebuild.tensors.convert import to_bytes
    from mergebuild.torchlazy import torch_dtype

    dtype, shape = stat.spec.outputs[name]
    tensor = result.get(name)
    if tensor is None or tuple(tensor.shape) != tuple(shape) or tensor.dtype != torch_dtype(dtype):
        got = "nothing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
        raise BuildError(f"{stat.spec.name}: output {name!r} should be {dtype} {list(shape)}, got {got}")
    data = to_bytes(tensor.contiguous().cpu())
    digest = tensor_digest(dtype, tuple(shape), data)
    if executor.cache.blobs.has(digest):  # a bad blob under this digest (why it is computed again) goes first
        executor.cache.blobs.get(digest, dtype, tuple(shape), len(data))
    disk = executor.cache.blobs.put(digest, data)
    executor.records.stored_row(stat.output_key(name), digest, dtype, tuple(shape), disk)
    return digest
