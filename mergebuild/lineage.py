"""Lineage: the recipe written into every output's metadata, and reading it back from a file.

Written keys (safetensors __metadata__ values are strings; JSON is stored as a string):
- mergebuild.recipe: the sub-DAG that made the file: methods, versions, parameters, input files
  with sha256 and AutoV2 hashes; an input that carries its own lineage nests it ("made_by"),
  so lineage spans generations of files;
- mergebuild.version;
- sd_merge_recipe / sd_merge_models: A1111's keys, so A1111-family UIs show the lineage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergebuild import __version__
from mergebuild.explain import selection
from mergebuild.plan.planner import Plan
from mergebuild.store.hashing import autov2
from mergebuild.tensors.header import read_header

A1111_NAMES = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "copy": "No interpolation"}
RECIPE_KEY = "mergebuild.recipe"


def recipe(plan: Plan, node: str, hashes: dict[str, str] | None) -> dict:
    """The recipe tree of `node`. With hashes None, sources are identified by stat instead of
    sha256 (cheap, for deciding whether an output must be rewritten)."""
    if node in plan.sources:
        return _model_node(plan, node, hashes)
    spec = plan.mergefile.merges[node]
    method = plan.merges[node].method
    return {
        "kind": "merge",
        "name": node,
        "tool": "mergebuild",
        "method": spec.method,
        "version": method.version,
        "params": spec.params,
        "dtype": spec.dtype,
        "discard": spec.discard,
        **{k: v for k, v in selection(spec).items() if v},
        "inputs": [recipe(plan, i, hashes) for i in spec.inputs],
    }


def _model_node(plan: Plan, node: str, hashes: dict[str, str] | None) -> dict:
    source = plan.sources[node]
    out = {"kind": "model", "name": node, "file": source.path.name}
    if hashes is None:
        out["stat"] = source.stats()
    else:
        out["sha256"] = hashes[node]
        out["autov2"] = autov2(hashes[node])
        if source.addnet_hash:
            out["addnet_hash"] = source.addnet_hash
    made_by = made_by_from_metadata(source.metadata)
    if made_by is not None:
        out["made_by"] = made_by
    return out


def made_by_from_metadata(metadata: dict[str, str]) -> dict | None:
    """The recipe tree a file's metadata records: mergebuild's own, or A1111's / supermerger's."""
    if RECIPE_KEY in metadata:
        try:
            return json.loads(metadata[RECIPE_KEY])
        except json.JSONDecodeError:
            return None
    if "sd_merge_recipe" in metadata:
        return _from_a1111(metadata)
    if metadata.get("modelspec.merged_from"):
        names = [n.strip() for n in metadata["modelspec.merged_from"].split(",") if n.strip()]
        return {"kind": "merge", "name": metadata.get("modelspec.title", ""), "tool": "modelspec", "method": "merge",
                "params": {}, "inputs": [{"kind": "model", "name": n, "file": n} for n in names]}
    return None


def _from_a1111(metadata: dict[str, str]) -> dict | None:
    try:
        root = json.loads(metadata["sd_merge_recipe"])
        models = json.loads(metadata.get("sd_merge_models") or "{}")
    except json.JSONDecodeError:
        return None
    return _a1111_node(root, models, depth=0) if isinstance(root, dict) else None


def _a1111_node(r: dict, models: dict, depth: int) -> dict:
    inputs = []
    # A1111 writes primary/secondary/tertiary_model_hash; supermerger writes model_a/b/c
    for role, alias in (("primary", "model_a"), ("secondary", "model_b"), ("tertiary", "model_c")):
        h = r.get(f"{role}_model_hash") or r.get(alias)
        if not h:
            continue
        entry = models.get(h, {}) if isinstance(models, dict) else {}
        child = {"kind": "model", "name": entry.get("name", h[:10]), "sha256": h, "autov2": h[:10]}
        inner = entry.get("sd_merge_recipe")
        if isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except json.JSONDecodeError:
                inner = None
        if isinstance(inner, dict) and depth < 64:
            child["made_by"] = _a1111_node(inner, models, depth + 1)
        inputs.append(child)
    params = {"multiplier": r.get("multiplier")} if r.get("multiplier") is not None else {}
    return {
        "kind": "merge",
        "name": r.get("custom_name") or "",
        "tool": r.get("type", "webui"),
        "method": r.get("interp_method") or r.get("mode") or "?",
        "params": params,
        "inputs": inputs,
    }


def virtual_hash(tree: dict) -> str:
    """A stand-in sha256 for a merge that has no file (an intermediate kept only in the cache)."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def build_metadata(plan: Plan, merge: str, hashes: dict[str, str], legacy: dict[str, str],
                   data_sha256: str) -> dict[str, str]:
    tree = recipe(plan, merge, hashes)
    sd_recipe, sd_models = _a1111(plan, merge, tree, hashes, legacy)
    return {
        **plan.merges[merge].output_metadata,
        "format": "pt",
        "mergebuild.version": __version__,
        RECIPE_KEY: json.dumps(tree, separators=(",", ":")),
        "sd_merge_recipe": json.dumps(sd_recipe),
        "sd_merge_models": json.dumps(sd_models),
        **modelspec(plan, merge, tree, data_sha256),
    }


# ModelSpec 1.0.1 (Stability AI): architecture and implementation ids by detected layout
MODELSPEC_ARCH = {
    "sd1": ("stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion"),
    "sd2": ("stable-diffusion-v2", "https://github.com/Stability-AI/stablediffusion"),
    "sdxl": ("stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
}


def modelspec(plan: Plan, merge: str, tree: dict, data_sha256: str) -> dict[str, str]:
    arch = plan.merges[merge].arch
    architecture, implementation = MODELSPEC_ARCH.get(arch.name if arch else "", ("unknown", "unknown"))
    spec = plan.mergefile.merges[merge]
    title = spec.output.stem if spec.output is not None else merge
    merged_from = ", ".join(child.get("file") or child["name"] for child in tree["inputs"])
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": build_date(),
        "modelspec.merged_from": merged_from,
        "modelspec.hash_sha256": "0x" + data_sha256,
    }


def build_date() -> str:
    """Today (UTC), or the day SOURCE_DATE_EPOCH names: reproducible builds get equal bytes."""
    import datetime
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else \
        datetime.datetime.now(datetime.timezone.utc)
    return moment.date().isoformat()


def _a1111(plan: Plan, merge: str, tree: dict, hashes: dict, legacy: dict) -> tuple[dict, dict]:
    spec = plan.mergefile.merges[merge]
    child_hashes = [_node_hash(child) for child in tree["inputs"]]
    roles = ["primary_model_hash", "secondary_model_hash", "tertiary_model_hash"]
    sd_recipe = {"type": "mergebuild"}
    for i, role in enumerate(roles):
        sd_recipe[role] = child_hashes[i] if i < len(child_hashes) else None
    sd_recipe.update(
        interp_method=A1111_NAMES.get(spec.method, spec.method),
        multiplier=spec.params.get("alpha"),
        save_as_half=spec.dtype == "float16",
        custom_name=merge,
        config_source=0,
        bake_in_vae="None",
        discard_weights=spec.discard or "",
        is_inpainting=False,
        is_instruct_pix2pix=False,
        mergebuild_params=spec.params,
    )
    models: dict = {}
    for child, h, name in zip(tree["inputs"], child_hashes, spec.inputs):
        if name in plan.sources:
            own = plan.sources[name].metadata
            inner = own.get("sd_merge_recipe")
            models[h] = {"name": child["file"], "legacy_hash": legacy.get(name), "sd_merge_recipe": inner}
            try:
                models.update(json.loads(own.get("sd_merge_models") or "{}"))
            except json.JSONDecodeError:
                pass
        else:
            inner_recipe, inner_models = _a1111(plan, name, child, hashes, legacy)
            models[h] = {"name": f"{name} (intermediate)", "legacy_hash": None,
                         "sd_merge_recipe": json.dumps(inner_recipe)}
            models.update(inner_models)
    return sd_recipe, models


def _node_hash(node: dict) -> str:
    return node["sha256"] if node["kind"] == "model" else virtual_hash(node)


def read_lineage(path: Path) -> dict:
    """The lineage tree of a file (or model folder), from its header alone: {"file", "made_by"}."""
    path = Path(path)
    header = read_header(_first_shard(path) if path.is_dir() else path)
    return {"kind": "model", "name": Path(path).name, "file": Path(path).name,
            "made_by": made_by_from_metadata(header.metadata)}


def _first_shard(folder: Path) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    shards = sorted(folder.glob("*.safetensors"))
    return shards[0] if shards else folder / "model.safetensors"
