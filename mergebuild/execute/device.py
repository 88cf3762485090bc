"""Devices: which one to compute on, and how tensors get there and back.

CPU: reader threads turn bytes into compute-dtype tensors (the dtype conversion overlaps with
compute on the main thread). CUDA: reader threads stage bytes in pinned host memory and copy
them on a separate stream; the main thread waits on an event, computes on the default stream,
and starts the copy back into pinned memory; writer threads wait for it before hashing. So
reading, both transfers, compute and writing overlap. Importing this module does not import
torch; calling it does.
"""

from __future__ import annotations

from mergebuild.errors import UsageError
from mergebuild.tensors.convert import from_bytes
from mergebuild.torchlazy import torch, torch_dtype


def resolve_device(name: str):
    """auto -> cuda when available, else cpu; a cuda request without CUDA is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def make_transfer(name: str, compute_dtype: str):
    device = resolve_device(name)
    return CudaTransfer(device, compute_dtype) if device.type == "cuda" else CpuTransfer(device, compute_dtype)


class CpuTransfer:
    chunks = True  # elementwise methods may run on chunks (see Executor._compute_chunked)

    def __init__(self, device, compute_dtype: str):
        self.device = device
        self.compute_dtype = torch_dtype(compute_dtype)

    def upload(self, buffers, refs, convert: bool = True):
        """In a reader thread: input tensors in the compute dtype (or as stored), on the device."""
        tensors = [from_bytes(b, r.dtype, r.shape) for b, r in zip(buffers, refs)]
        return [t.to(self.compute_dtype) for t in tensors] if convert else tensors

    def ready(self, uploaded):
        """On the main thread: the tensors, once they can be used."""
        return uploaded

    def download(self, result, dtype: str):
        """On the main thread: start moving a result back, cast to its dtype."""
        return result.to(torch_dtype(dtype))

    def fetch(self, handle):
        """In a writer thread: the result on the CPU."""
        return handle


class CudaTransfer(CpuTransfer):
    chunks = False

    def __init__(self, device, compute_dtype: str):
        super().__init__(device, compute_dtype)
        self.copy_stream = torch.cuda.Stream(device)

    def upload(self, buffers, refs, convert: bool = True):
        tensors = []
        with torch.cuda.stream(self.copy_stream):
            for b, r in zip(buffers, refs):
                pinned = torch.empty(len(b), dtype=torch.uint8, pin_memory=True)
                if len(b):
                    pinned.copy_(torch.frombuffer(b, dtype=torch.uint8))
                raw = pinned.to(self.device, non_blocking=True)
                tensors.append(raw.view(torch_dtype(r.dtype)).reshape(r.shape).to(self.compute_dtype))
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return tensors, event

    def ready(self, uploaded):
        tensors, event = uploaded
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for t in tensors:
            t.record_stream(stream)  # memory made on the copy stream is used on this one
        return tensors

    def download(self, result, dtype: str):
        out = result.to(torch_dtype(dtype))
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def fetch(self, handle):
        host, event = handle
        event.synchronize()
        return host
