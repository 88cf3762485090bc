"""The hashes users know a file by: sha256 (lineage, A1111), the sha256 of its tensor data
(kohya's addnet hash, ModelSpec's hash_sha256), A1111's old 8-hex hash and AutoV2."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 16 << 20


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
