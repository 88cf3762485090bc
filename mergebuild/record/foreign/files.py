"""A model file's own recipe as a Mergefile: "rebuild this file from its parents".

A file records how it was made in its metadata: mergebuild's `mergebuild.recipe`, A1111's (and
supermerger's) `sd_merge_recipe` with `sd_merge_models`, sd-mecha's `mecha_recipe`; a mergekit
output folder holds `mergekit_config.yml`. The recipe is read into lineage nodes with the reader
`mergebuild lineage` uses (record/lineage.py), and each parent is looked for by its sha256 (A1111
and mergebuild record the file's; AutoV2 is its first 10 hex digits) in the --models folders. A
parent that is not found but records its own recipe is rebuilt from it; one that does neither
gets a placeholder path, so that `mergebuild -n` stops on it, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Draft, DraftMerge, DraftModel, DraftRule, Value
from mergebuild.mergefile.parse import MERGE_FIELDS, SETTINGS_FIELDS
from mergebuild.methods.registry import get_method
from mergebuild.planning.recipe import RECIPE_KEY
from mergebuild.record.foreign.finder import ModelFinder
from mergebuild.record.lineage_read import _first_shard, import_lineage
from mergebuild.tensors.header import read_header

MAX_TEXT = 10_000_000  # characters of a recipe kept in metadata or a folder's YAML, at most
A1111_METHODS = {"weighted sum": ("weighted_sum", 2), "weight sum": ("weighted_sum", 2),
                 "add difference": ("add_difference", 3), "no interpolation": ("copy", 1)}
NODE_MERGE_FIELDS = ("dtype", "discard", "include", "exclude", "clip_to_inputs", "fix_clip_position_ids",
                     "vocab", "tokenizer_source")


def import_model_file(path: Path, draft: Draft, finder: ModelFinder) -> None:
    if path.is_dir() and (path / "mergekit_config.yml").is_file():
        from mergebuild.record.foreign.mergekit import import_mergekit

        import_mergekit(_read_text(path / "mergekit_config.yml"), path / "mergekit_config.yml", draft, finder)
        draft.source = f"the mergekit_config.yml of {path.name}"
        _name_output(draft, path)
        return
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise InputError(f"{path}: a folder with no .safetensors file and no mergekit_config.yml: no recipe to read")
    header = read_header(_first_shard(path) if path.is_dir() else path)
    metadata = header.metadata
    if RECIPE_KEY not in metadata and "sd_merge_recipe" not in metadata and "mecha_recipe" in metadata:
        from mergebuild.record.foreign.mecha import import_mecha

        text = metadata["mecha_recipe"][:MAX_TEXT]
        import_mecha(text, path.with_suffix(".mecha"), draft, finder, origin=f"the sd-mecha recipe in {path.name}")
        _name_output(draft, path)
        return
    if RECIPE_KEY not in metadata and "sd_merge_recipe" not in metadata:
        if metadata.get("modelspec.merged_from"):
            raise InputError(f"{path}: its metadata names its parents (ModelSpec merged_from: "
                             f"{str(metadata['modelspec.merged_from'])[:120]}) but not how they were merged")
        raise InputError(f"{path}: no recipe in its metadata (not made by mergebuild, A1111, supermerger or sd-mecha)")
    imported = import_lineage(metadata, "file")
    kind = "mergebuild recipe" if RECIPE_KEY in metadata else "A1111 merge recipe (sd_merge_recipe)"
    draft.source = f"the {kind} in {path.name}"
    draft.recorded = RECIPE_KEY in metadata
    for warning in imported.warnings:
        draft.unexpressed.append(warning)
    if imported.root is None or imported.nodes.get(imported.root, {}).get("kind") != "merge":
        raise InputError(f"{path}: its recipe metadata is not a recipe mergebuild can read")
    raw = _a1111_recipes(metadata) if RECIPE_KEY not in metadata else {}
    _Rebuild(draft, finder, imported.nodes, raw).run(imported.root, path)


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TEXT:
            raise InputError(f"{path}: {path.stat().st_size:,} bytes: too large for a recipe")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None


def _name_output(draft: Draft, path: Path) -> None:
    for merge in draft.merges.values():
        if "output" in merge.fields:
            merge.fields["output"] = Value(f"out/{path.name}", f"a rebuild of {path.name}, under out/")


def _a1111_recipes(metadata: dict) -> dict[str, dict]:
    """A1111's own recipe objects by the id import_lineage gives their merge: the file's own
    ("file/<custom_name>") and each parent's ("file/<hash16>/recipe"): the fields lineage leaves
    out (save_as_half, discard_weights, bake_in_vae) are read from them."""
    out = {}
    try:
        root = json.loads(metadata["sd_merge_recipe"])
        models = json.loads(metadata.get("sd_merge_models") or "{}")
    except (ValueError, TypeError, RecursionError):
        return out
    if isinstance(root, dict):
        out[f"file/{root.get('custom_name') or 'merge'}"] = root
    for h, entry in (models.items() if isinstance(models, dict) else ()):
        inner = entry.get("sd_merge_recipe") if isinstance(entry, dict) else None
        if isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except (ValueError, RecursionError):
                inner = None
        if isinstance(inner, dict) and isinstance(h, str):
            out[f"file/{h[:16]}/recipe"] = inner
    return out


class _Rebuild:
    def __init__(self, draft: Draft, finder: ModelFinder, nodes: dict, raw: dict):
        self.draft, self.finder, self.nodes, self.raw = draft, finder, nodes, raw
        self.names: dict[str, str] = {}
        self.hints: dict[str, str] = {}  # a parent's recipe -> the parent's file stem (its merge's name)

    def run(self, root: str, path: Path) -> None:
        # post-order without recursion: a node's inputs (and a missing parent's own recipe) first
        stack = [(root, False)]
        visiting: set[str] = set()  # started, not finished: meeting one again is a cycle
        while stack:
            nid, expanded = stack.pop()
            if nid in self.names:
                continue
            if not expanded:
                if nid in visiting:
                    raise InputError(f"{path}: its recipe is circular ({nid.split('/', 1)[-1]!r} is made from itself)")
                visiting.add(nid)
            node = self.nodes[nid]
            if node["kind"] == "model":
                if expanded:
                    rebuilt = self.names.get(node.get("made_by"))
                    self.names[nid] = rebuilt or self._missing(nid, node)
                    if rebuilt in self.draft.merges:
                        digest = node.get("sha256") or node.get("autov2") or "no hash"
                        self.draft.merges[rebuilt].comments.append(
                            f"{node.get('file') or node.get('name')} (sha256 {digest[:10]}) was not found: rebuilt "
                            "from the recipe it records")
                    continue
                found = self._find(node)
                made_by = node.get("made_by")
                if found is not None or made_by not in self.nodes or self.nodes[made_by].get("kind") != "merge":
                    self.names[nid] = self._model(nid, node, found)
                else:
                    file = str(node.get("file") or node.get("name") or "")
                    self.hints[made_by] = Path(file.replace("\\", "/")).stem
                    stack += [(nid, True), (made_by, False)]
                continue
            if not expanded:
                found = self.finder.by_hash(node["sha256"], (node.get("output") or {}).get("name")) \
                    if nid != root and isinstance(node.get("sha256"), str) else None
                if found is not None:  # an upstream merge that has its own file, at hand: read it
                    self.names[nid] = self._model(nid, {**node, "file": found.name}, found)
                    continue
                stack.append((nid, True))
                stack += [(i, False) for i in reversed(node.get("inputs", [])) if i not in self.names]
                continue
            self.names[nid] = self._merge(nid, node, root == nid)
        out = self.draft.merges[self.names[root]]
        out.fields["output"] = Value(f"out/{path.name}", f"a rebuild of {path.name}, under out/")
        out.comments.insert(0, f"{path.name} as its metadata records it")

    def _find(self, node: dict) -> Path | None:
        digest = node.get("sha256") or node.get("autov2")
        name = node.get("file") or node.get("name")
        if digest:
            return self.finder.by_hash(digest, name)
        return self.finder.by_name(name) if name else None

    def _model(self, nid: str, node: dict, found: Path | None) -> str:
        file = str(node.get("file") or node.get("name") or nid.rsplit("/", 1)[-1])
        name = self.draft.name(found.stem if found is not None else Path(file.replace("\\", "/")).stem)
        digest = node.get("sha256") or node.get("autov2")
        said = f"sha256 {digest[:10]}" if digest else "no hash recorded: matched by name"
        if found is not None:
            self.draft.models[name] = DraftModel(self.draft.path_text(found), f"{file}, {said}")
            return name
        return self._missing(nid, node, name)

    def _missing(self, nid: str, node: dict, name: str | None = None) -> str:
        file = str(node.get("file") or node.get("name") or nid.rsplit("/", 1)[-1])
        name = name or self.draft.name(Path(file.replace("\\", "/")).stem)
        digest = node.get("sha256") or node.get("autov2") or "no hash"
        self.draft.models[name] = DraftModel(f"MISSING: {file} (sha256 {digest[:10]}; not found in the --models "
                                             "folders)", f"recorded as {file}")
        self.draft.missing.append(f"{file} (sha256 {digest}): not found in the --models folders"
                                  + ("" if self.finder.dirs else " (none given)"))
        return name

    def _merge(self, nid: str, node: dict, is_root: bool) -> str:
        inputs = [self.names[i] for i in node.get("inputs", [])]
        label = self.hints.get(nid) or node.get("name") or nid.rsplit("/", 1)[-1]
        name = self.draft.name(label)
        tool = node.get("tool", "mergebuild")
        if tool == "mergebuild":
            merge = self._mergebuild(node, inputs, label)
        else:
            merge = self._a1111(nid, node, inputs, label, tool)
        self.draft.merges[name] = merge
        return name

    def _mergebuild(self, node: dict, inputs: list[str], label: str) -> DraftMerge:
        method = str(node.get("method"))
        spec = get_method(method)
        if spec is None:
            raise InputError(f"merge {label!r}: method {method!r}: not a method of this mergebuild (a plugin's?)")
        if isinstance(node.get("version"), int) and node["version"] != spec.version:
            self.draft.differences.append(f"merge {label!r}: recorded with {method} version {node['version']}; this "
                                          f"mergebuild's is version {spec.version}, whose numbers differ")
        fields = {k: Value(v, "recorded") for k, v in node.get("params", {}).items() if k not in MERGE_FIELDS}
        for key in NODE_MERGE_FIELDS:
            if node.get(key) not in (None, False, [], ""):
                fields[key] = Value(node[key], "recorded")
        settings = node.get("settings") if isinstance(node.get("settings"), dict) else {}
        for key, value in settings.items():
            if key in SETTINGS_FIELDS:
                self.draft.setting(key, value, f"recorded by merge {label!r}")
            else:
                self.draft.unexpressed.append(f"merge {label!r}: setting {key} = {value!r}: unknown to this mergebuild")
        rules = []
        for r in node.get("rules", []):
            if not isinstance(r, dict):
                continue
            params = {k: v for k, v in r.items() if k not in ("blocks", "match", "regex", "not")}
            match = r.get("match") or []
            rules.append(DraftRule(params, list(match) if isinstance(match, list) else [match], r.get("regex"),
                                   r.get("blocks"), bool(r.get("not"))))
        comments = [f"merge {label!r}"]
        if isinstance(node.get("output"), dict) and node["output"].get("name"):
            comments.append(f"it wrote {node['output']['name']} in the original build: add an output to write it here")
        return DraftMerge(Value(method, "recorded"), Value(inputs), fields, rules, comments)

    def _a1111(self, nid: str, node: dict, inputs: list[str], label: str, tool: str) -> DraftMerge:
        raw = self.raw.get(nid, {})
        interp = str(node.get("method", "")).strip()
        mapped = A1111_METHODS.get(interp.lower())
        if mapped is None:
            raise InputError(f"merge {label!r}: {tool}'s {interp!r}: only A1111's Weighted sum, Add difference and No "
                             "interpolation are read")
        method, arity = mapped
        if len(inputs) < arity:
            raise InputError(f"merge {label!r}: {interp} records {len(inputs)} models, it takes {arity}")
        if len(inputs) > arity:
            self.draft.unexpressed.append(f"merge {label!r}: {interp} reads {arity} models; the other "
                                          f"{len(inputs) - arity} recorded are left out")
        fields: dict[str, Value] = {}
        spec = get_method(method)
        if method != "copy":
            multiplier = node.get("params", {}).get("multiplier", raw.get("alpha"))
            if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
                raise InputError(f"merge {label!r}: {interp} without a numeric multiplier")
            fields["alpha"] = Value(multiplier, f"{tool}'s multiplier")
            if spec.param("arithmetic") and "a1111" in spec.param("arithmetic").choices:
                fields["arithmetic"] = Value("a1111", "A1111's own arithmetic (in the inputs' dtype, its order of ops)")
        if raw.get("save_as_half") is True:
            fields["dtype"] = Value("float16", "save_as_half")
        discard = raw.get("discard_weights")
        if isinstance(discard, str) and discard:
            fields["discard"] = Value(discard, "discard_weights")
        merge = DraftMerge(Value(method, f"{tool}: {interp}"), Value(inputs[:arity]), fields, [], [f"merge {label!r}"])
        vae = raw.get("bake_in_vae")
        if isinstance(vae, str) and vae and vae != "None":
            self.draft.unexpressed.append(f"merge {label!r}: bake_in_vae {vae!r}: add a bake_vae merge after it by "
                                          "hand (the VAE's hash is not recorded)")
        return merge
