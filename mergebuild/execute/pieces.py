"""A big tensor of an elementwise method, a piece at a time.

Its inputs are read a piece (PIECE elements) at a time straight from their files, each piece is
computed chunk by chunk as any elementwise tensor is (Executor.chunks_into), and written into its
place in the output; the tensor's digest, its report statistics and its finite check follow the
pieces in order. So a build holds its windows (staging, write-behind), never whole copies of its
largest tensor: an LLM's 128k x 4096 embedding is 1 GB in bf16, and merging two of them held
three such copies at once. A piece is a whole number of chunks, so every chunk is computed
exactly as before: the bytes, the digest and the statistics are those of the whole-tensor pass.

Only tensors written into an output, whose inputs all lie in files (sources, committed outputs),
move in pieces: a blob in the cache is verified whole before it is used, and a result kept as a
blob is stored whole. The output's data hash reads such a tensor back from its file once written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from mergebuild.dtypes import is_float, itemsize, nbytes
from mergebuild.errors import BuildError
from mergebuild.execute.stats import RUN, RUNS, SAMPLE, run_step, sums
from mergebuild.planning.planner import CACHED, DIRTY, MergePlan, TensorTask
from mergebuild.planning.sources import TensorRef
from mergebuild.portable import ShortRead

PIECE = 16 << 20  # elements (32 MB of a 16-bit input): a whole number of the executor's chunks


@dataclass(frozen=True)
class Input:
    """Where one input's bytes lie: a source's byte range, or a cached tensor (a blob, or a
    tensor of a committed output or pack) whose digest the pieces' bytes must add up to."""

    dtype: str
    path: Path
    offset: int
    digest: str | None = None  # a cached tensor's: checked once its last piece is read
    blob: bool = False


@dataclass(eq=False)
class Whole:
    """What the pieces of one tensor share, updated on the main thread in order."""

    merge: MergePlan
    task: TensorTask
    inputs: list[Input]
    counted: list[bool]  # the inputs the statistics count (stats.sample_stats: the result's shape, floats)
    digest: object = None  # xxh3 over the result's bytes so far (store/hashing.tensor_digest's)
    checks: list = field(default_factory=list)  # xxh3 over each cached input's bytes so far
    samples: list = field(default_factory=list)  # per piece: the float64 runs of the result and each input in it
    written: list = field(default_factory=list)  # the futures of its pieces' writes
    bad: bool = False  # a cached input could not be read whole: the tensor is computed whole
    shown: tuple[int, int] = (0, 0)  # bytes written and read its pieces counted in the progress

    def __post_init__(self):
        self.digest = _hasher(self.task.dtype, self.task.shape)
        self.checks = [_hasher(i.dtype, self.task.shape) if i.digest else None for i in self.inputs]


def _hasher(dtype: str, shape):
    h = xxhash.xxh3_128()
    h.update(f"{dtype}{list(shape)}".encode())
    return h


@dataclass(eq=False)
class Piece:
    whole: Whole
    begin: int  # elements
    end: int

    @property
    def task(self) -> TensorTask:
        return self.whole.task

    @property
    def last(self) -> bool:
        return self.end == math.prod(self.task.shape)

    @property
    def nbytes(self) -> int:
        return (self.end - self.begin) * itemsize(self.task.dtype)


def split(executor, merge: MergePlan, task: TensorTask, sink) -> list[Piece] | None:
    """The pieces of a task, or None when it is computed whole."""
    n = math.prod(task.shape)
    if sink is None or task.state != DIRTY or n <= PIECE or not executor._chunked(task):
        return None
    refs = [executor.plan.ref(node, tensor) for node, tensor in task.inputs]
    if any(math.prod(r.shape) != n for r in refs):
        return None
    inputs = [_where(executor.cache, r) for r in refs]
    if any(i is None for i in inputs):
        return None  # in the remote tier only, or missing (it is healed on the whole path)
    counted = [tuple(r.shape) == tuple(task.shape) and is_float(r.dtype) for r in refs]
    whole = Whole(merge, task, inputs, counted)
    return [Piece(whole, i, min(i + PIECE, n)) for i in range(0, n, PIECE)]


def _where(cache, ref: TensorRef) -> Input | None:
    if ref.file is not None:
        return Input(ref.dtype, ref.file, ref.begin)
    if ref.digest is None:
        return None
    blob = cache.blobs.path(ref.digest)
    try:
        if blob.stat().st_size == nbytes(ref.dtype, ref.shape):
            return Input(ref.dtype, blob, 0, ref.digest, blob=True)
    except OSError:
        pass
    located = cache.locate(ref.digest)
    return Input(ref.dtype, Path(located[0]), located[1], ref.digest) if located else None


def footprint(executor, piece: Piece) -> int:
    """Its inputs in the compute dtype, as Executor._footprint counts a whole tensor's."""
    return (piece.end - piece.begin) * itemsize(executor.plan.compute_dtype) * len(piece.whole.inputs)


def fetch(executor, piece: Piece):
    """In a reader thread: the piece's part of every input, as stored, in buffers of the pool
    (None when a cached input cannot be read: the tensor is then computed whole)."""
    buffers = []
    with executor._lock:
        executor._pooled[id(piece)] = buffers  # given back by handle, whatever happens
    for i in piece.whole.inputs:
        size = itemsize(i.dtype)
        buf = executor.pool.take((piece.end - piece.begin) * size)
        buffers.append(buf)
        try:
            executor.files.read_into(i.path, i.offset + piece.begin * size, buf)
        except OSError as e:
            if i.digest is not None:  # a cached tensor gone bad: recomputed, never used
                executor.files.forget(i.path)
                piece.whole.bad = True
                return None
            if isinstance(e, ShortRead):
                raise BuildError(f"{i.path}: {e.strerror}; the source changed during the build, nothing from "
                                 "it was recorded") from None
            raise
    refs = [TensorRef(i.dtype, (piece.end - piece.begin,), None) for i in piece.whole.inputs]
    return executor.transfer.upload(buffers, refs, convert=False)


def handle(executor, piece: Piece, fetched, sink, writes) -> int:
    """On the main thread: compute the piece, queue its write; 1 once the tensor is done."""
    from mergebuild.tensors.convert import to_bytes
    from mergebuild.torchlazy import torch, torch_dtype

    task, whole = piece.task, piece.whole
    if not whole.bad:
        xs = executor.transfer.ready(fetched)
        for check, x in zip(whole.checks, xs):
            if check is not None:
                check.update(to_bytes(x))
        out = torch.empty(piece.end - piece.begin, dtype=torch_dtype(task.dtype))
        executor.chunks_into(task, xs, out, dict(task.params))
        whole.samples.append(_samples(piece, out, xs))
    executor._give_back(piece)
    if whole.bad or (piece.last and not _verified(executor, whole)):
        return _whole_again(executor, piece, sink, writes) if piece.last else 0
    data = to_bytes(out)
    whole.digest.update(data)
    digest = None
    if piece.last:
        digest = whole.digest.hexdigest()
        task.stats = _stats(whole)
    earlier = list(whole.written)
    future = executor.writers.submit(_write, executor, piece, data, sink, earlier, digest)
    whole.written.append(future)
    writes.append((piece.nbytes, future))
    read = sum((piece.end - piece.begin) * itemsize(i.dtype) for i in whole.inputs)
    executor.progress.advance(executor._merge_name, int(piece.last), piece.nbytes, read)
    whole.shown = (whole.shown[0] + piece.nbytes, whole.shown[1] + read)
    return int(piece.last)


def _verified(executor, whole: Whole) -> bool:
    """Every cached input's bytes, read piece by piece, were the tensor its digest names; a bad
    one is dropped from the cache (as Cache.get drops it) so that the whole path recomputes it."""
    good = True
    for i, check in zip(whole.inputs, whole.checks):
        if check is not None and check.hexdigest() == i.digest:
            with executor.cache._lock:  # counted as Cache.get counts a local read
                executor.cache.tier_stats.local_bytes_read += nbytes(i.dtype, whole.task.shape)
        elif check is not None:
            good = False
            executor.files.forget(i.path)  # a blob healed in its place is a new file
            if i.blob:
                i.path.unlink(missing_ok=True)
            else:
                executor.cache.forget_file(str(i.path))
    return good


def _whole_again(executor, piece: Piece, sink, writes) -> int:
    """A cached input was bad: once its pieces' writes are done, the tensor is fetched (healing
    the input) and computed whole, and its bytes overwrite what the pieces wrote (the progress
    counts only what the pieces did not)."""
    for future in piece.whole.written:
        future.result()
    task = piece.task
    return executor._handle(task, executor._fetch(piece.whole.merge, task, sink), sink, writes, piece.whole.shown)


def _write(executor, piece: Piece, data, sink, earlier: list, digest: str | None) -> None:
    """In a writer thread: the piece's bytes into their place; after the last one (and every
    earlier write: they were queued first, so none waits behind this one), the tensor is done."""
    task = piece.task
    sink.write_piece(task.name, data, piece.begin * itemsize(task.dtype))
    if digest is None:
        return
    for future in earlier:
        future.result()
    sink.finish_pieces(task.name, digest)
    executor.records.in_output(executor._merge_name, task, digest)
    task.digest, task.state = digest, CACHED


def _samples(piece: Piece, out, xs) -> list | None:
    """The parts of the statistics' subsample (stats.py: RUNS runs of RUN elements) in this piece."""
    from mergebuild.torchlazy import torch

    whole = piece.whole
    rows = [out] + [x for x, counted in zip(xs, whole.counted) if counted]
    if not out.is_floating_point() or len(rows) == 1:
        return None
    n = math.prod(whole.task.shape)
    runs = [(k * run_step(n), k * run_step(n) + RUN) for k in range(RUNS)] if n > SAMPLE else [(0, n)]
    parts = []
    for start, stop in runs:
        lo, hi = max(start, piece.begin), min(stop, piece.end)
        if lo < hi:
            parts.append((lo - piece.begin, hi - piece.begin))
    if not parts:
        return [torch.empty((len(rows), 0), dtype=torch.float64)]
    return [torch.stack([row[a:b].to(torch.float64) for row in rows]) for a, b in parts]


def _stats(whole: Whole) -> dict | None:
    from mergebuild.torchlazy import torch

    if any(s is None for s in whole.samples):
        return None
    matrix = torch.cat([p for s in whole.samples for p in s], dim=1)  # RUNS runs, in order
    nodes = [node for (node, _), counted in zip(whole.task.inputs, whole.counted) if counted]
    return sums(matrix[0], matrix[1:], nodes)

