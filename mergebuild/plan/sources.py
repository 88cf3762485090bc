"""Source models: their tensors' dtypes, shapes, locations and digests, fingerprinted by stat.

A safetensors source is hashed once, straight from its byte ranges, and remembered under
(path, size, mtime_ns, inode). A legacy pickled checkpoint is loaded once with weights_only=True
and its tensors are imported into the cache as blobs, so from then on it streams like the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.spec.model import ModelSpec
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import digest_safetensors
from mergebuild.tensors.header import read_header
from mergebuild.tensors.legacy import LEGACY_SUFFIXES

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes are: a byte range of a file, or (file None) a blob in the cache."""

    dtype: str
    shape: tuple[int, ...]
    digest: str | None  # None: not known yet (an upstream tensor still to compute)
    file: Path | None = None
    begin: int = 0


@dataclass
class Source:
    spec: ModelSpec
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]
    stat: os.stat_result  # of hash_file
    sha256: str | None  # of hash_file; known when fingerprinted before, else computed during the build
    hash_file: Path  # the file that identifies the source: itself, or a folder's index / only shard
    parts: list[tuple[Path, os.stat_result]] = field(default_factory=list)  # every file read
    addnet_hash: str | None = None  # sha256 of the tensor data (kohya's hash), for LoRA inputs

    @property
    def path(self) -> Path:
        return self.spec.path

    def stats(self) -> list:
        """(path, size, mtime_ns) of every file: what explain compares between builds."""
        return [[str(p), st.st_size, st.st_mtime_ns] for p, st in self.parts]


def load_source(spec: ModelSpec, cache: Cache, table: str) -> Source:
    if spec.path.is_dir():
        return _folder_source(spec, cache, table)
    stat = _stat(spec.path, table)
    if spec.path.suffix.lower() in LEGACY_SUFFIXES:
        return _legacy_source(spec, cache, stat)
    tensors, metadata, sha256 = _safetensors(spec.path, stat, cache)
    return Source(spec, tensors, metadata, stat, sha256, spec.path, [(spec.path, stat)])


def _stat(path: Path, table: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise InputError(f"[{table}] path: file not found: {path}") from None
    except OSError as e:
        raise InputError(f"[{table}] path: cannot read {path}: {e.strerror}") from None


def _safetensors(path: Path, stat, cache: Cache) -> tuple[dict[str, TensorRef], dict, str | None]:
    header = read_header(path)
    known = cache.index.fingerprint(str(path), stat)
    if known is None:
        digests = digest_safetensors(path, header.tensors)
        table = {n: (e.dtype, list(e.shape), digests[n]) for n, e in header.tensors.items()}
        cache.index.save_fingerprint(str(path), stat, table, None)
        sha256 = None
    else:
        table, sha256 = known
    tensors = {n: TensorRef(e.dtype, e.shape, table[n][2], path, e.begin) for n, e in header.tensors.items()}
    return tensors, header.metadata, sha256


def _folder_source(spec: ModelSpec, cache: Cache, table: str) -> Source:
    """A Hugging Face model folder: one safetensors file, or shards listed by an index."""
    folder = spec.path
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise InputError(f"[{table}] path: {folder} holds no .safetensors files")
    tensors: dict[str, TensorRef] = {}
    metadata: dict = {}
    parts = []
    for shard in shards:
        path = folder / shard
        stat = _stat(path, table)
        found, meta, _ = _safetensors(path, stat, cache)
        for name in found.keys() & tensors.keys():
            raise InputError(f"{folder}: tensor {name!r} is in two shards")
        tensors.update(found)
        metadata = metadata or meta
        parts.append((path, stat))
    hash_file = index if index.exists() else folder / shards[0]
    stat = os.stat(hash_file)
    known = cache.index.fingerprint(str(hash_file), stat)
    return Source(spec, tensors, metadata, stat, known[1] if known else None, hash_file, parts)


def _legacy_source(spec: ModelSpec, cache: Cache, stat) -> Source:
    known = cache.index.fingerprint(str(spec.path), stat)
    if known is not None and all(cache.blobs.has(t[2]) for t in known[0].values()):
        table, sha256 = known
    else:
        table, sha256 = _import_legacy(spec.path, cache), None
        cache.index.save_fingerprint(str(spec.path), stat, table, None)
    tensors = {n: TensorRef(dt, tuple(shape), d) for n, (dt, shape, d) in table.items()}
    return Source(spec, tensors, {}, stat, sha256, spec.path, [(spec.path, stat)])


def _import_legacy(path: Path, cache: Cache) -> dict:
    from mergebuild.store.hashing import tensor_digest
    from mergebuild.tensors.convert import code_of, to_bytes
    from mergebuild.tensors.legacy import load_legacy

    table = {}
    for name, tensor in load_legacy(path).items():
        try:
            dtype = code_of(tensor)
        except KeyError:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}") from None
        data = to_bytes(tensor)
        digest = tensor_digest(dtype, tuple(tensor.shape), data)
        cache.blobs.put(digest, data)
        table[name] = (dtype, list(tensor.shape), digest)
    return table
