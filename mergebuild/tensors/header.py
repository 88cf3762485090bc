"""Parse a safetensors header without torch: names, dtypes, shapes, byte ranges, metadata.

We parse the header ourselves (8-byte little-endian length, then JSON) because planning needs each
tensor's byte range to hash it, and the safetensors library does not expose offsets.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mergebuild.dtypes import SAFETENSORS_DTYPES, nbytes
from mergebuild.errors import InputError

MAX_HEADER = 100_000_000  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors code: "F16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_offset: int


def read_header(path: Path) -> Header:
    """Read and validate the header of a safetensors file; raise InputError if it is not one."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "the file is shorter than a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER or 8 + length > size:
                raise _corrupt(path, f"header length {length} does not fit a file of {size} bytes")
            raw = f.read(length)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"the header is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, "the header is not a JSON object")
    data_offset = 8 + length
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not an object")
    tensors = {}
    for name, info in doc.items():
        tensors[name] = _entry(path, name, info, data_offset, size)
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_offset)


def _entry(path: Path, name: str, info, data_offset: int, size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, f"tensor {name!r} has no dtype, shape or data_offsets") from None
    if dtype not in SAFETENSORS_DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (0 <= begin <= end and data_offset + end <= size):
        raise _corrupt(path, f"tensor {name!r} lies outside the file (truncated?)")
    if end - begin != nbytes(dtype, shape):
        raise _corrupt(path, f"tensor {name!r}: {end - begin} bytes do not match {dtype}{list(shape)}")
    return TensorEntry(dtype, shape, data_offset + begin, data_offset + end)


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a valid safetensors file: {why}")
