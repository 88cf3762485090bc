"""mergekit's YAML read as data (untrusted), and as lineage (a model folder's mergekit_config.yml).

The schema is mergekit 0.1.x's `MergeConfiguration` (mergekit/config.py); a mergekit-multi file
holds several such documents. What is not YAML, or not plain data of a sane size, is one line
(InputError).
"""

from __future__ import annotations

import math
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.record.foreign.mergekit_params import Ref

MAX_NODES = 200_000  # YAML values looked at, at most (aliases can make a small file huge)
MAX_TEXT = 10_000_000  # bytes of a mergekit_config.yml, at most


def load_documents(text: str, where: str) -> list[dict]:
    """The YAML documents of a mergekit or mergekit-multi file; one line (InputError) if it is
    not one."""
    import yaml  # pyyaml: a dependency (mergekit's configs are YAML)

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{where}: not valid YAML: {problem}" + (f" (line {mark.line + 1})" if mark else "")) from None
    except (RecursionError, MemoryError):
        raise InputError(f"{where}: not valid YAML: nested too deeply") from None
    _check_plain(docs, where)
    if not docs:
        raise InputError(f"{where}: no merge configuration in it (an empty YAML file)")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise InputError(f"{where}: document {i + 1} is not a mergekit config (a mapping with merge_method)")
    return docs


def _check_plain(value, where: str) -> None:
    """Plain data only (mappings with string keys, lists, strings, finite numbers, booleans), of
    bounded size: YAML aliases can make a small file a huge or recursive value."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise InputError(f"{where}: too large or recursive for a merge config (YAML aliases?)")
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, str):
                    raise InputError(f"{where}: a key {str(k)[:40]!r} is not a string")
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"{where}: {v} is not a finite number")
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise InputError(f"{where}: unexpected YAML value of type {type(v).__name__}: {str(v)[:40]!r}")


def parse_ref(value, where: str) -> Ref:
    """A mergekit ModelReference: "path[@revision][+lora]" or {model: ..., lora: ...}."""
    if isinstance(value, str):
        model, _, lora = value.partition("+")
        if "+" in lora:
            raise InputError(f"{where}: {value!r}: not a model reference (more than one '+')")
        path, _, revision = model.partition("@")
        if "@" in revision or not path:
            raise InputError(f"{where}: {value!r}: not a model reference")
        return Ref(path, revision or None, lora or None)
    if isinstance(value, dict) and "model" in value:
        inner = value["model"]
        if isinstance(inner, dict) and isinstance(inner.get("path"), str):
            path, revision = inner["path"], inner.get("revision")
        elif isinstance(inner, str):
            ref = parse_ref(inner, where)
            path, revision = ref.path, ref.revision
        else:
            raise InputError(f"{where}: not a model reference")
        lora = value.get("lora")
        if isinstance(lora, dict):
            lora = lora.get("path")
        return Ref(path, revision if isinstance(revision, str) else None, lora if isinstance(lora, str) else None)
    raise InputError(f"{where}: {str(value)[:60]!r}: not a model reference (a path or a Hugging Face repo)")


def ref_values(doc: dict):
    """Every model reference of a config, in order: base_model, models, slices' sources."""
    def entries(value):
        return [e for e in value if isinstance(e, dict) and "model" in e] if isinstance(value, list) else []

    if doc.get("base_model") is not None:
        yield doc["base_model"]
    for entry in entries(doc.get("models")):
        yield entry["model"]
    for s in doc.get("slices") if isinstance(doc.get("slices"), list) else []:
        if isinstance(s, dict):
            for src in entries(s.get("sources")):
                yield src["model"]


# --- lineage (mergekit_config.yml in a model folder) -----------------------------------------
def mergekit_lineage(text: str, prefix: str) -> tuple[dict, str | None, list[str]]:
    """The merge a mergekit_config.yml records, as lineage nodes: (nodes, root, warnings)."""
    try:
        docs = load_documents(text, "mergekit_config.yml")
    except InputError as e:
        return {}, None, [f"{prefix}: {e}; its lineage is left out"]
    doc = docs[-1]
    nodes: dict[str, dict] = {}
    inputs = []
    try:
        refs = [parse_ref(v, "mergekit_config.yml") for v in ref_values(doc)]
    except InputError as e:
        return {}, None, [f"{prefix}: {e}; its lineage is left out"]
    for ref in refs:
        nid = f"{prefix}/{ref}"
        if nid not in nodes:
            nodes[nid] = {"kind": "model", "name": str(ref), "file": ref.path}
            inputs.append(nid)
    params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    root = f"{prefix}/mergekit"
    node = {"kind": "merge", "name": str(doc.get("name") or "mergekit"), "tool": "mergekit",
            "method": str(doc.get("merge_method") or "?"), "params": params, "inputs": inputs}
    if isinstance(doc.get("dtype"), str):
        node["dtype"] = doc["dtype"]
    nodes[root] = node
    return nodes, root, []


def folder_lineage(folder: Path) -> tuple[dict, str | None, list[str]]:
    """The lineage a mergekit output folder records in its mergekit_config.yml."""
    config = folder / "mergekit_config.yml"
    try:
        if config.stat().st_size > MAX_TEXT:
            return {}, None, [f"{folder.name}: its mergekit_config.yml is too large to be a config; left out"]
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return {}, None, [f"{folder.name}: cannot read its mergekit_config.yml ({e}); left out"]
    return mergekit_lineage(text, folder.name)
