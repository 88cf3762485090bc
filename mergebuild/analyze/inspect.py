"""What is in a safetensors file: its architecture, components, blocks or layers, dtypes,
metadata, lineage and hashes, as a JSON-able dict.

Only the header is parsed (and, in a LoRA, the few bytes of each module's alpha scalar); the
hashes stream the file in chunks, so memory stays bounded whatever the file's size. No tensor is
ever loaded (and torch is never imported).

LoRA / LyCORIS files get a "lora" section: their modules are grouped as mergebuild's lora method
groups them (methods.lora.read_lora), and the checkpoint they were made for is the one whose
module names (layouts.lora_names, over the keys of the layout its "lora" object names) cover
most of theirs. Architectures that share another's names ("like") are told from it by metadata
hints and by evidence in the modules (a deeper text encoder, wider inputs, more blocks).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from mergebuild.dtypes import SAFETENSORS_DTYPES
from mergebuild.layouts import load_layout
from mergebuild.layouts.blocks import Architecture, architectures, detect
from mergebuild.layouts.lora_names import ModuleName, lora_spec, module_names
from mergebuild.methods import lora_formats as lf
from mergebuild.methods.lora import Module, read_lora
from mergebuild.record.lineage_read import made_by_from_metadata
from mergebuild.portable import file_identity
from mergebuild.record.hashes import autov2, known_hashes, legacy_hash, remember_hashes
from mergebuild.tensors.header import read_header

CHUNK = 16 << 20
OTHER = "other"

KOHYA_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version")
# a file's headline format when its modules differ in kind: the most telling kind first
FORMAT_ORDER = ("DoRA", "LoHa", "LoKr", "PEFT", "LoCon", "LoRA")
SCALARS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i"}


def inspect_file(path, hashes: bool = True) -> dict:
    """Describe a safetensors file. With hashes False only the header is read (and a LoRA's
    alpha scalars), and "hashes" is None.

    Returns {"path", "file_size", "header_size", "architecture": {"name", "description", "how",
    "kind": "model" | "lora"},
    "grouping": "block" | "layer", "totals": {"tensors", "params", "bytes", "dtypes"},
    "components": {name: {"tensors", "params", "bytes"}},
    "blocks": [{"name", "tensors", "params", "bytes", "dtypes": {code: count}}],
    "metadata": {str: str}, "lineage": recipe tree | None,
    "hashes": {"autov1", "autov2", "sha256", "tensor_data_sha256"} | None,
    "lora": the LoRA section (see lora_section) | None}.
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
    lora = lora_section(header)
    return {
        "path": str(path),
        "file_size": os.path.getsize(path),
        "header_size": header.data_offset,
        "architecture": {"name": arch.name, "description": arch.description, "how": how,
                         "kind": "model" if lora is None else "lora"},
        "grouping": grouping(arch),
        "totals": _sorted_dtypes(totals),
        "components": {name: components[name] for name in component_order(arch, components)},
        "blocks": [{"name": name, **_sorted_dtypes(groups[name])} for name in group_order(arch, groups)],
        "metadata": dict(header.metadata),
        "lineage": made_by_from_metadata(header.metadata),
        "hashes": file_hashes(path, header.data_offset) if hashes else None,
        "lora": lora,
    }


def file_hashes(path, data_offset: int | None = None) -> dict[str, str]:
    """The hashes model sites and UIs show, in one pass over the file (plain lowercase hex):
    autov1 (A1111's legacy 8-hex hash), autov2 (CivitAI / A1111: first 10 hex of the sha256),
    sha256 (the whole file), tensor_data_sha256 (the sha256 of the bytes after the header:
    kohya's addnet hash, ModelSpec's hash_sha256 without its "0x"). Remembered per file and
    machine (the per-user fingerprint store): asking again, or a build that reads the file,
    does not hash it again."""
    path = Path(path)
    before = file_identity(path)
    sha, data_sha = known_hashes(path)
    if sha is not None and data_sha is not None:
        return {"autov1": legacy_hash(path), "autov2": autov2(sha), "sha256": sha, "tensor_data_sha256": data_sha}
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
    remember_hashes(path, before, sha, data.hexdigest())
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


# -- LoRA / LyCORIS files -----------------------------------------------------------------------

def lora_section(header) -> dict | None:
    """What a LoRA file holds; None when most of its tensors belong to no LoRA module (a model).

    {"format": "LoRA" | "LoCon" | "LoHa" | "LoKr" | "DoRA" | "PEFT", "naming": "kohya" | "peft",
    "module_formats": {label: modules}, "modules", "ranks" (sorted), "rank" (the most common; None
    if no module has one), "modules_without_rank" (LoKr with both factors full), "alphas" (sorted,
    distinct), "alpha" (the most common), "modules_without_alpha" (alpha = rank: a scale of 1),
    "target": {"name": an architecture, "description", "how", "grouping": "block" | "layer"},
    "name_styles": {whose naming the modules use ("kohya", "diffusers", ...): modules},
    "components": {name: row}, "blocks": [{"name", **row}], row = {"modules", "tensors", "params",
    "bytes"}, "unmatched": [modules the target has no layer for] | None (no layout: not checked),
    "stray_tensors": [tensors of no module], "kohya": {ss_* key: value, those present}}.
    """
    lora = read_lora(_names_only(header), 0)
    if not lora.modules or sum(len(m.roles) for m in lora.modules) < len(lora.stray):
        return None
    shapes = {m.name: {role: header.tensors[t].shape for role, t in m.roles.items()} for m in lora.modules}
    labels = Counter(m.label(shapes[m.name]) for m in lora.modules)
    naming = "peft" if any(m.roles.get("lora_down", "").endswith(".lora_A.weight") for m in lora.modules) else "kohya"
    ranks = Counter(lf.rank_of(m.fmt, shapes[m.name]) for m in lora.modules)
    without_rank = ranks.pop(None, 0)
    alphas = Counter(a for a in _alpha_values(header, lora.modules) if a is not None)
    target, how, places = lora_target(lora.modules, shapes, header.metadata)
    arch = architectures()[target]
    components, blocks, unmatched = _lora_rows(header, lora.modules, arch, places)
    styles = Counter(places[m.name].style for m in lora.modules if m.name in places)
    return {
        "format": _headline(labels, naming),
        "naming": naming,
        "module_formats": dict(sorted(labels.items())),
        "modules": len(lora.modules),
        "ranks": sorted(ranks),
        "rank": _most_common(ranks),
        "modules_without_rank": without_rank,
        "alphas": sorted(alphas),
        "alpha": _most_common(alphas),
        "modules_without_alpha": sum("alpha" not in m.roles for m in lora.modules),
        "target": {"name": target, "description": arch.description, "how": how, "grouping": grouping(arch)},
        "name_styles": dict(sorted(styles.items())),
        "components": components,
        "blocks": blocks,
        "unmatched": unmatched if target in _inspected() else None,
        "stray_tensors": sorted(lora.stray),
        "kohya": {k: header.metadata[k] for k in KOHYA_KEYS if k in header.metadata},
    }


def _names_only(header) -> SimpleNamespace:
    """What read_lora asks of a build context, from a header: the input's name and tensor names."""
    return SimpleNamespace(spec=SimpleNamespace(inputs=[str(header.path)]), names=lambda i: list(header.tensors))


def _headline(labels: Counter, naming: str) -> str:
    """One format for the file: module labels are "LoRA", "LoCon", "LoCon-CP", "LoHa", "LoKr",
    each maybe "+DoRA"; linear modules of a LoCon are plain "LoRA", hence the ranking."""
    kinds = {label.split("+")[0].removesuffix("-CP") for label in labels}
    kinds |= {"DoRA"} if any(label.endswith("+DoRA") for label in labels) else set()
    kinds |= {"PEFT"} if naming == "peft" else set()
    return next(k for k in FORMAT_ORDER if k in kinds)


def _most_common(counts: Counter):
    # ties go to the smaller value, so that the answer does not depend on the file's key order
    return min(counts, key=lambda v: (-counts[v], v)) if counts else None


def _alpha_values(header, modules) -> list[float | None]:
    """Each module's alpha, read from the file (a scalar: a few bytes); None where it has none
    or one that is not a readable scalar."""
    out = []
    with open(header.path, "rb") as f:
        for m in modules:
            entry = header.tensors.get(m.roles.get("alpha", ""))
            out.append(None if entry is None else _scalar(f, entry))
    return out


def _scalar(f, entry) -> float | None:
    if _numel(entry.shape) != 1 or (entry.dtype not in SCALARS and entry.dtype != "BF16"):
        return None
    f.seek(entry.begin)
    raw = f.read(entry.nbytes)
    # bfloat16 is the upper half of a float32
    value = struct.unpack("<f", b"\0\0" + raw)[0] if entry.dtype == "BF16" else struct.unpack(SCALARS[entry.dtype], raw)[0]
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _inspected() -> dict[str, dict]:
    """{architecture: the "inspect" part of its "lora" object}, in detection order."""
    return {name: lora_spec(name)["inspect"] for name in architectures() if "inspect" in lora_spec(name)}


def _like(name: str | None) -> str | None:
    """The architecture whose layout `name` looks LoRA names up in (itself if it has one)."""
    spec = _inspected().get(name, {})
    return spec.get("like", name if "layout" in spec else None)


@lru_cache(maxsize=None)
def layout_module_names(arch: str) -> dict[str, ModuleName]:
    """{name: ModuleName} of every LoRA module name a checkpoint of `arch` answers to."""
    keys = load_layout(_inspected()[arch]["layout"])["keys"]
    return {m.name: m for m in module_names({k: tuple(v["shape"]) for k, v in keys.items()}, arch)}


def lora_target(modules: list[Module], shapes: dict, metadata: dict) -> tuple[str, str, dict[str, ModuleName]]:
    """The checkpoint a LoRA was made for, from its module names (what baking it looks up):
    (architecture name, how it was told, {module: its ModuleName in that checkpoint})."""
    layouts = [name for name, spec in _inspected().items() if "layout" in spec]
    hits = {arch: {m.name: layout_module_names(arch)[m.name] for m in modules if m.name in layout_module_names(arch)}
            for arch in layouts}
    hint, hint_why = _base_model_hint(metadata)
    best = max(layouts, key=lambda a: (len(hits[a]), a == _like(hint)))
    if not hits[best]:
        return _fallback(), f"no module name is one of a {', '.join(layouts)} checkpoint's", {}
    how = f"{len(hits[best])} of {len(modules)} module names are {best}'s"
    tied = [a for a in layouts if a != best and len(hits[a]) == len(hits[best])]
    if tied:
        how += f" (as many are {tied[0]}'s" + (f"; {hint_why})" if hint else ")")
    alike = [name for name, spec in _inspected().items() if spec.get("like") == best]
    for name in alike:  # told by the file's own word first, by its modules after
        why = _hint_of(name, metadata)
        if why:
            return name, f"{how}; {name} by {why}", hits[best]
    for name in alike:
        why = _evidence(_inspected()[name].get("evidence", []), modules, shapes)
        if why:
            return name, f"{how}; {name} by {why}", hits[best]
    return best, how, hits[best]


def _fallback() -> str:
    """The architecture of models no other describes (the one detection falls back to)."""
    return next(a.name for a in architectures().values() if a.is_fallback)


def _hint_of(name: str, metadata: dict) -> str | None:
    """Why the metadata says the LoRA is for `name` (kohya's ss_base_model_version, ss_v2 in
    files from before it, ModelSpec's architecture), if it does."""
    for hint in _inspected()[name].get("hints", []):
        value = metadata.get(hint["metadata"])
        if value is None:
            continue
        if value == hint.get("equals") or ("prefix" in hint and value.startswith(hint["prefix"])):
            return f"{hint['metadata']} {value}"
    return None


def _base_model_hint(metadata: dict) -> tuple[str | None, str | None]:
    """The first architecture (in detection order) the metadata names, and why."""
    for name in _inspected():
        why = _hint_of(name, metadata)
        if why:
            return name, why
    return None, None


def _evidence(rules: list[dict], modules: list[Module], shapes: dict) -> str | None:
    """Why a LoRA with another architecture's module names is for this one, if it is: a module
    whose name matches a rule's pattern, with a block index at least index_at_least, or whose
    down matrix reads `reads` features (an SD2 text encoder deeper than SD1's, wider context)."""
    for m in modules:
        for rule in rules:
            found = re.search(rule["module"], m.name) if "module" in rule else None
            if "module" in rule and found is None:
                continue
            index = found.group(1) if found is not None and found.groups() else None
            if "index_at_least" in rule and (index is None or int(index) < rule["index_at_least"]):
                continue
            if "reads" in rule and _reads(shapes[m.name]) != rule["reads"]:
                continue
            return rule["why"].format(index=index, module=m.name)
    return None


def _reads(shapes: dict) -> int | None:
    """How many features a module reads (linear modules), from its down matrix."""
    down = shapes.get("lora_down") or shapes.get("hada_w1_b")
    return down[1] if down is not None and len(down) == 2 else None


def _lora_rows(header, modules: list[Module], arch: Architecture, places: dict) -> tuple[dict, list, list]:
    """Modules, tensors, parameters and bytes per component and per block (or layer) of the
    target, and the modules that have no place in it."""
    components: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    unmatched = []
    for m in modules:
        component, group = _place(arch, m.name, places)
        if (component, group) == (OTHER, OTHER):
            unmatched.append(m.name)
        for row in (components.setdefault(component, _lora_row()), groups.setdefault(group, _lora_row())):
            row["modules"] += 1
            for tensor in m.roles.values():
                entry = header.tensors[tensor]
                row["tensors"] += 1
                row["params"] += _numel(entry.shape)
                row["bytes"] += entry.nbytes
    return ({name: components[name] for name in component_order(arch, components)},
            [{"name": name, **groups[name]} for name in group_order(arch, groups)], sorted(unmatched))


def _place(arch: Architecture, name: str, places: dict) -> tuple[str, str]:
    """(component, block or layer) of a LoRA module in the target checkpoint."""
    if name in places:
        key = places[name].target.key
        return _component(arch, key), group_of(arch, key)
    if arch.name not in _inspected():  # no layout to look names up in: read the layer off the name
        layer = arch.layer_of(name)
        return arch.component_of(name) or ("layers" if layer is not None else OTHER), group_of(arch, name)
    for rule in _inspected()[arch.name].get("evidence", []):  # what the layout looked up lacks
        found = re.search(rule["module"], name) if "place" in rule else None
        if found is not None:  # e.g. SD2's text-encoder layers 12-22, which SD1's layout lacks
            key = rule["place"].format(index=found.group(1))
            return _component(arch, key), group_of(arch, key)
    return OTHER, OTHER


def _component(arch: Architecture, key: str) -> str:
    """The most specific component a key is in (SDXL: clip_l or clip_g, not text_encoder)."""
    found = [(len(p), name) for name, prefixes in arch.components.items() for p in prefixes if key.startswith(p)]
    return max(found)[1] if found else OTHER


def _lora_row() -> dict:
    return {"modules": 0, "tensors": 0, "params": 0, "bytes": 0}
