"""Digests: xxh3_128 per tensor (cache identity), sha256 per file (lineage, A1111 hashes).

A tensor's digest covers its dtype, shape and bytes, so equal digests mean equal tensors.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from mergebuild.portable import RandomAccess

CHUNK = 16 << 20
HASH_THREADS = max(2, min(8, os.cpu_count() or 2))


def tensor_digest(dtype: str, shape, data) -> str:
    h = xxhash.xxh3_128()
    h.update(f"{dtype}{list(shape)}".encode())
    h.update(data)
    return h.hexdigest()


def text_digest(text: str) -> str:
    return xxhash.xxh3_128(text.encode()).hexdigest()


def range_digest(f: RandomAccess, dtype: str, shape, begin: int, end: int) -> str:
    """The digest of a tensor stored at bytes [begin, end) of an open file (xxhash frees the GIL)."""
    h = xxhash.xxh3_128()
    h.update(f"{dtype}{list(shape)}".encode())
    buf = bytearray(min(CHUNK, end - begin))
    position = begin
    while position < end:
        view = memoryview(buf)[: min(CHUNK, end - position)]
        f.read_into(view, position)
        h.update(view)
        position += len(view)
    return h.hexdigest()


def digest_safetensors(path: Path, entries: dict) -> dict[str, str]:
    """Digest every tensor of a safetensors file in parallel, straight from its byte ranges."""
    with RandomAccess(path) as f, ThreadPoolExecutor(HASH_THREADS) as pool:
        names = list(entries)
        digests = pool.map(lambda n: range_digest(f, entries[n].dtype, entries[n].shape, entries[n].begin,
                                                  entries[n].end), names)
        return dict(zip(names, digests))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensor_data_sha256(path: Path) -> str:
    """sha256 of the bytes after a safetensors header: kohya's addnet hash, ModelSpec's hash_sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        f.seek(8 + length)
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash(path: Path) -> str:
    """A1111's old 8-hex model hash: sha256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def autov2(sha256: str) -> str:
    """CivitAI's / A1111's short hash: the first 10 hex characters of the file's sha256."""
    return sha256[:10]
