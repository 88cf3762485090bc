"""GGUF checkpoints (llama.cpp's, city96's ComfyUI-GGUF ones) read back as the safetensors
tensors they were converted from, one tensor at a time.

Through the `gguf` package (llama.cpp's gguf-py, the optional extra mergebuild[gguf]), imported
only when a .gguf source is read. GGUFReader parses the header; each tensor's bytes are then read
with RandomAccess rather than through its memory map, so a file truncated under the import is an
error, never SIGBUS, and memory holds one tensor (with its dequantisation temporaries) at a time.

- dtypes: F32, F16, BF16, F64 and the integer types keep their bytes. Every quantised type that
  gguf.quants.dequantize knows (Q8_0, Q4_K, Q6_K, IQ4_XS, ...) becomes float32, exactly what gguf
  computes: float16 would round d * q (and can overflow), and the merge computes in float32 anyway.
- shapes: GGUF stores ggml order (innermost first), reversed here; city96's converter records
  `comfy.gguf.orig_shape.NAME` where it flattened a tensor, and that shape wins.
- names: by general.architecture, from gguf_names.json; for llama, the rows of q and k that
  convert_hf_to_gguf.py permuted (LlamaModel.permute) are put back with the metadata's head counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from mergebuild.errors import InputError
from mergebuild.portable import RandomAccess

GGUF_SUFFIX = ".gguf"
READER = "gguf-1"  # what a GGUF reads as; a change re-imports what was imported before
MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."  # city96's key for the shape a tensor had before flattening
_KEPT = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
         "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}  # ggml type -> safetensors code
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Entry:
    name: str  # the safetensors (Hugging Face) name
    tensor: object  # gguf's ReaderTensor
    dtype: str  # safetensors code of what is read
    shape: tuple[int, ...]  # Hugging Face order
    heads: int = 0  # rows come as convert_hf_to_gguf.py permuted them for this many heads; 0: not


@dataclass
class GGUFModel:
    path: Path
    metadata: dict[str, str]  # the general.* strings (name, architecture, ...)
    notes: list[str] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)

    def tensors(self) -> Iterator[tuple[str, str, tuple[int, ...], memoryview]]:
        """(name, dtype, shape, bytes) of each tensor in file order, read as it is asked for."""
        import numpy as np

        with RandomAccess(self.path) as f:
            for e in self.entries:
                data = _values(self.path, f, e, np)
                yield e.name, e.dtype, e.shape, memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def read_gguf(path: Path) -> GGUFModel:
    """The header of a GGUF file, its names mapped back; an InputError if mergebuild cannot read it."""
    gguf = _gguf(path)
    reader = _reader(gguf, path)
    metadata = _general_strings(reader)
    parts = _int(reader, "split.count")
    if isinstance(parts, int) and parts > 1:
        raise InputError(f"{path}: one part of a GGUF split into {parts} files; join them first with "
                         "llama.cpp's `llama-gguf-split --merge`")
    model = GGUFModel(Path(path), metadata)
    names = _names(path, metadata.get("general.architecture"), [t.name for t in reader.tensors], model.notes)
    heads = _head_counts(reader, metadata.get("general.architecture"))
    probe = _Probe(gguf)
    for t in reader.tensors:
        if names[t.name] is not None:
            model.entries.append(_entry(path, reader, t, names[t.name], probe, heads))
    return model


def _gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise InputError(f"{path}: reading a .gguf source needs the gguf package: pip install gguf "
                         "(or pip install 'mergebuild[gguf]')") from None
    return gguf


def _reader(gguf, path: Path):
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if head != MAGIC:
        raise InputError(f"{path}: not a GGUF file (it does not start with 'GGUF'; "
                         f"its first bytes are {head!r})")
    try:
        reader = _bounded_reader(gguf)(path)
    except Exception as e:  # gguf raises ValueError, IndexError, KeyError... for bad or short bytes
        if "GGMLQuantizationType" in str(e):
            raise InputError(f"{path}: a tensor type gguf {_version()} does not know ({_first_line(e)}); "
                             "a newer gguf may read it") from None
        raise InputError(f"{path}: a damaged or incomplete GGUF file ({_first_line(e)}); "
                         "a download cut short reads like this") from None
    if reader.byte_order != "I":
        raise InputError(f"{path}: a GGUF of the other byte order (big-endian); mergebuild reads little-endian ones")
    return reader


def _bounded_reader(gguf):
    """GGUFReader, stopped at the end of the file: its parser reads past it as empty arrays, so a
    damaged array length would have it loop (nearly) forever, and a short tensor fail obscurely."""
    import numpy as np

    class Bounded(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise ValueError(f"the file ends at byte {len(self.data)}, before byte {end} its header describes")
            return super()._get(offset, dtype, count, *args, **kwargs)

    return Bounded


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _general_strings(reader) -> dict[str, str]:
    """general.name, general.architecture and the other general.* strings; never the tokenizer."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("general.") and len(f.types) == 1 and f.types[0].name == "STRING":
            try:
                out[key] = f.contents()
            except UnicodeDecodeError:
                continue
    return out


def _int(reader, key: str):
    """An integer field (or a list of them: a per-layer value), else None."""
    f = reader.get_field(key)
    if f is None or not f.types or f.types[-1].name not in ("UINT8", "INT8", "UINT16", "INT16", "UINT32",
                                                           "INT32", "UINT64", "INT64"):
        return None
    return f.contents()


# --- names -----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def name_tables() -> dict:
    """gguf_names.json, with each table's 'extends' resolved."""
    doc = json.loads(Path(__file__).with_name("gguf_names.json").read_text(encoding="utf-8"))
    tables = {}
    for name, table in doc["tables"].items():
        base = doc["tables"].get(table.get("extends"), {})
        tables[name] = {
            "block_prefix": table.get("block_prefix", base.get("block_prefix")),
            "global": {**base.get("global", {}), **table.get("global", {})},
            "block": {**base.get("block", {}), **table.get("block", {})},
            "skip": table.get("skip", base.get("skip", [])),
        }
    return {"tables": tables, "architectures": doc["architectures"], "identity": set(doc["identity"])}


def hf_name(arch: str, name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name` of a mapped architecture; None: a tensor llama.cpp
    derives (rope_freqs); the name itself when the table does not know it."""
    table = name_tables()["tables"][name_tables()["architectures"][arch]["table"]]
    base, suffix = _split_suffix(name)
    if base in table["skip"]:
        return None
    if base in table["global"]:
        return table["global"][base] + suffix
    m = _BLOCK.fullmatch(base)
    if m and m.group(2) in table["block"]:
        return table["block_prefix"].format(bid=m.group(1)) + table["block"][m.group(2)] + suffix
    return name


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _names(path: Path, arch: str | None, names: list[str], notes: list[str]) -> dict[str, str | None]:
    """GGUF name -> Hugging Face name (None: left out), with a note for what is not mapped."""
    tables = name_tables()
    if arch in tables["identity"]:
        out = {n: n for n in names}  # city96's converter keeps the original names
    elif arch in tables["architectures"]:
        out = {n: hf_name(arch, n) for n in names}
        skipped = [n for n, h in out.items() if h is None]
        kept = [n for n, h in out.items() if h == n]
        if skipped:
            notes.append(f"left out {len(skipped)} tensors llama.cpp derives, which the Hugging Face checkpoint "
                         f"does not have ({', '.join(skipped[:3])})")
        if kept:
            notes.append(f"{len(kept)} tensor names have no Hugging Face name in mergebuild's {arch} table and are "
                         f"kept as the GGUF has them (e.g. {kept[0]})")
    else:
        out = {n: n for n in names}
        notes.append(f"architecture {arch!r} has no name table in mergebuild (gguf_names.json): tensor names are "
                     "kept as the GGUF has them")
    _check_unique(path, out)
    return out


def _check_unique(path: Path, names: dict[str, str | None]) -> None:
    seen: dict[str, str] = {}
    for gguf_name, name in names.items():
        if name is None:
            continue
        if name == "__metadata__":
            raise InputError(f"{path}: tensor {gguf_name!r} is named __metadata__, which safetensors reserves")
        if name in seen:
            raise InputError(f"{path}: tensors {seen[name]!r} and {gguf_name!r} both read as {name!r}")
        seen[name] = gguf_name


def _head_counts(reader, arch: str | None) -> dict[str, object]:
    """For each permuted GGUF name (attn_q, attn_k): its head count (an int, or one per layer)."""
    spec = name_tables()["architectures"].get(arch)
    if spec is None or not spec["permuted"]:
        return {}
    n_head = _int(reader, f"{arch}.attention.head_count")
    n_kv = _int(reader, f"{arch}.attention.head_count_kv")
    counts = {"attn_q": n_head, "attn_k": n_kv if n_kv is not None else n_head}
    return {k: v for k, v in counts.items() if k in spec["permuted"]}


def _heads_of(path: Path, name: str, heads: dict) -> int:
    base, suffix = _split_suffix(name)
    m = _BLOCK.fullmatch(base)
    if not m or m.group(2) not in heads or not suffix:
        return 0
    count = heads[m.group(2)]
    if isinstance(count, list):
        count = count[int(m.group(1))] if int(m.group(1)) < len(count) else None
    if not isinstance(count, int) or count <= 0:
        raise InputError(f"{path}: tensor {name!r}: llama.cpp permuted its rows by head, but the metadata has no "
                         "usable attention.head_count / head_count_kv to undo it")
    return count


# --- tensors ---------------------------------------------------------------------------------
class _Probe:
    """Which ggml types gguf can dequantize: one block of zeros each, tried once."""

    def __init__(self, gguf):
        self.gguf, self.known = gguf, {}

    def can(self, qtype) -> bool:
        if qtype not in self.known:
            import numpy as np

            block, size = self.gguf.constants.GGML_QUANT_SIZES[qtype]
            try:
                self.gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
                self.known[qtype] = True
            except NotImplementedError:
                self.known[qtype] = False
        return self.known[qtype]


def _entry(path: Path, reader, t, name: str, probe: _Probe, heads: dict) -> _Entry:
    kind = t.tensor_type.name
    if kind not in _KEPT and not probe.can(t.tensor_type):
        raise InputError(f"{path}: tensor {t.name!r} is stored as {kind}, which gguf {_version()} "
                         "cannot dequantize (try a newer gguf, or convert the file with another type)")
    shape = _shape(path, reader, t)
    entry = _Entry(name, t, _KEPT.get(kind, "F32"), shape, _heads_of(path, t.name, heads))
    if entry.heads and (not shape or shape[0] % (2 * entry.heads)):
        raise InputError(f"{path}: tensor {t.name!r} has {shape[0] if shape else 0} rows, which do not split into "
                         f"{entry.heads} heads of row pairs (is attention.head_count right?)")
    return entry


def _shape(path: Path, reader, t) -> tuple[int, ...]:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    f = reader.get_field(ORIG_SHAPE + t.name)
    if f is None:
        return shape
    orig = tuple(int(d) for d in f.contents()) if f.types and f.types[0].name == "ARRAY" else None
    n = 1
    for d in orig or ():
        n *= d
    if not orig or n != t.n_elements:
        raise InputError(f"{path}: tensor {t.name!r}: {ORIG_SHAPE}{t.name} is not a shape of its "
                         f"{t.n_elements} elements")
    return orig


def _values(path: Path, f: RandomAccess, e: _Entry, np):
    """The tensor's values as a numpy array of the Hugging Face shape."""
    t = e.tensor
    try:
        raw = f.read(int(t.n_bytes), int(t.data_offset))
    except OSError as err:
        raise InputError(f"{path}: tensor {t.name!r}: {err.strerror or err}") from None
    if e.dtype == "BF16":
        values = raw.view(np.uint16)  # kept as bits: numpy has no bfloat16
    elif t.tensor_type.name in _KEPT:
        values = raw.view(t.data.dtype)  # the reader's dtype for it; the byte order is the host's (checked)
    else:
        import gguf

        values = gguf.quants.dequantize(raw.reshape(t.data.shape), t.tensor_type)  # rows of blocks -> float32
    values = values.reshape(e.shape)
    return _unpermute(values, e.heads) if e.heads else values


def _unpermute(w, n_head: int):
    """The inverse of convert_hf_to_gguf.py's LlamaModel.permute: rows (n_head, 2, d/2) -> (n_head, d/2, 2)
    there, so (n_head, d/2, 2) -> (n_head, 2, d/2) here."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # not installed as a distribution (a source checkout)
        return "(this version)"
