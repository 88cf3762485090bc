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

Lineage found in a source is untrusted: record/lineage_read.py reads it back, dropping what does
not fit the expected shape with a warning, never a crash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from mergebuild import __version__
from mergebuild.layouts.blocks import PRESETS
from mergebuild.methods.registry import get_method
from mergebuild.planning.planner import Plan
from mergebuild.planning.recipe import FORMAT, IDENTITY_KEY, RECIPE_KEY
from mergebuild.record.hashes import autov2
from mergebuild.tensors.folder import is_folder_output

A1111_NAMES = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "copy": "No interpolation"}


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




# --- writing ---------------------------------------------------------------------------------
def recipe_doc(plan: Plan, target: str, hashes: SourceHashes, warnings: list[str] | None = None) -> dict:
    # the readers of the inputs' own lineage: imported when metadata is written (a no-op writes none)
    from mergebuild.record.lineage_read import import_lineage

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
    from mergebuild.record.inherit import copied_metadata

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
    from mergebuild.record.lineage_read import _foreign_models

    closure = [n for n in plan.recipe.closure(target) if n in plan.merges]

    def hash_of(name: str) -> str:
        if name in plan.sources:
            return hashes.sha256[name]
        if name in plan.statistics:  # a computed source (a Fisher): known by its identity
            return virtual_hash(plan.recipe.identities[name])
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
            elif i in plan.statistics:
                node = plan.recipe.nodes[i]
                models[h] = {"name": f"{i} (the Fisher of {node['inputs'][0]}, computed)", "legacy_hash": None,
                             "sd_merge_recipe": None}
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
