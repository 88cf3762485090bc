"""Turn raw bytes into torch tensors and back, with no copies where torch allows."""

from __future__ import annotations

import warnings

from mergebuild.torchlazy import dtype_code, torch, torch_dtype


def from_bytes(data, dtype: str, shape: tuple[int, ...]):
    """A tensor viewing `data` (a bytearray, or a read-only view of a mapped file: the tensor
    is then only read, never written; methods are pure)."""
    if len(data) == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch_dtype(dtype)).reshape(shape)


def to_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, as a memoryview (no copy when contiguous)."""
    t = tensor.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def code_of(tensor) -> str:
    return dtype_code(tensor.dtype)
