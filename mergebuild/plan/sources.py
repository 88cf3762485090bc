"""Source models: their tensors' dtypes, shapes, locations and digests, fingerprinted by stat.

A safetensors source is hashed once, straight from its byte ranges, and remembered under
(path, size, mtime_ns, inode). A legacy pickled checkpoint is loaded once with weights_only=True
and its tensors are imported into the cache as blobs, so from then on it streams like the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.spec.model import ModelSpec
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import digest_safetensors
from mergebuild.tensors.header import read_header
from mergebuild.tensors.legacy import LEGACY_SUFFIXES


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
    stat: os.stat_result
    sha256: str | None  # known when fingerprinted before; else computed during the build

    @property
    def path(self) -> Path:
        return self.spec.path


def load_source(spec: ModelSpec, cache: Cache, table: str) -> Source:
    try:
        stat = os.stat(spec.path)
    except FileNotFoundError:
        raise InputError(f"[{table}] path: file not found: {spec.path}") from None
    except OSError as e:
        raise InputError(f"[{table}] path: cannot read {spec.path}: {e.strerror}") from None
    if spec.path.suffix.lower() in LEGACY_SUFFIXES:
        return _legacy_source(spec, cache, stat)
    header = read_header(spec.path)
    known = cache.index.fingerprint(str(spec.path), stat)
    if known is None:
        digests = digest_safetensors(spec.path, header.tensors)
        table_ = {n: (e.dtype, list(e.shape), digests[n]) for n, e in header.tensors.items()}
        cache.index.save_fingerprint(str(spec.path), stat, table_, None)
        sha256 = None
    else:
        table_, sha256 = known
    tensors = {
        n: TensorRef(e.dtype, e.shape, table_[n][2], spec.path, e.begin) for n, e in header.tensors.items()
    }
    return Source(spec, tensors, header.metadata, stat, sha256)


def _legacy_source(spec: ModelSpec, cache: Cache, stat) -> Source:
    known = cache.index.fingerprint(str(spec.path), stat)
    if known is not None and all(cache.blobs.has(t[2]) for t in known[0].values()):
        table, sha256 = known
    else:
        table, sha256 = _import_legacy(spec.path, cache), None
        cache.index.save_fingerprint(str(spec.path), stat, table, None)
    tensors = {n: TensorRef(dt, tuple(shape), d) for n, (dt, shape, d) in table.items()}
    return Source(spec, tensors, {}, stat, sha256)


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
