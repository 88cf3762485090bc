"""Run a plan: stream every tensor through its method, into the cache and the outputs.

Per merge, tensors flow through three stages that overlap:
  reader threads  -> load the input tensors (file ranges, verified cached tensors), a bounded window ahead
  main thread     -> run the method on the device, in the compute dtype, cast to the result dtype
  writer threads  -> hash the result, store it (a blob, or its place in the output file)
Memory is bounded by the windows (`staging` bytes of loaded inputs, in the compute dtype and on
the compute device, and WRITE_BEHIND bytes of results), not by the model size. Small tensors of
an elementwise method move as Batches (batching.py): one trip through the stages for many.

Nothing is recorded in the index before its bytes are stored and every source it was computed
from has been re-checked (records.py); an interrupt keeps the finished tensors.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mergebuild.dtypes import itemsize
from mergebuild.errors import BuildError, InputError
from mergebuild.execute import native, pieces
from mergebuild.execute.batching import Batch, group_small
from mergebuild.execute.outputs import OutputSink, abort_unfinished, open_sink
from mergebuild.execute.records import Records
from mergebuild.execute.results import MergeResult, NullProgress  # noqa: F401 - named here by callers
from mergebuild.execute.statistics import ensure_statistic, reload_statistic, run_statistic
from mergebuild.execute.stats import sample_stats
from mergebuild.execute.tensorio import BufferPool, OpenFiles, ResultBuffers, read_ref
from mergebuild.planning.planner import CACHED, DIRTY, PASSTHROUGH, MergePlan, Plan, TensorTask, resolve_keys
from mergebuild.planning.shortcut import expand
from mergebuild.mergefile.model import Settings
from mergebuild.portable import STREAMING_MMAP, WHOLE_TENSOR_MMAP, set_mmap_threshold
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import HASH_THREADS, tensor_digest

WRITE_BEHIND = 128 << 20  # bytes of results waiting for the writers
CHUNK = 1 << 20  # elements per chunk of an elementwise method: 4 MB in float32, so a chunk's few
# passes (convert each input, the method, the sum, the cast) stay in the CPU's caches (measured
# 1.7 s per 1e9 elements on 2 cores against 2.3 s with 4M-element chunks)
MMAP_SLACK = 64 << 10  # bytes above a chunk's: the allocator's own header and alignment


class Executor:
    reader_threads = 2  # fetches at once (ray_executor.py: one per task in flight on the cluster)
    in_pieces = True  # big elementwise tensors move in pieces (pieces.py); a cluster's task computes a tensor whole

    def __init__(self, plan: Plan, cache: Cache, device: str, build_id: int, force: bool = False, progress=None,
                 staging: int = Settings.staging):
        self.plan, self.cache, self.build_id, self.force = plan, cache, build_id, force
        self.device_name = device
        self.staging = staging
        self._transfer = None
        self.files = OpenFiles()
        self.pool = BufferPool()  # read buffers of chunked methods' inputs, used again
        self._pooled: dict[int, list] = {}  # id(task) -> its inputs' buffers from the pool
        self._scratch_local = threading.local()  # float32 chunks reused by _compute_chunked
        self.results = ResultBuffers(self._streaming_mmap(), WRITE_BEHIND)  # _compute_chunked's, given back by _keep
        self.progress = progress or NullProgress()
        self.records = Records(plan, cache, build_id)
        self._lock = threading.Lock()
        self._merge_name = ""
        self._healed = 0  # cached tensors found bad on read and recomputed
        self._step, self._steps = 0, sum(1 for m in plan.merges.values() if _has_work(m))
        self.output_sha256: dict[str, Future] = {}  # outputs written by this build
        self.warnings: list[str] = []

    # public -------------------------------------------------------------------------------
    def run(self) -> dict[str, MergeResult]:
        self.cache.alive()
        self.cache.clear_stale()
        gc.freeze()  # the plan's objects live to the end: the collector need not walk them again and again
        try:
            return self._run_all()
        finally:
            abort_unfinished(self.cache)  # outputs a stop signal left between their creation and their owner
            gc.unfreeze()
            if self._transfer is not None:
                self._transfer.close()

    def _run_all(self) -> dict[str, MergeResult]:
        from mergebuild.execute.commit import Committer

        results = {}
        with ThreadPoolExecutor(self.reader_threads, thread_name_prefix="read") as self.readers, \
                ThreadPoolExecutor(2, thread_name_prefix="write") as self.writers, \
                ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="sha256") as self.hashers:  # by the cores
            self.committer = Committer(self.plan, self.cache, self.hashers, self.warnings, self.build_id)
            try:
                for name in self.plan.order:
                    if name in self.plan.merges:
                        results[name] = self._run_merge(self.plan.merges[name])
                self.committer.save_source_hashes()
                self.output_sha256 = self.committer.output_hashes()  # only those known: never a pass of its own
            finally:
                self.committer.cancel()
        self.files.close()
        self.records.save_state({n: r for n, r in results.items() if r.ran})
        return results

    @property
    def transfer(self):
        """The device's transfer (CPU or CUDA), made on first use: a no-op build never imports torch."""
        if self._transfer is None:
            with self._lock:
                if self._transfer is None:
                    from mergebuild.execute.device import make_transfer

                    self._transfer = make_transfer(self.device_name, self.plan.compute_dtype)
        return self._transfer

    # one merge ----------------------------------------------------------------------------
    def _run_merge(self, merge: MergePlan) -> MergeResult:
        started = time.perf_counter()
        name = self._merge_name = merge.spec.name
        arch = merge.arch.name if merge.arch else ""
        if not merge.needed:  # its output is current and nothing that runs reads it
            return MergeResult(name, len(merge.tasks), 0, 0.0, merge.method_tasks, merge.spec.output, False, arch, False)
        for node in dict.fromkeys(merge.spec.inputs):  # computed sources it reads (planning/computed.py)
            if node in self.plan.statistics:
                ensure_statistic(self, self.plan.statistics[node])
        if merge.statistic is not None:  # the first phase of a two-phase merge (execute/statistics.py)
            self.transfer.use_threads(elementwise=False)  # whole-model work: every core
            set_mmap_threshold(WHOLE_TENSOR_MMAP)
            run_statistic(self, merge)
        resolve_keys(self.plan, merge, self.cache, self.force)
        sink = open_sink(self.plan, self.cache, self.committer.draft_metadata(merge), merge, self.results.give) \
            if merge.spec.output is not None and not merge.current else None  # results it keeps to hash come back
        todo = [t for t in merge.tasks.values() if t.state == DIRTY or sink is not None]
        if todo:
            self._step += 1
            self.progress.start(name, len(todo), sum(t.nbytes for t in todo), self._step, max(self._steps, self._step))
        computed, self._healed = 0, 0
        try:
            computed = self._stream(merge, todo, sink)
            self.records.verify_sources()
            if sink is not None:
                self.committer.commit(merge, sink)
                self.files.forget(merge.spec.output)  # replaced: a later merge may copy from the new one
                self.records.committed(name, sink)
            self.records.flush()
        except BaseException as e:
            changed = self._keep_finished(merge, sink)
            if changed and not isinstance(e, KeyboardInterrupt):
                raise self.records.changed_error(changed) from e  # the cause, not its symptom
            raise
        finally:
            self.progress.finish(name)
        self.records.used(merge)
        return MergeResult(name, len(merge.tasks), computed + self._healed, time.perf_counter() - started,
                           merge.method_tasks, merge.spec.output, sink is not None, arch)

    def _keep_finished(self, merge: MergePlan, sink: OutputSink | None) -> list[Path]:
        """A build stopped (interrupt, failure): record what was finished, if it can be trusted;
        the files that changed under it (then nothing is recorded)."""
        changed = self.records.changed_files()
        if changed:
            self.records.discard()
            if sink is not None:
                sink.abort()
            return changed
        if sink is not None:
            try:
                kept = sink.salvage()
            except BaseException:
                sink.abort()
                kept = {}
            self.records.salvaged(merge, kept)
        self.records.flush()
        return []

    def _stream(self, merge: MergePlan, todo: list[TensorTask], sink) -> int:
        """Read ahead, compute in order, write behind; returns how many tensors were computed."""
        reads: deque = deque()
        writes: deque = deque()
        read_bytes = computed = 0
        try:
            if todo:
                self.transfer.use_threads(merge.method.elementwise)
                set_mmap_threshold(self._streaming_mmap() if merge.method.elementwise else WHOLE_TENSOR_MMAP)
            for task in self._units(merge, todo, sink):
                reads.append((task, self.readers.submit(self._fetch, merge, task, sink)))
                read_bytes += self._footprint(task)
                while reads and (read_bytes > self.staging or reads[0][1].done()):
                    task_, future = reads.popleft()
                    read_bytes -= self._footprint(task_)
                    computed += self._handle(task_, future.result(), sink, writes)
                    self._drain(writes, WRITE_BEHIND)
            while reads:
                task_, future = reads.popleft()
                computed += self._handle(task_, future.result(), sink, writes)
                self._drain(writes, WRITE_BEHIND)
            self._drain(writes, -1)  # all: a zero-byte write (a marker key) can still be running at 0 bytes left
        except BaseException:
            _settle(reads, writes)
            raise
        return computed

    def _units(self, merge: MergePlan, todo: list[TensorTask], sink):
        """What moves through the stages: small tensors in batches, big ones of an elementwise
        method in pieces (pieces.py), the rest one by one."""
        for unit in group_small(todo, self._input_dtypes):
            parts = pieces.split(self, merge, unit, sink) if self.in_pieces and isinstance(unit, TensorTask) else None
            yield from parts or [unit]

    def _streaming_mmap(self) -> int:
        """glibc's mmap threshold while tensors stream: above a chunk in the compute dtype, so
        that each chunk's result comes from the heap, used again, and not from pages of its own
        that the kernel zeroes and maps a page fault at a time (4 MB in float32: 1024 faults a
        chunk, a million for an SD1.5 merge)."""
        return max(STREAMING_MMAP, CHUNK * itemsize(self.plan.compute_dtype) + MMAP_SLACK)

    def _input_dtypes(self, task: TensorTask) -> list[str]:
        return [self.plan.ref(n, t).dtype for n, t in task.inputs]

    def _footprint(self, task: TensorTask | Batch) -> int:
        """The memory a fetched task holds until it is computed: its inputs in the compute dtype."""
        if isinstance(task, Batch):
            return sum(self._footprint(t) for t in task.tasks)
        if isinstance(task, pieces.Piece):
            return pieces.footprint(self, task)
        if task.state != DIRTY:
            return task.nbytes
        size = itemsize(self.plan.compute_dtype)
        return sum(size * math.prod(self.plan.ref(n, t).shape) for n, t in task.inputs)

    def _fetch(self, merge: MergePlan, task: TensorTask | Batch, sink):
        """In a reader thread: what _handle needs for this task."""
        if isinstance(task, pieces.Piece):
            return pieces.fetch(self, task)
        if isinstance(task, Batch):
            inputs = [[self._load(node, tensor) for node, tensor in t.inputs] for t in task.tasks]
            return self.transfer.upload_batch(inputs, [[self.plan.ref(*i) for i in t.inputs] for t in task.tasks])
        if task.state == DIRTY:
            pool = self.pool if self._chunked(task) else None  # the inputs are done with once computed
            buffers = [self._load(node, tensor, pool) for node, tensor in task.inputs]
            if pool is not None:  # sources' and blobs' bytes are read into its buffers (the pool takes back only its own)
                with self._lock:
                    self._pooled[id(task)] = buffers
            return self._upload(task, buffers)
        ref = self.plan.ref(*task.inputs[0]) if task.state == PASSTHROUGH else self.plan.ref(merge.spec.name, task.name)
        if ref.file is not None or self.cache.locate(ref.digest) is not None:
            return None  # copied file to file by the writer, never through memory
        return self._load(*task.inputs[0]) if task.state == PASSTHROUGH else self._load(merge.spec.name, task.name)

    def _handle(self, task: TensorTask | Batch, fetched, sink, writes: deque, shown: tuple[int, int] = (0, 0)) -> int:
        """On the main thread: compute (or queue the copy of) what was fetched; `shown`: the bytes
        written and read the progress already counted for it (pieces of it, before one was bad)."""
        if isinstance(task, pieces.Piece):
            return pieces.handle(self, task, fetched, sink, writes)
        if isinstance(task, Batch):
            result = self._compute_batch(task, fetched)
            writes.append((task.nbytes, self.writers.submit(self._store_batch, task, result, sink)))
            self.progress.advance(self._merge_name, len(task.tasks), task.nbytes, self._input_bytes(task))
            return len(task.tasks)
        if task.state == DIRTY:
            result = self._compute(task, fetched)
            self._give_back(task)
            writes.append((task.nbytes, self.writers.submit(self._store, task, result, sink)))
            self.progress.advance(self._merge_name, 1, task.nbytes - shown[0], self._input_bytes(task) - shown[1])
            return 1
        copy = (self._copy_into, sink, task) if fetched is None else (sink.write, task.name, task.digest, fetched)
        writes.append((task.nbytes, self.writers.submit(*copy)))
        self.progress.advance(self._merge_name, 1, task.nbytes, task.nbytes)
        return 0

    def _give_back(self, task: TensorTask) -> None:
        """A chunked method's inputs, once computed: its result is a new tensor, and nothing
        reads them again, so their read buffers can hold the next tensors' bytes."""
        with self._lock:
            buffers = self._pooled.pop(id(task), ())
        for buf in buffers:
            self.pool.give(buf)

    def _input_bytes(self, task: TensorTask | Batch) -> int:
        if isinstance(task, Batch):
            return sum(self._input_bytes(t) for t in task.tasks)
        from mergebuild.dtypes import nbytes

        return sum(nbytes(r.dtype, r.shape) for r in (self.plan.ref(n, t) for n, t in task.inputs))

    def _copy_into(self, sink: OutputSink, task: TensorTask) -> None:
        """A tensor that did not change, copied into the output from where it is stored."""
        ref = self.plan.ref(*task.inputs[0]) if task.state == PASSTHROUGH else self.plan.ref(self._merge_name, task.name)
        if ref.file is not None:
            path, offset = ref.file, ref.begin
        else:
            path, offset = self.cache.locate(ref.digest)
            self.records.read_from(Path(path))
        source = self.files.acquire(Path(path))
        try:
            sink.copy_into(task.name, ref.digest, source, offset)
        finally:
            self.files.release(Path(path))

    @staticmethod
    def _drain(writes: deque, limit: int) -> None:
        """Wait for finished writes, and for the oldest ones while more than `limit` bytes wait."""
        pending = sum(n for n, _ in writes)
        while writes and (pending > limit or writes[0][1].done()):
            n, future = writes.popleft()
            future.result()
            pending -= n

    # tensors ------------------------------------------------------------------------------
    def _load(self, node: str, tensor: str, pool: BufferPool | None = None):
        """The bytes of a node's tensor; a missing or bad cached one is recomputed, never used."""
        ref = self.plan.ref(node, tensor)
        data = read_ref(ref, self.cache, self.files, pool)
        if data is not None:
            return data
        if node in self.plan.statistics:
            return reload_statistic(self, node, tensor)
        merge_name, task = self._producer(node, tensor)
        inputs = self._upload(task, [self._load(n, t) for n, t in task.inputs])
        self._store(task, self._compute(task, inputs), None)
        with self._lock:
            self._healed += 1
        return read_ref(self.plan.ref(node, tensor), self.cache, self.files)

    def _producer(self, node: str, tensor: str) -> tuple[str, TensorTask]:
        while True:
            if node in self.plan.sources:
                raise BuildError(f"{self.plan.sources[node].path}: tensor {tensor!r} is missing from the cache "
                                 "(legacy checkpoint import was removed); run the build again")
            with self._lock:  # a summary's tasks are planned anew (planning/shortcut.py)
                task = expand(self.plan, node, self.cache).tasks[tensor]
            if task.method is not None:
                return node, task
            node, tensor = task.inputs[0]

    def _upload(self, task: TensorTask, buffers: list):
        refs = [self.plan.ref(n, t) for n, t in task.inputs]
        return self.transfer.upload(buffers, refs, convert=not self._chunked(task))

    def _chunked(self, task: TensorTask) -> bool:
        return (task.method.elementwise and self.transfer.chunks and task.channels is None and not task.clip
                and bool(task.inputs))

    def _compute(self, task: TensorTask, uploaded):
        """On the main thread: run the method; returns the transfer's handle on the result."""
        from mergebuild.torchlazy import torch

        xs = self.transfer.ready(uploaded)
        kwargs = dict(task.params)
        if self._chunked(task):
            return self._compute_chunked(task, xs, kwargs)
        if task.method.takes_key:
            kwargs["key"] = task.name
        try:
            if task.channels is None:
                result = task.method.fn(*xs, **kwargs)
            else:
                c = task.channels
                head = task.method.fn(*(x[:, :c] for x in xs), **kwargs)
                result = torch.cat([head, xs[0][:, c:]], dim=1)
            if task.clip:
                stacked = torch.stack(xs)
                result = torch.clamp(result, stacked.amin(0), stacked.amax(0))
        except Exception as e:
            raise BuildError(f"[merges.{self._merge_name}] {task.method.name} failed on {task.name!r}: {e}") from e
        self._check_finite(task, xs, result)
        task.stats = sample_stats(result, xs, [n for n, _ in task.inputs])
        return self.transfer.download(result, task.dtype)

    def _compute_batch(self, batch: Batch, uploaded):
        """On the main thread: one method call over a batch's concatenated inputs."""
        xs = self.transfer.ready(uploaded)
        first = batch.tasks[0]
        try:
            result = first.method.fn(*xs, **first.params)
        except Exception as e:
            names = ", ".join(repr(t.name) for t in batch.tasks[:3])
            raise BuildError(f"[merges.{self._merge_name}] {first.method.name} failed on a batch of "
                             f"{len(batch.tasks)} small tensors ({names}, ...): {e}") from e
        from mergebuild.torchlazy import torch

        if not bool(torch.isfinite(result.sum())):  # find the tensor, and the input, it came from
            for task, begin, n in batch.spans():
                self._check_finite(task, [x[begin : begin + n] for x in xs], result[begin : begin + n])
        for task, begin, n in batch.spans():
            task.stats = sample_stats(result[begin : begin + n], [x[begin : begin + n] for x in xs],
                                      [node for node, _ in task.inputs])
        return self.transfer.download(result, first.dtype)

    def _compute_chunked(self, task: TensorTask, xs, kwargs):
        """An elementwise method over chunks of CHUNK elements: inputs stay in their stored dtype,
        each chunk is converted into reused float32 scratch, computed, and cast into the result
        (or computed on the stored halves, native.py). No whole-tensor float32 copies."""
        out = self.results.empty(task.shape, task.dtype)
        self.chunks_into(task, [x.reshape(-1) for x in xs], out.reshape(-1), kwargs)
        task.stats = sample_stats(out, xs, [n for n, _ in task.inputs])
        return out

    def chunks_into(self, task: TensorTask, flat_in: list, flat_out, kwargs) -> None:
        """The method over flat inputs a chunk at a time, cast into flat_out; a result that is
        not finite stops the build, naming the input it came from."""
        from mergebuild.execute.casting import saturate

        scratch = self._scratch(len(flat_in))
        halves = native.eligible(task.method, kwargs, flat_in, flat_out, self.transfer.compute_dtype)
        total = 0.0
        try:
            for i in range(0, flat_out.numel(), CHUNK):
                j = min(i + CHUNK, flat_out.numel())
                k = native.aligned_end(i, j) if halves else i  # [i, k) on the stored halves
                if k > i:
                    total += native.compute(task.method.fn, kwargs, [x[i:k] for x in flat_in], flat_out[i:k])
                if j > k:
                    parts = [s[: j - k].copy_(x[k:j]) for s, x in zip(scratch, flat_in)]
                    r = task.method.fn(*parts, **kwargs)
                    total += float(r.sum())
                    flat_out[k:j].copy_(saturate(r, task.dtype))  # the cast (casting.py)
        except Exception as e:
            raise BuildError(f"[merges.{self._merge_name}] {task.method.name} failed on {task.name!r}: {e}") from e
        if not math.isfinite(total):
            full = [x.to(self.transfer.compute_dtype) for x in flat_in]
            self._check_finite(task, full, task.method.fn(*full, **kwargs))

    def _scratch(self, n: int) -> list:
        """This thread's float32 chunks (a reader thread computes too, when it heals a bad blob)."""
        from mergebuild.torchlazy import torch

        buffers = self._scratch_local.__dict__.setdefault("buffers", [])
        if len(buffers) < n:
            buffers += [torch.empty(CHUNK, dtype=self.transfer.compute_dtype) for _ in range(n - len(buffers))]
        return buffers[:n]

    def _check_finite(self, task: TensorTask, xs, result) -> None:
        """NaN and Inf spread through merges; stop at the first one, naming where it came from.
        One cheap reduction over the result (NaN and Inf survive a sum) on the fast path; the
        inputs are searched only when it is not finite."""
        from mergebuild.torchlazy import torch

        if not result.is_floating_point() or bool(torch.isfinite(result.sum())) or bool(torch.isfinite(result).all()):
            return
        for (node, tensor), x in zip(task.inputs, xs):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise InputError(f"{self._describe(node)}: tensor {tensor!r} holds NaN or Inf; "
                                 "merging it would spread them (fix or discard the key)")
        raise BuildError(f"[merges.{self._merge_name}] {task.method.name} produced NaN or Inf on {task.name!r} "
                         f"from finite inputs (parameters {task.params})")

    def _describe(self, node: str) -> str:
        if node in self.plan.sources:
            return f"[models.{node}] {self.plan.sources[node].path}"
        return f"[merges.{node}]"

    def _store(self, task: TensorTask, handle, sink) -> None:
        """In a writer thread: hash the result, keep it (in the output, or as a blob)."""
        from mergebuild.tensors.convert import to_bytes

        self._keep(task, to_bytes(self.transfer.fetch(handle)), sink)

    def _store_batch(self, batch: Batch, handle, sink) -> None:
        from mergebuild.tensors.convert import to_bytes

        flat = self.transfer.fetch(handle)
        for task, begin, n in batch.spans():
            self._keep(task, to_bytes(flat[begin : begin + n]), sink)

    def _keep(self, task: TensorTask, data, sink) -> None:
        digest = tensor_digest(task.dtype, task.shape, data)
        kept = False  # whether the output's writer keeps the bytes until its hash reaches them
        if sink is not None:
            kept = sink.write(task.name, digest, data)  # recorded once the output is committed
            self.records.in_output(self._merge_name, task, digest)
        else:
            self.records.stored(task, digest, self.cache.blobs.put(digest, data))
        if not kept:
            self.results.give(data)  # a result's memory (ResultBuffers) holds the next one
        task.digest, task.state = digest, CACHED


def _has_work(merge: MergePlan) -> bool:
    if not merge.needed:
        return False
    stale = merge.spec.output is not None and not merge.current
    return stale or any(t.state in (DIRTY, "pending") for t in merge.tasks.values())


def _settle(reads: deque, writes: deque) -> None:
    """After a failure or an interrupt: drop the reads not started, let the running ones and
    every queued write finish (a write half done must not be recorded as whole)."""
    for _, future in reads:
        future.cancel()
    for _, future in list(reads) + list(writes):
        if not future.cancelled():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - the first error is the one reported
                pass
