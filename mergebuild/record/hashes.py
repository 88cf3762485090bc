"""The hashes users know a file by: sha256 (lineage, A1111), the sha256 of its tensor data
(kohya's addnet hash, ModelSpec's hash_sha256), A1111's old 8-hex hash and AutoV2."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mergebuild.portable import file_identity
from mergebuild.store.fingerprints import user_store

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


def known_hashes(path: Path) -> tuple[str | None, str | None]:
    """(sha256, tensor-data sha256) of the file as it is now, when the per-user store has them."""
    try:
        known = user_store().lookup(file_identity(path))
    except OSError:
        return None, None
    return (known.sha256, known.addnet) if known is not None else (None, None)


def remember_hashes(path: Path, before: tuple, sha256: str | None = None, data_sha256: str | None = None) -> None:
    """Keep hashes computed from the file whose identity was `before` (portable.file_identity,
    taken before reading it), if it still is that file: it did not change while being read."""
    try:
        if file_identity(path) != before:
            return
    except OSError:
        return
    if sha256 is not None:
        user_store().save_sha256(before, sha256)
    if data_sha256 is not None:
        user_store().save_addnet(before, data_sha256)


def remembered_sha256(path: Path) -> str:
    """file_sha256, computed once per file per machine (the per-user fingerprint store)."""
    before = file_identity(path)
    known = user_store().lookup(before)
    if known is not None and known.sha256 is not None:
        return known.sha256
    sha = file_sha256(path)
    remember_hashes(path, before, sha256=sha)
    return sha


def remembered_data_sha256(path: Path) -> str:
    """tensor_data_sha256, computed once per file per machine."""
    before = file_identity(path)
    known = user_store().lookup(before)
    if known is not None and known.addnet is not None:
        return known.addnet
    sha = tensor_data_sha256(path)
    remember_hashes(path, before, data_sha256=sha)
    return sha
