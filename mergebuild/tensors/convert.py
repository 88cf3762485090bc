"""Turn raw bytes into torch tensors and back, with no copies where torch allows."""

from __future__ import annotations

from mergebuild.torchlazy import dtype_code, torch, torch_dtype


def from_bytes(data, dtype: str, shape: tuple[int, ...]):
    """A tensor viewing `data` (a writable buffer: bytearray or similar)."""
    if len(data) == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    return torch.frombuffer(data, dtype=torch_dtype(dtype)).reshape(shape)


def to_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, as a memoryview (no copy when contiguous)."""
    t = tensor.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def code_of(tensor) -> str:
    return dtype_code(tensor.dtype)
