"""The driver side of `mergebuild --ray`: the executor, with every tensor to compute (and every
batch of small ones) sent to a Ray worker (ray_tasks.py) instead of the local compute stage.

The driver still plans, orders the merges, copies unchanged tensors into outputs, writes and
commits the outputs and records every entry, exactly as Executor does; only the reading and
computing of dirty tensors moves. Memory stays bounded everywhere: the executor's window of
`staging` bytes limits the tasks in flight, and a worker holds one task's inputs and result at a
time (one CPU each), so a node holds at most its CPUs' worth of tasks.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.execute.batching import Batch
from mergebuild.execute.executor import Executor
from mergebuild.execute.ray_cluster import cluster_slots, connect, task_error
from mergebuild.execute.ray_tasks import TaskSpec, Unit, UnitResult, run_unit
from mergebuild.planning.planner import CACHED, DIRTY
from mergebuild.planning.sources import TensorRef

IN_FLIGHT_PER_SLOT = 2  # tasks queued per worker slot: one computing, one being sent or read


@dataclass
class RaySummary:
    """What --ray did: shown after the build and in --json (docs/cluster.md)."""

    address: str = ""
    units: int = 0  # Ray tasks run (a batch of small tensors is one)
    tensors: int = 0
    on_driver: int = 0  # units computed by the driver (an input the worker could not read)
    returned: int = 0  # result bytes sent back to the driver (targets' tensors, other nodes')
    pids: set = field(default_factory=set)
    nodes: set = field(default_factory=set)

    def doc(self) -> dict:
        return {"address": self.address, "tasks": self.units, "tensors": self.tensors,
                "computed_on_driver": self.on_driver, "bytes_to_driver": self.returned,
                "worker_pids": sorted(self.pids), "nodes": len(self.nodes)}


class RayExecutor(Executor):
    in_pieces = False  # a worker computes a tensor whole: its unit names the tensor, not a byte range
    def __init__(self, *args, address: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ray = connect(address)
        gpus = self.device_name.startswith("cuda")
        self.reader_threads = IN_FLIGHT_PER_SLOT * cluster_slots(self.ray, gpus)
        # a GPU build shares each GPU between two tasks, so one's transfers overlap the other's compute
        self._remote = self.ray.remote(run_unit).options(num_cpus=1, num_gpus=0.5 if gpus else 0)
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._driver_node = self.ray.get_runtime_context().get_node_id()
        self._root = str(Path(self.cache.root).absolute())
        self.summary = RaySummary(address=_address(self.ray))

    def _fetch(self, merge, task, sink):
        """In a reader thread: a dirty unit runs on the cluster (this thread waits for it)."""
        if not (isinstance(task, Batch) or task.state == DIRTY):
            return super()._fetch(merge, task, sink)
        unit = self._unit(merge, task, sink is not None)
        try:
            result = self.ray.get(self._remote.remote(unit))
        except Exception as e:  # noqa: BLE001 (Ray wraps what the worker raised)
            raise task_error(self.ray, e) from None
        with self._lock:
            self.summary.pids.add(result.pid)
            self.summary.nodes.add(result.node)
            if result.missing:
                self.summary.on_driver += 1
            else:
                self.summary.units += 1
                self.summary.tensors += len(result.items)
                self.summary.returned += result.returned
        return super()._fetch(merge, task, sink) if result.missing else result

    def _handle(self, task, fetched, sink, writes) -> int:
        if not isinstance(fetched, UnitResult):
            return super()._handle(task, fetched, sink, writes)
        members = task.tasks if isinstance(task, Batch) else [task]
        writes.append((task.nbytes, self.writers.submit(self._keep_remote, members, fetched, sink)))
        self.progress.advance(self._merge_name, len(members), task.nbytes, self._input_bytes(task))
        return len(members)

    def _keep_remote(self, tasks: list, result: UnitResult, sink) -> None:
        """In a writer thread: what Executor._keep does, the bytes being stored already (a blob
        the worker wrote) or sent back (stored here)."""
        for task, (digest, disk, data, stats) in zip(tasks, result.items):
            task.stats = stats
            if sink is not None:
                sink.write(task.name, digest, memoryview(data))
                self.records.in_output(self._merge_name, task, digest)
            else:
                if data is not None:
                    disk = self.cache.blobs.put(digest, memoryview(data))
                self.records.stored(task, digest, disk)
            task.digest, task.state = digest, CACHED

    def _unit(self, merge, task, return_bytes: bool) -> Unit:
        members = task.tasks if isinstance(task, Batch) else [task]
        refs = {i: _absolute(self.plan.ref(*i)) for t in members for i in t.inputs}
        sources = {n: str(self.plan.sources[n].path) for n, _ in refs if n in self.plan.sources}
        return Unit(merge.spec.name, tuple(TaskSpec.of(t) for t in members), isinstance(task, Batch), refs, sources,
                    return_bytes, self._root, self._token, self.device_name, self.plan.compute_dtype,
                    self._driver_node)


def _absolute(ref: TensorRef) -> TensorRef:
    """Workers run in another folder: a file's path must not depend on the driver's."""
    if ref.file is None:
        return ref
    return TensorRef(ref.dtype, ref.shape, ref.digest, Path(ref.file).absolute(), ref.begin)


def _address(ray) -> str:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 (only for the summary)
        return ""
