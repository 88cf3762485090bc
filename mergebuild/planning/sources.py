"""Source models: their tensors' dtypes, shapes, locations and digests, fingerprinted by stamp.

A safetensors source is hashed once, straight from its byte ranges, and remembered under its
stamp (size, mtime_ns, ctime_ns, inode). A source whose tensors must be converted to be merged
is imported into the cache as blobs once, tensor by tensor, so from then on it streams like the
rest: a legacy pickled checkpoint (loaded with weights_only=True), a GGUF (tensors/gguf.py), and
the scaled weights of a ComfyUI scaled-fp8 safetensors file (tensors/scaled_fp8.py). Sources are
verified, not trusted: `changed_parts` re-checks every file before anything computed from it is
recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from mergebuild.errors import BuildError, InputError
from mergebuild.portable import file_stamp, is_regular_file
from mergebuild.mergefile.model import ModelSpec
from mergebuild.methods import peft
from mergebuild.store.cache import Cache
from mergebuild.store.fingerprints import identity, user_store
from mergebuild.store.hashing import digest_safetensors, tensor_digest, text_digest
from mergebuild.tensors import gguf, scaled_fp8
from mergebuild.tensors.header import read_header
from mergebuild.tensors.legacy import LEGACY_SUFFIXES

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MAX_CONFIG = 16 << 20  # bytes: a config.json larger than this is not one


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
    stamp: tuple  # of hash_file
    sha256: str | None  # of hash_file; known when fingerprinted before, else computed during the build
    hash_file: Path  # the file that identifies the source: itself, or a folder's index / only shard
    content: str  # identity of what the source holds: every tensor's digest and the metadata
    parts: list[tuple[Path, tuple]] = field(default_factory=list)  # every file read, with its stamp
    addnet_hash: str | None = None  # sha256 of the tensor data (kohya's hash), for LoRA inputs
    notes: list[str] = field(default_factory=list)  # what reading it left out or kept as it was
    # a model folder's config.json (None: a file, or a folder without a readable one): detection
    # reads its model_type, methods that change the layers (passthrough) the per-layer settings
    config: dict | None = None
    # a PEFT adapter folder's adapter_config.json (methods/peft.py reads it): its modules' scales
    adapter: dict | None = None

    @property
    def path(self) -> Path:
        return self.spec.path

    def size(self) -> int:
        return sum(s[0] for _, s in self.parts)

    def changed_parts(self) -> list[Path]:
        """The files of this source that are no longer as they were when planned."""
        out = []
        for path, before in self.parts:
            try:
                now = file_stamp(path)
            except OSError:
                now = None
            if now != before:
                out.append(path)
        return out


def load_source(spec: ModelSpec, cache: Cache, table: str) -> Source:
    source = _load_source(spec, cache, table)
    if source.sha256 is None:  # hashed by another project or cache on this machine?
        known = user_store().lookup(identity(source.hash_file, source.stamp))
        source.sha256 = known.sha256 if known is not None else None
    return source  # a store that cannot be used is one warning of the build's (project.check_headers)


def remember_sha256(source: Source, cache: Cache, sha256: str) -> None:
    """A source's sha256, just computed: kept in the cache's index and the per-user store."""
    source.sha256 = sha256
    cache.index.save_sha256(str(source.hash_file), source.stamp, sha256)
    user_store().save_sha256(identity(source.hash_file, source.stamp), sha256)


def remember_written(path: Path, tensors: list[tuple[str, str, tuple]], digests: dict[str, str],
                     metadata: dict[str, str]) -> None:
    """An output file just committed: its fingerprint from the digests the build computed as it
    wrote them, so a Mergefile that reads it as a source (the next generation) does not hash it."""
    if any(name not in digests for name, _, _ in tensors):
        return
    try:
        st = file_stamp(path)
    except OSError:
        return
    table = {name: (dtype, list(shape), digests[name]) for name, dtype, shape in tensors}
    user_store().save_tensors(identity(path, st), table, _content(table, metadata))


def _load_source(spec: ModelSpec, cache: Cache, table: str) -> Source:
    if spec.path.is_dir():
        return _folder_source(spec, cache, table)
    st = _stat(spec.path, table)
    suffix = spec.path.suffix.lower()
    if suffix in LEGACY_SUFFIXES:
        return _imported_source(spec, cache, st, _legacy_import)
    if suffix == gguf.GGUF_SUFFIX:
        return _imported_source(spec, cache, st, _gguf_import, gguf.READER)
    tensors, metadata, sha256, content = _safetensors(spec.path, st, cache)
    source = Source(spec, tensors, metadata, st, sha256, spec.path, content, [(spec.path, st)])
    layout = scaled_fp8.scaled_layout(spec.path, tensors)
    return _scaled_source(source, layout, cache) if layout else source


def _stat(path: Path, table: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"[{table}] path: file not found: {path}") from None
    except OSError as e:
        raise InputError(f"[{table}] path: cannot read {path}: {e.strerror}") from None
    if not is_regular_file(st):
        raise InputError(f"[{table}] path: {path} is not a regular file (a pipe, device or socket cannot be "
                         "a model: reading it could hang or never end)")
    return file_stamp(path)


def _safetensors(path: Path, st: tuple, cache: Cache) -> tuple[dict[str, TensorRef], dict, str | None, str]:
    header = read_header(path)
    known = cache.index.fingerprint(str(path), st) or _shared_fingerprint(path, st, header, cache)
    if known is None:
        digests = digest_safetensors(path, header.tensors)
        if _stat(path, "models") != st:  # rewritten while it was being hashed
            raise BuildError(f"{path}: the file changed while it was being read; run the build again "
                             "once nothing writes to it")
        table = {n: (e.dtype, list(e.shape), digests[n]) for n, e in header.tensors.items()}
        content = _content(table, header.metadata)
        cache.index.save_fingerprint(str(path), st, table, content, None)
        user_store().save_tensors(identity(path, st), table, content)
        sha256 = None
    else:
        table, content, sha256 = known
    tensors = {n: TensorRef(e.dtype, e.shape, table[n][2], path, e.begin) for n, e in header.tensors.items()}
    return tensors, header.metadata, sha256, content


def _shared_fingerprint(path: Path, st: tuple, header, cache: Cache) -> tuple[dict, str, str | None] | None:
    """What the per-user store knows of this file in this state (another project or cache hashed
    it), copied into this cache's index; None when it knows nothing that fits the header."""
    known = user_store().lookup(identity(path, st))
    if known is None or known.tensors is None or known.tensors.keys() != header.tensors.keys():
        return None
    if any(known.tensors[n][:2] != [e.dtype, list(e.shape)] for n, e in header.tensors.items()):
        return None
    cache.index.save_fingerprint(str(path), st, known.tensors, known.content, known.sha256)
    return known.tensors, known.content, known.sha256


def _content(table: dict, metadata: dict) -> str:
    return text_digest(json.dumps([sorted(table.items()), sorted(metadata.items())], separators=(",", ":")))


def _folder_source(spec: ModelSpec, cache: Cache, table: str) -> Source:
    """A Hugging Face model folder: one safetensors file, or shards listed by an index; or a PEFT
    adapter folder (adapter_config.json beside adapter_model.safetensors)."""
    folder = spec.path
    index = folder / INDEX_NAME
    adapter = _read_adapter(folder, table)
    if adapter is not None:
        shards = [peft.WEIGHTS_NAME]
    else:
        shards = _index_shards(index, folder) if index.exists() else sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise InputError(f"[{table}] path: {folder} holds no .safetensors files")
    tensors: dict[str, TensorRef] = {}
    metadata: dict = {}
    parts, contents = [], []
    for shard in shards:
        path = folder / shard
        st = _stat(path, table)
        found, meta, _, content = _safetensors(path, st, cache)
        if any(scaled_fp8.is_marker(n) for n in found):
            raise InputError(f"{path}: a ComfyUI scaled-fp8 shard; mergebuild reads scaled fp8 as a single file "
                             "(name the file as the source)")
        for name in found.keys() & tensors.keys():
            raise InputError(f"{folder}: tensor {name!r} is in two shards")
        tensors.update(found)
        metadata = metadata or meta
        parts.append((path, st))
        contents.append(content)
    hash_file = index if index.exists() else folder / shards[0]
    st = _stat(hash_file, table)
    if hash_file == index:
        parts.append((index, st))
    known = cache.index.fingerprint(str(hash_file), st)
    config, notes = _read_config(folder / CONFIG_NAME)
    # the config is part of what the folder holds: it decides the architecture and is copied into
    # folder outputs (passthrough rewrites it), so a changed config.json makes them out of date
    held = contents if config is None else [contents, config]
    content = text_digest(json.dumps(held if adapter is None else [held, adapter], sort_keys=True))
    if config is not None:
        parts.append((folder / CONFIG_NAME, _stat(folder / CONFIG_NAME, table)))
    if adapter is not None:
        parts.append((folder / peft.CONFIG_NAME, _stat(folder / peft.CONFIG_NAME, table)))
    return Source(spec, tensors, metadata, st, known[2] if known else None, hash_file, content, parts,
                  notes=notes, config=config, adapter=adapter)


def _read_adapter(folder: Path, table: str) -> dict | None:
    """A PEFT adapter folder's adapter_config.json, checked (None: the folder is no adapter)."""
    path = folder / peft.CONFIG_NAME
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_CONFIG:
            raise ValueError(f"larger than {MAX_CONFIG >> 20} MB")
        doc = json.loads(path.read_text(encoding="utf-8"))
        peft.parse_config(doc)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"[{table}] path: {path}: not a usable PEFT adapter config ({e})") from None
    if not (folder / peft.WEIGHTS_NAME).is_file():
        other = " (adapter_model.bin is a pickle: save the adapter with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise InputError(f"[{table}] path: {folder} has {peft.CONFIG_NAME} but no {peft.WEIGHTS_NAME}{other}")
    return doc


def _read_config(path: Path) -> tuple[dict | None, list[str]]:
    """A folder's config.json as an object, and a note when it is there but cannot be used."""
    try:
        if not path.is_file():
            return None, []
        if path.stat().st_size > MAX_CONFIG:
            raise ValueError(f"larger than {MAX_CONFIG >> 20} MB")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc, []
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, [f"{path}: not a readable config.json ({e}): the architecture is told by the key names alone"]


def _index_shards(index: Path, folder: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index}: not a valid safetensors index ({e})") from None
    shards = sorted(set(weight_map.values()))
    root = folder.resolve()
    for shard in shards:
        where = (folder / shard).resolve()
        if where.parent != root or not shard.endswith(".safetensors"):
            raise InputError(f"{index}: the index names {shard!r}, which is not a .safetensors file in {folder} "
                             "(an index may only point at shards beside it)")
    return shards


# (name, dtype, shape, bytes) of each tensor, made as it is asked for
Tensors = Iterable[tuple[str, str, tuple, object]]


@dataclass
class _Imported:
    tensors: Tensors
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _imported_source(spec: ModelSpec, cache: Cache, st: tuple, read: Callable[[Path], _Imported],
                     reader: str = "") -> Source:
    """A source converted as it is read: imported once, then remembered under the file's stamp.
    `reader` names the conversion; its own row (reader:path) keeps the metadata and notes, so a
    cached import never opens the file and a changed conversion imports again."""
    path = spec.path
    known = cache.index.fingerprint(str(path), st)
    side = cache.index.fingerprint(f"{reader}:{path}", st) if reader else ({}, "{}", None)
    if known is not None and side is not None and all(cache.blobs.has(t[2]) for t in known[0].values()):
        (table, content, sha256), noted = known, json.loads(side[1])
    else:
        imported = read(path)
        table, sha256 = _import(imported.tensors, cache), None
        if _stat(path, "models") != st:
            raise BuildError(f"{path}: the file changed while it was being read; run the build again")
        noted = {"metadata": imported.metadata, "notes": imported.notes}
        content = _content(table, imported.metadata)
        cache.index.save_fingerprint(str(path), st, table, content, None)
        if reader:
            cache.index.save_fingerprint(f"{reader}:{path}", st, {}, json.dumps(noted), None)
    tensors = {n: TensorRef(dt, tuple(shape), d) for n, (dt, shape, d) in table.items()}
    return Source(spec, tensors, noted.get("metadata", {}), st, sha256, path, content, [(path, st)],
                  notes=noted.get("notes", []))


def _import(tensors: Tensors, cache: Cache) -> dict:
    """Store each tensor as a blob as it comes (one in memory at a time); the tensor table."""
    table, stored = {}, []
    cache.alive()
    for name, dtype, shape, data in tensors:
        digest = tensor_digest(dtype, tuple(shape), data)
        stored.append((digest, cache.blobs.put(digest, data), "import"))
        table[name] = (dtype, list(shape), digest)
    cache.index.save_blobs([r for r in stored if r[1]], 0)
    return table


def _legacy_import(path: Path) -> _Imported:
    from mergebuild.tensors.legacy import load_legacy

    return _Imported(_legacy_tensors(path, load_legacy(path)))


def _legacy_tensors(path: Path, state: dict) -> Tensors:
    from mergebuild.tensors.convert import code_of, to_bytes

    for name, tensor in state.items():
        try:
            dtype = code_of(tensor)
        except KeyError:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}") from None
        yield name, dtype, tuple(tensor.shape), to_bytes(tensor)


def _gguf_import(path: Path) -> _Imported:
    model = gguf.read_gguf(path)
    return _Imported(model.tensors(), model.metadata, model.notes)


def _scaled_source(source: Source, layout: scaled_fp8.ScaledLayout, cache: Cache) -> Source:
    """A ComfyUI scaled-fp8 file: its scaled weights dequantised (imported once, remembered in the
    row reader:path), its scale and marker tensors gone, the rest streamed from the file."""
    path, st, key = source.path, source.stamp, f"{scaled_fp8.READER}:{source.path}"
    known = cache.index.fingerprint(key, st)
    if known is not None and all(cache.blobs.has(t[2]) for t in known[0].values()):
        table = known[0]
    else:
        table = _import(scaled_fp8.dequantized(path, source.tensors, layout), cache)
        if _stat(path, "models") != st:
            raise BuildError(f"{path}: the file changed while it was being read; run the build again")
        cache.index.save_fingerprint(key, st, table, scaled_fp8.READER, None)
    tensors = {n: ref for n, ref in source.tensors.items() if n not in layout.hidden}
    tensors.update({n: TensorRef(dt, tuple(shape), d) for n, (dt, shape, d) in table.items()})
    content = text_digest(json.dumps([source.content, scaled_fp8.READER, sorted(table.items())]))
    return dataclasses.replace(source, tensors=tensors, content=content)
