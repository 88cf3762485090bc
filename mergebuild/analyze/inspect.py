"""What is in a safetensors file: its architecture, components, blocks or layers, dtypes,
metadata, lineage and hashes, as a JSON-able dict.

Only the header is parsed; the hashes stream the file in chunks, so memory stays bounded
whatever the file's size. No tensor is ever loaded (and torch is never imported).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mergebuild.dtypes import SAFETENSORS_DTYPES
from mergebuild.layouts.blocks import Architecture, detect
from mergebuild.record.lineage import made_by_from_metadata
from mergebuild.record.hashes import autov2, legacy_hash
from mergebuild.tensors.header import read_header

CHUNK = 16 << 20
OTHER = "other"


def inspect_file(path, hashes: bool = True) -> dict:
    """Describe a safetensors file. With hashes False the file's data is not read at all
    (only its header), and "hashes" is None.

    Returns {"path", "file_size", "header_size", "architecture": {"name", "description", "how"},
    "grouping": "block" | "layer", "totals": {"tensors", "params", "bytes", "dtypes"},
    "components": {name: {"tensors", "params", "bytes"}},
    "blocks": [{"name", "tensors", "params", "bytes", "dtypes": {code: count}}],
    "metadata": {str: str}, "lineage": recipe tree | None,
    "hashes": {"autov1", "autov2", "sha256", "tensor_data_sha256"} | None}.
    """
    path = Path(path)
    header = read_header(path)
    arch, how = detect(header.tensors)
    groups: dict[str, dict] = {}
    components: dict[str, dict] = {}
    totals = _row()
    for key, entry in header.tensors.items():
        params = _numel(entry.shape)
        for row in (groups.setdefault(group_of(arch, key), _row()),
                    components.setdefault(component_of(arch, key), _row(dtypes=False)), totals):
            row["tensors"] += 1
            row["params"] += params
            row["bytes"] += entry.nbytes
            if "dtypes" in row:
                row["dtypes"][entry.dtype] = row["dtypes"].get(entry.dtype, 0) + 1
    return {
        "path": str(path),
        "file_size": os.path.getsize(path),
        "header_size": header.data_offset,
        "architecture": {"name": arch.name, "description": arch.description, "how": how},
        "grouping": grouping(arch),
        "totals": _sorted_dtypes(totals),
        "components": {name: components[name] for name in component_order(arch, components)},
        "blocks": [{"name": name, **_sorted_dtypes(groups[name])} for name in group_order(arch, groups)],
        "metadata": dict(header.metadata),
        "lineage": made_by_from_metadata(header.metadata),
        "hashes": file_hashes(path, header.data_offset) if hashes else None,
    }


def file_hashes(path, data_offset: int | None = None) -> dict[str, str]:
    """The hashes model sites and UIs show, in one pass over the file (plain lowercase hex):
    autov1 (A1111's legacy 8-hex hash), autov2 (CivitAI / A1111: first 10 hex of the sha256),
    sha256 (the whole file), tensor_data_sha256 (the sha256 of the bytes after the header:
    kohya's addnet hash, ModelSpec's hash_sha256 without its "0x")."""
    path = Path(path)
    if data_offset is None:
        data_offset = read_header(path).data_offset
    whole, data = hashlib.sha256(), hashlib.sha256()
    position = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            chunk = view[:n]
            whole.update(chunk)
            if position + n > data_offset:
                data.update(chunk[max(0, data_offset - position):])
            position += n
    sha = whole.hexdigest()
    return {"autov1": legacy_hash(path), "autov2": autov2(sha), "sha256": sha, "tensor_data_sha256": data.hexdigest()}


# -- grouping keys, shared with diff.py ---------------------------------------------------------

def grouping(arch: Architecture) -> str:
    """How keys are grouped: by MBW block (SD models) or by layer index (generic models)."""
    return "block" if arch.blocks else "layer"


def group_of(arch: Architecture, key: str) -> str:
    """A key's row: its block ("BASE", "IN00", ...) for SD models, its layer index as a string
    ("0", "1", ...) for generic ones; "other" for keys in neither."""
    if arch.blocks:
        return arch.block_of(key) or OTHER
    layer = arch.layer_of(key)
    return OTHER if layer is None else str(layer)


def group_order(arch: Architecture, names) -> list[str]:
    """Row names in display order: blocks in supermerger order, or layers by number; then "other"."""
    names = set(names)
    if arch.blocks:
        ordered = [b for b in arch.blocks if b in names]
    else:
        ordered = sorted((n for n in names if n.isdigit()), key=int)
    rest = sorted(names - set(ordered) - {OTHER})
    return ordered + rest + ([OTHER] if OTHER in names else [])


def component_of(arch: Architecture, key: str) -> str:
    return arch.component_of(key) or OTHER


def component_order(arch: Architecture, names) -> list[str]:
    names = set(names)
    ordered = [c for c in arch.components if c in names]
    return ordered + sorted(names - set(ordered) - {OTHER}) + ([OTHER] if OTHER in names else [])


def _row(dtypes: bool = True) -> dict:
    row = {"tensors": 0, "params": 0, "bytes": 0}
    if dtypes:
        row["dtypes"] = {}
    return row


def _sorted_dtypes(row: dict) -> dict:
    order = list(SAFETENSORS_DTYPES)
    return {**row, "dtypes": dict(sorted(row["dtypes"].items(), key=lambda kv: order.index(kv[0])))}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
