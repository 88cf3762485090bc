"""Reading lineage back from a file's metadata (untrusted): mergebuild's own recipe (flat or the
older nested form), A1111's / supermerger's nested recipes and ModelSpec's merged_from, as nodes
under a prefix; and a file's lineage as a tree for display. What does not fit the expected shape
is dropped with a warning, never a crash (record/lineage.py writes what this reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.planning.recipe import FORMAT, RECIPE_KEY
from mergebuild.tensors.folder import read_manifest
from mergebuild.tensors.header import read_header

MAX_DEPTH = 10_000  # generations followed in a foreign nested recipe
NODE_FIELDS = {"kind": str, "name": str, "file": str, "tool": str, "method": str, "version": int, "params": dict,
               "dtype": str, "discard": str, "sha256": str, "autov2": str, "addnet_hash": str, "content": str,
               "made_by": str, "inputs": list, "rules": list, "include": list, "exclude": list,
               "clip_to_inputs": bool, "fix_clip_position_ids": bool, "settings": dict, "output": dict,
               "vocab": str, "tokenizer_source": str, "tokenizers": dict, "tail": dict}  # the last three: planning/vocab.py


@dataclass
class Imported:
    nodes: dict[str, dict] = field(default_factory=dict)
    root: str | None = None
    warnings: list[str] = field(default_factory=list)


def _foreign_models(metadata: dict) -> dict:
    try:
        models = json.loads(metadata.get("sd_merge_models") or "{}")
    except (ValueError, TypeError):
        return {}
    if not isinstance(models, dict):
        return {}
    return {k: v for k, v in models.items() if isinstance(k, str) and isinstance(v, dict)}


# --- reading (untrusted) ---------------------------------------------------------------------
def import_lineage(metadata: dict[str, str], prefix: str) -> Imported:
    """The recipe a file's metadata records, as nodes under ids `prefix/...`: mergebuild's own
    (flat or the older nested form), A1111's / supermerger's, or ModelSpec's merged_from."""
    out = Imported()
    try:
        if RECIPE_KEY in metadata:
            doc = json.loads(metadata[RECIPE_KEY])
            if isinstance(doc, dict) and doc.get("format") == FORMAT:
                _import_flat(doc, prefix, out)
            elif isinstance(doc, dict):
                out.root = _import_tree(doc, prefix, out)
            else:
                out.warnings.append(f"{prefix}: its {RECIPE_KEY} is not a recipe; its lineage is left out")
        elif "sd_merge_recipe" in metadata:
            out.root = _import_a1111(metadata, prefix, out)
        elif "mecha_recipe" in metadata:  # sd-mecha's outputs: its .mecha text (record/foreign/mecha.py)
            from mergebuild.record.foreign.mecha import mecha_lineage

            out.nodes, out.root, found = mecha_lineage(str(metadata["mecha_recipe"]), prefix)
            out.warnings += found
        elif metadata.get("modelspec.merged_from"):
            names = [n.strip() for n in str(metadata["modelspec.merged_from"]).split(",") if n.strip()]
            ids = []
            for i, n in enumerate(names):
                ids.append(f"{prefix}/{i}:{n}")
                out.nodes[ids[-1]] = {"kind": "model", "name": n, "file": n}
            out.root = f"{prefix}/{metadata.get('modelspec.title') or 'merge'}"
            out.nodes[out.root] = {"kind": "merge", "name": str(metadata.get("modelspec.title", "")),
                                   "tool": "modelspec", "method": "merge", "params": {}, "inputs": ids}
    except (ValueError, TypeError, RecursionError) as e:
        out.nodes, out.root = {}, None
        out.warnings.append(f"{prefix}: its lineage metadata is malformed ({type(e).__name__}); left out")
    return out


def _clean(node, prefix: str, out: Imported) -> dict | None:
    """A foreign node with only the fields mergebuild knows, of the types it expects."""
    if not isinstance(node, dict):
        return None
    if node.get("kind") == "fisher":  # a computed source (planning/computed.py), shown as what made it
        node = fisher_as_merge(node)
    clean = {}
    for k, v in node.items():
        kind = NODE_FIELDS.get(k)
        if kind is not None and isinstance(v, kind) and not (kind is int and isinstance(v, bool)):
            clean[k] = v
        elif kind is not None:
            out.warnings.append(f"{prefix}: lineage field {k!r} of the wrong type dropped")
    if clean.get("kind") not in ("model", "merge"):
        return None
    return clean


def fisher_as_merge(node: dict) -> dict:
    """A computed Fisher's recipe node as a merge of its model: `fisher_of(samples=.., loss=..)`."""
    params = {k: node[k] for k in ("samples", "loss", "batches", "version") if k in node}
    return {"kind": "merge", "tool": "mergebuild", "method": "fisher_of", "params": params,
            "inputs": node.get("inputs", []), **({"version": node["statistic"]["version"]}
                                                 if isinstance(node.get("statistic"), dict) else {})}


def _import_flat(doc: dict, prefix: str, out: Imported) -> None:
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict) or not isinstance(doc.get("target"), str):
        raise ValueError("no nodes")
    for nid, node in nodes.items():
        node = _clean(node, prefix, out)
        if node is None:
            out.warnings.append(f"{prefix}: lineage node {str(nid)[:40]!r} dropped (not a model or merge)")
            continue
        node["inputs"] = [f"{prefix}/{i}" for i in node.get("inputs", []) if isinstance(i, str) and i in nodes]
        if "made_by" in node:
            node["made_by"] = f"{prefix}/{node['made_by']}"
        node.setdefault("name", str(nid).rsplit("/", 1)[-1])
        out.nodes[f"{prefix}/{nid}"] = node
    root = f"{prefix}/{doc['target']}"
    for node in out.nodes.values():  # references to dropped nodes go too
        node["inputs"] = [i for i in node["inputs"] if i in out.nodes]
        if node.get("made_by") not in out.nodes:
            node.pop("made_by", None)
    out.root = root if root in out.nodes else None


def _import_tree(tree: dict, prefix: str, out: Imported) -> str | None:
    """mergebuild's older nested recipe: flattened without recursion."""
    root_id = None
    stack = [(tree, None, "inputs", 0)]
    while stack:
        raw, parent, slot, depth = stack.pop()
        node = _clean(raw, prefix, out)
        if node is None or depth > MAX_DEPTH:
            continue
        nid = f"{prefix}/{len(out.nodes)}:{node.get('name', '')}"
        children = raw.get("inputs", []) if node["kind"] == "merge" else []
        made_by = raw.get("made_by")
        node["inputs"] = []
        node.pop("made_by", None)
        out.nodes[nid] = node
        if parent is None:
            root_id = nid
        elif slot == "made_by":
            out.nodes[parent]["made_by"] = nid
        else:
            out.nodes[parent]["inputs"].append(nid)
        for child in reversed(children if isinstance(children, list) else []):
            stack.append((child, nid, "inputs", depth + 1))
        if isinstance(made_by, dict):
            stack.append((made_by, nid, "made_by", depth + 1))
    return root_id


def _import_a1111(metadata: dict, prefix: str, out: Imported) -> str | None:
    root = json.loads(metadata["sd_merge_recipe"])
    models = _foreign_models(metadata)
    if not isinstance(root, dict):
        out.warnings.append(f"{prefix}: its sd_merge_recipe is not an object; its lineage is left out")
        return None
    root_id = f"{prefix}/{root.get('custom_name') or 'merge'}"
    stack = [(root, root_id, 0)]
    seen: set[str] = set()
    while stack:
        r, nid, depth = stack.pop()
        params = {"multiplier": r["multiplier"]} if isinstance(r.get("multiplier"), (int, float)) else {}
        node = {"kind": "merge", "name": str(r.get("custom_name") or ""), "tool": str(r.get("type", "webui")),
                "method": str(r.get("interp_method") or r.get("mode") or "?"), "params": params, "inputs": []}
        out.nodes[nid] = node
        # A1111 writes primary/secondary/tertiary_model_hash; supermerger writes model_a/b/c
        for role, alias in (("primary", "model_a"), ("secondary", "model_b"), ("tertiary", "model_c")):
            h = r.get(f"{role}_model_hash") or r.get(alias)
            if not isinstance(h, str) or not h:
                continue
            mid = f"{prefix}/{h[:16]}"
            node["inputs"].append(mid)
            if mid in seen:
                continue
            seen.add(mid)
            entry = models.get(h, {})
            name = entry.get("name") if isinstance(entry.get("name"), str) else h[:10]
            out.nodes[mid] = {"kind": "model", "name": name, "file": name, "sha256": h, "autov2": h[:10]}
            inner = entry.get("sd_merge_recipe")
            if isinstance(inner, str):
                try:
                    inner = json.loads(inner)
                except ValueError:
                    inner = None
            if isinstance(inner, dict) and depth < MAX_DEPTH:
                out.nodes[mid]["made_by"] = f"{mid}/recipe"
                stack.append((inner, f"{mid}/recipe", depth + 1))
    return root_id


# --- a file's lineage, for display -----------------------------------------------------------
def read_lineage(path: Path) -> dict:
    """The lineage tree of a file (or model folder), from its header alone: {"file", "made_by"}.
    A node reached again through another path is shown once; later it is {"same_as": id}."""
    path = Path(path)
    header = read_header(_first_shard(path) if path.is_dir() else path)
    imported = import_lineage(header.metadata, path.name)
    if imported.root is None and path.is_dir() and (path / "mergekit_config.yml").is_file():
        from mergebuild.record.foreign.mergekit_read import folder_lineage  # a mergekit output folder

        imported.nodes, imported.root, found = folder_lineage(path)
        imported.warnings += found
    made_by = as_tree(imported.nodes, imported.root) if imported.root else None
    return {"kind": "model", "name": path.name, "file": path.name, "made_by": made_by,
            "warnings": imported.warnings}


def made_by_from_metadata(metadata: dict[str, str]) -> dict | None:
    imported = import_lineage(metadata, "file")
    return as_tree(imported.nodes, imported.root) if imported.root else None


def as_tree(nodes: dict[str, dict], root: str) -> dict:
    """Nested nodes ("inputs" lists, "made_by"), each shared node expanded once (no recursion)."""
    expanded: set[str] = set()
    top = _display(nodes[root], root)
    stack = [(root, top)]
    expanded.add(root)
    while stack:
        nid, shown = stack.pop()
        node = nodes[nid]
        children = []
        for cid in node.get("inputs", []):
            children.append((cid, _display(nodes[cid], cid)))
        if node.get("kind") == "merge":
            shown["inputs"] = [c for _, c in children]
        if node.get("made_by") in nodes:
            children.append((node["made_by"], _display(nodes[node["made_by"]], node["made_by"])))
            shown["made_by"] = children[-1][1]
        for cid, child in children:
            if cid in expanded:
                child["same_as"] = cid
                child.pop("inputs", None)
                child.pop("made_by", None)
            else:
                expanded.add(cid)
                stack.append((cid, child))
    return top


def _display(node: dict, nid: str) -> dict:
    name = node.get("name") or nid.rsplit("/", 1)[-1]
    shown = {k: v for k, v in node.items() if k not in ("inputs", "made_by")}
    shown["name"] = name
    return shown


def _first_shard(folder: Path) -> Path:
    listed = sorted(n for n in (read_manifest(folder) or {}) if n.endswith(".safetensors"))
    if listed:
        return folder / listed[0]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            return folder / sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
        except (ValueError, KeyError, TypeError, IndexError):
            pass
    shards = sorted(folder.glob("*.safetensors"))
    return shards[0] if shards else folder / "model.safetensors"
