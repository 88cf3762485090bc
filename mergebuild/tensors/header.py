"""Parse a safetensors header without torch: names, dtypes, shapes, byte ranges, metadata.

We parse the header ourselves (8-byte little-endian length, then JSON) because planning needs each
tensor's byte range to hash it, and the safetensors library does not expose offsets.

The rules are those of safetensors' own loader (read_metadata and Metadata::validate in its
tensor.rs, then torch for get_tensor), so that a file we accept is one safetensors loads, tensor for
tensor: strict UTF-8, strict JSON as serde_json reads it (no NaN, no -0, no lone surrogate escapes),
`__metadata__` absent, null or a string->string map, each tensor an object with dtype, shape
(integers up to torch's int64) and data_offsets (two u64 integers), a byte size equal to
shape x itemsize without u64 overflow, and tensors that, sorted by offset, tile the data exactly up
to the end of the file. We are stricter where safetensors silently resolves something a later
writer could get wrong, or that mergebuild cannot compute in: duplicate JSON keys (safetensors keeps
the last), fields beyond those three (safetensors ignores them), and dtypes without a torch mapping.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from mergebuild.dtypes import SAFETENSORS_DTYPES
from mergebuild.errors import InputError

MAX_HEADER = 100_000_000  # the safetensors format's own limit

_U64 = 2**64 - 1  # safetensors sizes are usize: larger numbers fail to parse or overflow
_MAX_DIM = 2**63 - 1  # and torch sizes are int64: get_tensor refuses larger dims (of empty tensors)
_FIELDS = frozenset(("dtype", "shape", "data_offsets"))
# safetensors knows these, but mergebuild has no torch mapping or arithmetic for them
_UNSUPPORTED = frozenset(("C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"))
_ITEMSIZE = {code: size for code, (size, _) in SAFETENSORS_DTYPES.items()}
_INT = frozenset((int,))
# where a JSON number -0 could be: after [ : or , (a date's "-0" in a string is not one)
_MINUS_ZERO = re.compile(r"[\[:,]\s*-0")


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
    raw, size = _read_prefix(path)
    data_offset = 8 + len(raw)
    doc = _parse(path, raw)
    metadata = _metadata(path, doc.pop("__metadata__", None))
    tensors = {name: _entry(path, name, info, data_offset) for name, info in doc.items()}
    _check_layout(path, tensors, data_offset, size)
    return Header(path, tensors, metadata, data_offset)


def read_metadata(path: Path) -> dict[str, str]:
    """The __metadata__ of a safetensors file, checked as read_header checks it, the tensor
    entries left unchecked: what says who wrote a file, at about half the cost."""
    raw, _size = _read_prefix(path)
    return _metadata(path, _parse(path, raw).pop("__metadata__", None))


def _read_prefix(path: Path) -> tuple[bytes, int]:
    """The raw header bytes and the file size, after the length-prefix checks."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"the file is shorter than a header ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER:
                raise _corrupt(path, f"header length {length} does not fit the format's limit of {MAX_HEADER} bytes")
            if 8 + length > size:
                raise _corrupt(path, f"header length {length} does not fit a file of {size} bytes")
            raw = f.read(length)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) < length:  # the file shrank while we read it
        raise _corrupt(path, f"header length {length} does not fit the file")
    return raw, size


class _Duplicate(Exception):
    pass


def _unique(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Duplicate
    return d


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; JSON does not


def _int(token: str) -> int:
    if token == "-0":  # serde_json reads -0 as a float, which no size accepts; Python as int 0
        raise ValueError("-0 is not an unsigned integer")
    return int(token)


def _parse(path: Path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")  # strict: json.loads(bytes) would also take UTF-16 and surrogates
    except UnicodeDecodeError as e:
        raise _corrupt(path, f"the header is not UTF-8 (bad byte at {8 + e.start})") from None
    try:
        # a number -0 only in rare headers: then pay for a hook on every integer
        ints = {"parse_int": _int} if "-0" in text and _MINUS_ZERO.search(text) else {}
        doc = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant, **ints)
    except _Duplicate:
        raise _corrupt(path, _duplicate(text)) from None
    except RecursionError:
        raise _corrupt(path, "the header is not JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing thousands of digits
        raise _corrupt(path, f"the header is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, "the header is not a JSON object")
    if "\\u" in text:  # only escapes can smuggle lone surrogates, which serde_json refuses
        _check_surrogates(path, doc)
    return doc


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, to find which one repeats a key."""


def _duplicate(text: str) -> str:
    """Say where a key repeats (only on the error path, so a second parse is fine)."""
    try:
        doc = json.loads(text, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, _Pairs):
        if (key := _repeated(doc)) is not None:
            return "__metadata__ appears twice in the header" if key == "__metadata__" \
                else f"tensor {key!r} appears twice in the header"
        for name, value in doc:
            if isinstance(value, _Pairs) and (key := _repeated(value)) is not None:
                return f"__metadata__ has key {key!r} twice" if name == "__metadata__" \
                    else f"tensor {name!r} has field {key!r} twice"
    return "a JSON object in the header repeats a key"


def _repeated(pairs: list):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def _check_surrogates(path: Path, doc: dict) -> None:
    metadata = doc.get("__metadata__")
    strings = list(doc)
    if isinstance(metadata, dict):
        strings += [s for kv in metadata.items() for s in kv if isinstance(s, str)]
    for s in strings:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _corrupt(path, f"the header is not JSON (lone surrogate escape in {_show(s)})") from None


def _metadata(path: Path, metadata) -> dict[str, str]:
    if metadata is None:  # safetensors reads a null __metadata__ as none
        return {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, f"__metadata__ is not an object, got {_show(metadata)}")
    for key, value in metadata.items():
        if type(value) is not str:
            raise _corrupt(path, f"__metadata__ value of {key!r} is not a string, got {_show(value)}")
    return metadata


def _entry(path: Path, name: str, info, data_offset: int) -> TensorEntry:
    """A handful of checks on the common path; _reject explains whichever one failed."""
    if type(info) is not dict or info.keys() != _FIELDS:
        raise _reject(path, name, info)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    size = _ITEMSIZE.get(dtype) if type(dtype) is str else None
    # type() is exact: JSON true/false are bools, which are ints to isinstance
    if size is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        raise _reject(path, name, info)
    begin, end = offsets
    if (type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= _U64
            or not _INT.issuperset(map(type, shape)) or (shape and not 0 <= min(shape) <= max(shape) <= _MAX_DIM)):
        raise _reject(path, name, info)
    count = math.prod(shape) if len(shape) <= 8 else None  # a long shape could make prod() crawl
    if count is None or count == 0 or count > _U64:
        count = _checked_count(shape)
    if count is None or count * size * 8 > _U64 or end - begin != count * size:
        raise _reject(path, name, info)
    return TensorEntry(dtype, tuple(shape), data_offset + begin, data_offset + end)


def _reject(path: Path, name: str, info) -> InputError:
    """Why an entry failed _entry's checks, in the order they run."""
    if type(info) is not dict:
        return _corrupt(path, f"tensor {name!r} is not an object, got {_show(info)}")
    missing, extra = sorted(_FIELDS - info.keys()), sorted(info.keys() - _FIELDS)
    if missing:
        return _corrupt(path, f"tensor {name!r} has no {', '.join(missing)}")
    if extra:
        return _corrupt(path, f"tensor {name!r} has unexpected field {', '.join(map(repr, extra))}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str or dtype not in _ITEMSIZE:
        why = "which mergebuild does not support" if type(dtype) is str and dtype in _UNSUPPORTED else "which is unknown"
        return _corrupt(path, f"tensor {name!r} has dtype {_show(dtype)}, {why}")
    if type(shape) is not list or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        return _corrupt(path, f"tensor {name!r} has shape {_show(shape)}, not a list of integers in 0..2**63-1")
    if (type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= _U64):
        return _corrupt(path, f"tensor {name!r} has data_offsets {_show(offsets)}, not [begin, end] with 0 <= begin <= end")
    count = _checked_count(shape)
    if count is None or count * _ITEMSIZE[dtype] * 8 > _U64:  # safetensors counts bits in a usize
        return _corrupt(path, f"tensor {name!r}: shape {_show(shape)} overflows a 64-bit byte count")
    return _corrupt(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not match {dtype}{_show(shape)}")


def _checked_count(shape: list) -> int | None:
    """The element count as safetensors computes it: left to right with checked_mul, so an
    overflow is an error even when a later dimension is 0. None on overflow."""
    n = 1
    for d in shape:
        n *= d
        if n > _U64:
            return None
    return n


def _check_layout(path: Path, tensors: dict[str, TensorEntry], data_offset: int, size: int) -> None:
    """Sorted by offset, the tensors must tile the data from its start to the end of the file."""
    pos, previous = data_offset, None
    for begin, end, name in sorted((t.begin, t.end, n) for n, t in tensors.items()):
        if begin < pos:
            raise _corrupt(path, f"tensor {name!r} overlaps tensor {previous!r}")
        if begin > pos:
            raise _corrupt(path, f"bytes {pos - data_offset}..{begin - data_offset} of the data, before "
                                 f"tensor {name!r}, belong to no tensor")
        pos, previous = end, name
    if pos > size:
        # the phrase first: the CLI wraps long lines, and paths and names can be long
        raise _corrupt(path, f"the data lies outside the file (truncated?): tensor {previous!r} ends at byte "
                             f"{pos}, the file has {size}")
    if pos < size:
        raise _corrupt(path, f"{size - pos} trailing byte{'s' if size - pos > 1 else ''} after the last tensor")


def _show(value, limit: int = 60) -> str:
    """A short repr for messages: header values can be huge or deeply nested."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a valid safetensors file: {why}")
