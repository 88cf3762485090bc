"""Lineage: the recipe written into every output's metadata, and reading it back from a file.

Written keys (safetensors __metadata__ values are strings; JSON is stored as a string):
- mergebuild.recipe: {"format": 2, "target", "nodes": {id: node}}: the recipe nodes
  (planning/recipe.py) of the output and everything it is made from, each once, inputs by id, with
  each source file's sha256 and AutoV2. A source that carries its own lineage brings its nodes
  along under ids prefixed with its name ("real/mix1"), its node pointing at their root through
  "made_by"; so lineage spans generations and stays linear in the size of the DAG;
- mergebuild.identity: what the output holds (status compares it); mergebuild.version;
- sd_merge_recipe / sd_merge_models: A1111's keys, written as A1111's run_modelmerger writes
  them (each model's own recipe nested as an object; models by the sha256 of their file, a merge
  of this build that has an output file too, one without a file under a stand-in hash named
  "NAME (intermediate)"), so A1111-family UIs and Civitai read the lineage;
- the inputs' own metadata, copied by A1111's rule ([settings] copy_metadata, record/inherit.py);
- ModelSpec 1.0.1 keys.

Lineage found in a source is untrusted: what does not fit the expected shape is dropped, with
a warning, never a crash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild import __version__
from mergebuild.layouts.blocks import PRESETS
from mergebuild.methods.registry import get_method
from mergebuild.planning.planner import Plan
from mergebuild.planning.recipe import FORMAT, IDENTITY_KEY, RECIPE_KEY
from mergebuild.record.hashes import autov2
from mergebuild.record.inherit import copied_metadata
from mergebuild.tensors.folder import is_folder_output, read_manifest
from mergebuild.tensors.header import read_header

A1111_NAMES = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "copy": "No interpolation"}
MAX_DEPTH = 10_000  # generations followed in a foreign nested recipe
NODE_FIELDS = {"kind": str, "name": str, "file": str, "tool": str, "method": str, "version": int, "params": dict,
               "dtype": str, "discard": str, "sha256": str, "autov2": str, "addnet_hash": str, "content": str,
               "made_by": str, "inputs": list, "rules": list, "include": list, "exclude": list,
               "clip_to_inputs": bool, "fix_clip_position_ids": bool, "settings": dict, "output": dict,
               "vocab": str, "tokenizer_source": str, "tokenizers": dict}  # the last three: planning/vocab.py


@dataclass
class SourceHashes:
    """What a build learns about each source file, and each output file upstream, while it runs."""

    sha256: dict[str, str] = field(default_factory=dict)
    legacy: dict[str, str] = field(default_factory=dict)  # A1111's old 8-hex hash
    addnet: dict[str, str] = field(default_factory=dict)  # kohya's hash of a LoRA's tensor data
    # merges of this build with an output file, upstream of the one being written: its file's
    # sha256 and old hash (the file is written first, or is current)
    outputs: dict[str, str] = field(default_factory=dict)
    output_legacy: dict[str, str] = field(default_factory=dict)
    loras: set[str] = field(default_factory=set)  # sources read as LoRA files (their metadata is not copied)

    @staticmethod
    def placeholders(plan: Plan, lora_files: set[str]) -> "SourceHashes":
        """Stand-ins exactly as long as the real hashes, and distinct (hashes are keys of A1111's
        sd_merge_models): the header's size is known up front, at most what it will be."""
        names = sorted(plan.sources)
        files = sorted(n for n in plan.merges if has_file(plan, n))
        fake = {n: f"{i:064x}" for i, n in enumerate(names + files)}
        return SourceHashes({n: fake[n] for n in names}, {n: "0" * 8 for n in names},
                            {n: "0" * 64 for n in lora_files}, {n: fake[n] for n in files},
                            {n: "0" * 8 for n in files}, set(lora_files))


def has_file(plan: Plan, merge: str) -> bool:
    """Whether a merge's output is one file, which A1111 and Civitai know by its sha256 (a
    model folder is not: a merge with one is recorded like an intermediate)."""
    out = plan.merges[merge].spec.output
    return out is not None and not is_folder_output(out)


@dataclass
class Imported:
    nodes: dict[str, dict] = field(default_factory=dict)
    root: str | None = None
    warnings: list[str] = field(default_factory=list)


# --- writing ---------------------------------------------------------------------------------
def recipe_doc(plan: Plan, target: str, hashes: SourceHashes, warnings: list[str] | None = None) -> dict:
    nodes: dict[str, dict] = {}
    for name in plan.recipe.closure(target):
        node = dict(plan.recipe.nodes[name])
        if name != target and name in hashes.outputs:  # an upstream output file (lineage only)
            node.update(sha256=hashes.outputs[name], autov2=autov2(hashes.outputs[name]))
        if name in plan.sources:
            sha = hashes.sha256[name]
            node.update(sha256=sha, autov2=autov2(sha))
            if name in hashes.addnet:
                node["addnet_hash"] = hashes.addnet[name]
            imported = import_lineage(plan.sources[name].metadata, name)
            if warnings is not None:
                warnings += imported.warnings
            if imported.root is not None:
                nodes.update(imported.nodes)
                node["made_by"] = imported.root
        nodes[name] = node
    return {"format": FORMAT, "target": target, "nodes": nodes}


def build_metadata(plan: Plan, merge: str, hashes: SourceHashes, data_sha256: str, date: str,
                   warnings: list[str] | None = None) -> dict[str, str]:
    doc = recipe_doc(plan, merge, hashes, warnings)
    sd_recipe, sd_models = _a1111(plan, merge, hashes)
    return {
        **copied_metadata(plan, merge, hashes.loras),
        **plan.merges[merge].output_metadata,
        "format": "pt",
        "mergebuild.version": __version__,
        IDENTITY_KEY: plan.merges[merge].identity,
        RECIPE_KEY: json.dumps(doc, separators=(",", ":"), allow_nan=False),
        "sd_merge_recipe": json.dumps(sd_recipe, allow_nan=False),
        "sd_merge_models": json.dumps(sd_models, allow_nan=False),
        **modelspec(plan, merge, data_sha256, date),
    }


def header_budget(metadata: dict[str, str]) -> list[tuple[str, int]]:
    """The metadata's parts by size, largest first (to say what made a header too big)."""
    parts = [(k, len(k) + len(v)) for k, v in metadata.items()]
    try:
        nodes = json.loads(metadata.get(RECIPE_KEY, "{}")).get("nodes", {})
        parts += [(f"{RECIPE_KEY} node {n!r}", len(json.dumps(v))) for n, v in nodes.items()]
    except ValueError:
        pass
    return sorted(parts, key=lambda p: -p[1])


def modelspec(plan: Plan, merge: str, data_sha256: str, date: str) -> dict[str, str]:
    arch = plan.merges[merge].arch
    # ModelSpec 1.0.1 (Stability AI) ids, from the architecture's file
    ids = arch.modelspec if arch else {}
    architecture, implementation = ids.get("architecture", "unknown"), ids.get("implementation", "unknown")
    if plan.merges[merge].method.name == "lora_extract" and architecture != "unknown":
        architecture += "/lora"  # ModelSpec's (and kohya's) id of a LoRA for that architecture
    spec = plan.mergefile.merges[merge]
    title = spec.output.stem if spec.output is not None else merge
    merged_from = ", ".join(plan.sources[i].path.name if i in plan.sources else i for i in spec.inputs)
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": date,
        "modelspec.merged_from": merged_from,
        "modelspec.hash_sha256": "0x" + data_sha256,
    }


def today() -> str:
    """Today (UTC), or the day SOURCE_DATE_EPOCH names: reproducible builds get equal bytes."""
    import datetime
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else None
    except (ValueError, OverflowError, OSError):
        moment = None
    moment = moment or datetime.datetime.now(datetime.timezone.utc)
    return moment.date().isoformat()


def virtual_hash(identity: str) -> str:
    """A stand-in sha256 for a merge that has no file (an intermediate kept only in the cache)."""
    return hashlib.sha256(f"mergebuild:{identity}".encode()).hexdigest()


def _a1111(plan: Plan, target: str, hashes: SourceHashes) -> tuple[dict, dict]:
    """A1111's sd_merge_recipe of the target, and sd_merge_models: every model and merge it is
    made from by hash, each once, with its own recipe nested as an object (as A1111 nests what
    read_metadata_from_safetensors parsed), and the inputs' own sd_merge_models merged in."""
    closure = [n for n in plan.recipe.closure(target) if n in plan.merges]

    def hash_of(name: str) -> str:
        if name in plan.sources:
            return hashes.sha256[name]
        return hashes.outputs.get(name) or virtual_hash(plan.merges[name].identity)

    models: dict = {}
    recipes = {}
    for name in closure:  # inputs first: an upstream merge's recipe is ready before its readers
        recipes[name] = _a1111_recipe(plan, name, hash_of)
        for i in plan.mergefile.merges[name].inputs:
            h = hash_of(i)
            if i in plan.sources:
                own = plan.sources[i].metadata
                models[h] = {"name": plan.sources[i].path.name, "legacy_hash": hashes.legacy.get(i),
                             "sd_merge_recipe": a1111_value(own.get("sd_merge_recipe"))}
                models.update(_nested(_foreign_models(own)))
            elif i in hashes.outputs:
                models[h] = {"name": plan.merges[i].spec.output.name, "legacy_hash": hashes.output_legacy.get(i),
                             "sd_merge_recipe": recipes[i]}
            else:
                models[h] = {"name": f"{i} (intermediate)", "legacy_hash": None, "sd_merge_recipe": recipes[i]}
    return recipes[target], models


def a1111_value(value):
    """A metadata value as A1111's read_metadata_from_safetensors gives it: a string that starts
    with `{` parsed as JSON (kept as it is if it does not parse)."""
    if isinstance(value, str) and value[:1] == "{":
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _nested(models: dict) -> dict:
    """Foreign sd_merge_models entries with their recipes as objects (older mergebuild files
    nested them as strings)."""
    out = {}
    for h, entry in models.items():
        inner = entry.get("sd_merge_recipe")
        out[h] = {**entry, "sd_merge_recipe": a1111_value(inner)} if isinstance(inner, str) else entry
    return out


def _a1111_recipe(plan: Plan, name: str, hash_of) -> dict:
    spec = plan.mergefile.merges[name]
    roles = ["primary_model_hash", "secondary_model_hash", "tertiary_model_hash"]
    recipe = {"type": "mergebuild"}
    for i, role in enumerate(roles):
        recipe[role] = hash_of(spec.inputs[i]) if i < len(spec.inputs) else None
    recipe.update(
        interp_method=A1111_NAMES.get(spec.method, spec.method),
        multiplier=multiplier(spec.method, spec.params),
        save_as_half=spec.dtype == "float16",
        custom_name=name,
        config_source=0,
        bake_in_vae="None",
        discard_weights=spec.discard or "",
        is_inpainting=False,
        is_instruct_pix2pix=False,
        mergebuild_params=spec.params,
    )
    return recipe


MULTIPLIERS = ("alpha", "strength", "lambda")  # the parameter A1111's multiplier stands for, by method


def multiplier(method: str, params: dict) -> float:
    """A1111's `multiplier`, always a number: the method's alpha (else strength, lambda; as
    written, else its default); a per-block value gives its BASE value, as supermerger records
    base_alpha beside its block list; 1.0 for a method with none of them. The whole value stays
    in mergebuild_params and mergebuild.recipe."""
    found = get_method(method)
    values = {**(found.defaults() if found else {}), **params}
    for name in MULTIPLIERS:
        number = _first_number(values.get(name))
        if number is not None:
            return number
    return 1.0


def _first_number(value) -> float | None:
    if isinstance(value, str) and value in PRESETS:
        value = PRESETS[value]
    if isinstance(value, dict):
        value = value.get("gradient", value.get("BASE", value.get("default")))
    if isinstance(value, list) and value:
        value = value[0]  # BASE first (blocks), or the first layer's (a gradient)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


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
