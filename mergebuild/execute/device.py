"""Devices: which one to compute on, and how tensors get there and back.

CPU: reader threads turn bytes into compute-dtype tensors (the dtype conversion overlaps with
compute on the main thread). CUDA: reader threads stage bytes in pinned host memory and copy
them on a separate stream; the main thread waits on an event, computes on the default stream,
and starts the copy back into pinned memory; writer threads wait for it before hashing. So
reading, both transfers, compute and writing overlap. A batch of small tensors (batching.py)
travels as one staging buffer per input: one copy each way for the lot. Importing this module
does not import torch; calling it does.
"""

from __future__ import annotations

import os

from mergebuild.dtypes import FLOAT8_MAX
from mergebuild.errors import UsageError
from mergebuild.execute.casting import cast
from mergebuild.portable import usable_cores
from mergebuild.tensors.convert import from_bytes
from mergebuild.torchlazy import torch, torch_dtype

BIG_PIECE = 1 << 20  # bytes: larger pieces are staged by torch, smaller ones by a plain memory copy


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str, compute_dtype: str = "F32"):
    """auto -> CUDA, then MPS (Apple silicon; not for float64, which it lacks), then the CPU.
    A device this build of torch does not have is a usage error (exit 2)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available() and compute_dtype != "F64":
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} asked for, but CUDA is not available here")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    if name == "mps":
        if not _mps_available():
            raise UsageError("device 'mps' asked for, but MPS (Apple silicon, macOS 12.3 or later) is not available here")
        if compute_dtype == "F64":
            raise UsageError("MPS has no float64: use compute_dtype = \"float32\" there, or --device cpu")
    return torch.device(name)


def make_transfer(name: str, compute_dtype: str):
    device = resolve_device(name, compute_dtype)
    if device.type == "cuda":
        return CudaTransfer(device, compute_dtype)
    if device.type == "cpu":
        return CpuTransfer(device, compute_dtype)
    return DeviceTransfer(device, compute_dtype)


def compute_threads(cores: int, elementwise: bool, default: int) -> int:
    """torch's threads for a merge on the CPU. An elementwise merge streams: the readers, the
    writers and the hashers need cores as much as the method does, and an op split over more
    threads than are free waits at its end for the one that is not running; it gets the cores
    less two, at least one (on 2 cores, with the other core busy, a 5 x 64K float64 product took
    7.8 ms on 2 threads against 0.26 ms on one). A whole-tensor method (TIES, DARE, re-basin) is compute-bound:
    torch's own default."""
    return max(1, cores - 2) if elementwise else default


def _threads_set_by_user() -> bool:
    return any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


class CpuTransfer:
    chunks = True  # elementwise methods may run on chunks (see Executor._compute_chunked)

    def __init__(self, device, compute_dtype: str):
        self.device = device
        self.compute_dtype = torch_dtype(compute_dtype)
        self._threads_before = None
        if device.type == "cpu" and not _threads_set_by_user():
            self._threads_before = torch.get_num_threads()

    def use_threads(self, elementwise: bool) -> None:
        """Before a merge's tensors: torch's threads for its kind of method (compute_threads)."""
        if self._threads_before is not None:
            wanted = compute_threads(usable_cores(), elementwise, self._threads_before)
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)

    def close(self) -> None:
        """The build is over: torch's threads as they were (an API caller's process goes on)."""
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def upload(self, buffers, refs, convert: bool = True):
        """In a reader thread: input tensors in the compute dtype (or as stored), on the device."""
        tensors = [from_bytes(b, r.dtype, r.shape) for b, r in zip(buffers, refs)]
        return [t.to(self.compute_dtype) for t in tensors] if convert else tensors

    def upload_batch(self, buffers, refs):
        """In a reader thread: for each input position, the tensors of every task of a batch
        end to end, as one flat tensor in the compute dtype. buffers[i][j] holds task i's input
        j; refs the same shape; position j has one dtype in the whole batch."""
        return [self._column([b[j] for b in buffers], refs[0][j].dtype) for j in range(len(refs[0]))]

    def _column(self, pieces, dtype: str):
        """The pieces' bytes gathered into one staging buffer, on the device, in the compute dtype."""
        raw = self._staging(sum(len(p) for p in pieces))
        view, offset = memoryview(raw.numpy()), 0
        for piece in pieces:
            if len(piece) > BIG_PIECE:  # torch copies without holding the GIL
                raw[offset : offset + len(piece)].copy_(from_bytes(piece, "U8", (len(piece),)))
            else:
                view[offset : offset + len(piece)] = piece
            offset += len(piece)
        return self._to_device(raw).view(torch_dtype(dtype)).to(self.compute_dtype)

    def _staging(self, size: int):
        return torch.empty(size, dtype=torch.uint8)

    def _to_device(self, raw):
        return raw

    def ready(self, uploaded):
        """On the main thread: the tensors, once they can be used."""
        return uploaded

    def download(self, result, dtype: str):
        """On the main thread: start moving a result back, cast to its dtype (casting.py)."""
        return cast(result, dtype)

    def fetch(self, handle):
        """In a writer thread: the result on the CPU."""
        return handle


class DeviceTransfer(CpuTransfer):
    """Another accelerator (MPS): inputs are converted on the CPU and copied over, results
    copied back; torch orders the work on the device."""

    chunks = False

    def upload(self, buffers, refs, convert: bool = True):
        return [t.to(self.device) for t in super().upload(buffers, refs, convert=True)]

    def _to_device(self, raw):
        return raw.to(self.device)

    def download(self, result, dtype: str):
        if dtype in FLOAT8_MAX:  # MPS has no float8: cast after the copy back
            return cast(result.to("cpu"), dtype)
        return cast(result, dtype).to("cpu")


class CudaTransfer(CpuTransfer):
    chunks = False

    def __init__(self, device, compute_dtype: str):
        super().__init__(device, compute_dtype)
        self.copy_stream = torch.cuda.Stream(device)

    def upload(self, buffers, refs, convert: bool = True):
        with torch.cuda.stream(self.copy_stream):
            tensors = [self._column([b], r.dtype).reshape(r.shape) for b, r in zip(buffers, refs)]
            return tensors, self._recorded(self.copy_stream)

    def upload_batch(self, buffers, refs):
        with torch.cuda.stream(self.copy_stream):
            return super().upload_batch(buffers, refs), self._recorded(self.copy_stream)

    def _staging(self, size: int):
        # pinned, so the copy to the device is asynchronous; the caching host allocator keeps a
        # block from reuse until the copies recorded on it are done
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def _to_device(self, raw):
        return raw.to(self.device, non_blocking=True)

    @staticmethod
    def _recorded(stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def ready(self, uploaded):
        tensors, event = uploaded
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for t in tensors:
            t.record_stream(stream)  # memory made on the copy stream is used on this one
        return tensors

    def download(self, result, dtype: str):
        out = cast(result, dtype)
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        return host, self._recorded(torch.cuda.current_stream(self.device))

    def fetch(self, handle):
        host, event = handle
        event.synchronize()
        return host
