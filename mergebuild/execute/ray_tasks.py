"""The worker side of `mergebuild --ray`: one tensor task (or one batch of small tensors) run
in a Ray worker process, with the same code, and so the same bytes, as the local executor.

A Unit says what to compute and where every input lies (a byte range of a source file, or a
digest in the cache); the worker reads the inputs itself, computes, hashes, and stores an
intermediate as a blob in the cache folder (when that folder is the driver's: same node, or a
shared filesystem) or returns the bytes (a target's tensor, which the driver writes into the
output; any result when the worker cannot reach the driver's cache). The driver alone records
entries in the index, after their bytes are stored (ray_executor.py). An input the worker cannot
read (a cached tensor missing or bad here) is reported, never guessed: the driver computes that
task itself, healing the input as a local build does.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from mergebuild.execute.batching import Batch
from mergebuild.execute.executor import Executor
from mergebuild.execute.tensorio import OpenFiles, ResultBuffers, read_ref
from mergebuild.planning.planner import DIRTY, TensorTask
from mergebuild.planning.sources import TensorRef


@dataclass(frozen=True)
class TaskSpec:
    """A TensorTask without its Method object (methods are looked up by name on the worker:
    their functions pickle by reference, their planners need not travel)."""

    name: str
    dtype: str
    shape: tuple
    inputs: tuple
    method: str
    params: dict
    channels: int | None
    clip: bool

    @classmethod
    def of(cls, task: TensorTask) -> "TaskSpec":
        return cls(task.name, task.dtype, tuple(task.shape), tuple(task.inputs), task.method.name,
                   dict(task.params), task.channels, task.clip)

    def task(self) -> TensorTask:
        from mergebuild.methods.registry import get_method

        return TensorTask(self.name, self.dtype, self.shape, self.inputs, get_method(self.method), dict(self.params),
                          self.channels, self.clip, state=DIRTY)


@dataclass(frozen=True)
class Unit:
    merge: str
    tasks: tuple  # TaskSpec, one, or the members of a batch
    batch: bool
    refs: dict  # (node, tensor) -> TensorRef, paths absolute
    sources: dict  # node -> source path, for messages
    return_bytes: bool  # a target's tensors: the driver writes them into the output
    cache_root: str
    token: str  # one per build: a worker's view of the cache lasts one build
    device: str
    compute_dtype: str
    driver_node: str


@dataclass
class UnitResult:
    pid: int
    node: str
    missing: bool = False  # an input could not be read here: the driver computes the unit
    items: list = field(default_factory=list)  # per task: (digest, bytes on disk, data or None, stats)
    returned: int = 0  # bytes of results sent back to the driver


class _PlanView:
    """What the executor's compute methods read of a plan: input refs, source paths, the dtype."""

    def __init__(self, compute_dtype: str):
        self.compute_dtype = compute_dtype
        self.refs: dict = {}
        self.sources: dict = {}

    def ref(self, node: str, tensor: str) -> TensorRef:
        return self.refs[(node, tensor)]


class _WorkerCompute(Executor):
    """The executor's compute stage alone (transfer, methods, chunking, NaN checks, stats)."""

    def __init__(self, device: str, compute_dtype: str):  # noqa: super().__init__ is for a driver
        self.device_name = device
        self.plan = _PlanView(compute_dtype)
        self._transfer = None
        self._lock = threading.Lock()
        self._scratch_local = threading.local()
        self.results = ResultBuffers(1 << 62)  # its results leave as bytes, never given back: not pooled
        self._merge_name = ""


class _WorkerState:
    """Per worker process: the cache view of the current build, open files, the compute stage."""

    def __init__(self):
        self.token = None
        self.cache = None
        self.files = OpenFiles()
        self.computes: dict = {}

    def cache_for(self, unit: Unit):
        from mergebuild.store.cache import Cache

        if unit.token != self.token:
            if self.cache is not None:
                self.cache.close()
            self.files.close()
            root = Path(unit.cache_root)
            # never create a cache folder on a node that lacks the driver's (no shared filesystem)
            self.cache = Cache(root) if (root / "index.sqlite").is_file() else None
            if self.cache is not None:
                self.cache.alive()  # our temps are in use: another build's clear_stale leaves them
            self.token = unit.token
        return self.cache

    def compute_for(self, unit: Unit) -> _WorkerCompute:
        key = (unit.device, unit.compute_dtype)
        if key not in self.computes:
            self.computes[key] = _WorkerCompute(unit.device, unit.compute_dtype)
        return self.computes[key]


_STATE: _WorkerState | None = None
_STATE_LOCK = threading.Lock()


def run_unit(unit: Unit) -> UnitResult:
    """In a Ray worker: read, compute, hash, store (or return) one unit."""
    global _STATE
    import ray

    with _STATE_LOCK:
        if _STATE is None:
            _STATE = _WorkerState()
        state = _STATE
        cache = state.cache_for(unit)
    node = ray.get_runtime_context().get_node_id()
    result = UnitResult(os.getpid(), node)
    worker = state.compute_for(unit)
    worker.plan.refs, worker._merge_name = unit.refs, unit.merge
    worker.plan.sources = {n: SimpleNamespace(path=p) for n, p in unit.sources.items()}
    tasks = [spec.task() for spec in unit.tasks]
    inputs = _read_inputs(tasks, unit.refs, cache, state.files)
    if inputs is None:
        result.missing = True
        return result
    pieces = _compute(worker, unit, tasks, inputs)
    keep_here = cache is not None and not unit.return_bytes and (node == unit.driver_node or _shared(cache))
    for task, data in pieces:
        digest = _digest(task, data)
        if keep_here:
            result.items.append((digest, cache.blobs.put(digest, data), None, task.stats))
        else:
            array = _array(data)
            result.returned += array.nbytes
            result.items.append((digest, 0, array, task.stats))
    return result


def _shared(cache) -> bool:
    """A worker on another node keeps blobs in the driver's cache only when told the folder is
    one shared filesystem (docs/cluster.md): a folder that merely exists there might be another."""
    return os.environ.get("MERGEBUILD_SHARED_CACHE", "") == str(cache.root)


def _read_inputs(tasks: list[TensorTask], refs: dict, cache, files: OpenFiles):
    rows = []
    for task in tasks:
        row = []
        for node, tensor in task.inputs:
            ref = refs[(node, tensor)]
            data = None if (ref.file is None and cache is None) else read_ref(ref, cache, files)
            if data is None:
                return None
            row.append(data)
        rows.append(row)
    return rows


def _compute(worker: _WorkerCompute, unit: Unit, tasks: list[TensorTask], inputs: list) -> list:
    """(task, result bytes) per task: the executor's own _compute / _compute_batch, then the
    writer's conversion (Executor._store / _store_batch)."""
    from mergebuild.tensors.convert import to_bytes

    transfer = worker.transfer
    if not unit.batch:
        task = tasks[0]
        handle = worker._compute(task, worker._upload(task, inputs[0]))
        return [(task, to_bytes(transfer.fetch(handle)))]
    batch = Batch(tasks=tasks, numel=sum(math.prod(t.shape) for t in tasks))
    refs = [[unit.refs[i] for i in t.inputs] for t in tasks]
    flat = transfer.fetch(worker._compute_batch(batch, transfer.upload_batch(inputs, refs)))
    return [(task, to_bytes(flat[begin : begin + n])) for task, begin, n in batch.spans()]


def _digest(task: TensorTask, data) -> str:
    from mergebuild.store.hashing import tensor_digest

    return tensor_digest(task.dtype, task.shape, data)


def _array(data):
    """Bytes Ray sends without a pickle copy (a numpy buffer travels out of band)."""
    import numpy

    return numpy.frombuffer(data, dtype=numpy.uint8) if len(data) else numpy.zeros(0, dtype=numpy.uint8)
