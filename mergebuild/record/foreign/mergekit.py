"""mergekit's YAML configs (and mergekit-multi files) as Mergefiles.

The schema is mergekit 0.1.x's `MergeConfiguration` (mergekit/config.py): merge_method,
base_model, models (each with parameters) or slices (sources with layer_range), parameters,
dtype, out_dtype, tokenizer_source or tokenizer. A mergekit-multi file holds several such
documents, each with a `name`; a stage reads another by naming it as a model. docs/import.md lists
what maps to what.

How each parameter becomes values and rules: mergekit_params.py; slices that stack layers (a
passthrough, merges per slice): mergekit_slices.py; dtype and vocabulary: mergekit_fields.py;
reading the YAML, and a model folder's mergekit_config.yml as lineage: mergekit_read.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Draft, DraftMerge, DraftModel, DraftRule, Unexpressible, Value
from mergebuild.methods.registry import get_method
from mergebuild.record.foreign.finder import ModelFinder
from mergebuild.record.foreign.mergekit_fields import dtype, tokenizer_source, vocabulary
from mergebuild.record.foreign.mergekit_params import MISSING, Params, Ref, Segment
from mergebuild.record.foreign.mergekit_read import load_documents, parse_ref, ref_values
from mergebuild.record.foreign.mergekit_slices import read_segments, stack

FIELDS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
          "tokenizer_source", "tokenizer", "chat_template", "name")

# mergekit's generalised task arithmetic family: mergebuild method, sign, sparsifies, normalize, rescale
GTA = {
    "task_arithmetic": ("task_arithmetic", None, False, False, False),
    "ties": ("ties", "mass", True, True, False),
    "dare_ties": ("dare_ties", "mass", True, False, True),
    "dare_linear": ("dare", None, True, False, True),
    "breadcrumbs": ("breadcrumbs", "none", True, False, False),
    "breadcrumbs_ties": ("breadcrumbs", "mass", True, False, False),
    "della": ("della", "mass", True, True, True),
    "della_linear": ("della", "none", True, False, True),
}
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
# the parameters each mergekit method reads: (the config's, each model's)
KNOWN = {
    "linear": ({"normalize"}, {"weight"}),
    "slerp": ({"t"}, set()),
    "model_stock": ({"filter_wise"}, set()),
    "passthrough": (set(), {"scale"}),
    **{m: ({"int8_mask", "normalize", "rescale", "lambda"},
           {"weight", "density"} | ({"gamma"} if "breadcrumbs" in m else set()) | ({"epsilon"} if "della" in m else set()))
       for m in GTA},
}


# --- a Mergefile -----------------------------------------------------------------------------
def import_mergekit(text: str, path: Path, draft: Draft, finder: ModelFinder) -> None:
    where = str(path)
    docs = load_documents(text, where)
    stages: dict[str | None, dict] = {}
    for doc in docs:
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise InputError(f"{where}: name {name!r} is not a string")
        if name in stages:
            raise InputError(f"{where}: " + (f"two stages are named {name!r}" if name else "two unnamed stages "
                                             "(mergekit-multi allows one: the final merge)"))
        stages[name] = doc
    multi = len(stages) > 1 or None not in stages
    kind = "mergekit-multi file" if multi else "mergekit YAML"
    draft.source = f"{kind} {path.name}"
    deps = {n: _stage_refs(doc, stages, where) for n, doc in stages.items()}
    order = _topological(deps, where)
    read_by_others = {d for ds in deps.values() for d in ds}
    names = {n: draft.name(n if n is not None else path.stem) for n in order}
    ctx = _Context(draft, finder, path.parent, names)
    failed: dict[str | None, str] = {}
    for stage in order:
        label = f"stage {stage!r}" if stage is not None else ("the final merge" if multi else "the merge")
        try:
            lost = [d for d in deps[stage] if d in failed]
            if lost:
                raise Unexpressible(f"it reads stage {lost[0]!r}, which is left out")
            output = None
            if stage not in read_by_others:
                output = Value(f"out/{names[stage]}", "mergekit writes to the folder its command line names; "
                               "here it goes under out/")
            merges = _stage(stages[stage], label, ctx, names[stage], output)
            if multi and stage in read_by_others:
                merges[names[stage]].comments.append(f"mergekit-multi writes stage {stage!r} to its "
                                                     "--intermediate-dir; here it lives in the cache (add an output "
                                                     "to keep a file)")
            draft.merges.update(merges)
        except Unexpressible as e:
            failed[stage] = str(e)
            draft.unexpressed.append(f"{label}: {e}: left out")
    if not draft.merges:
        raise InputError(f"{where}: nothing in it can be written as a Mergefile: " + "; ".join(failed.values()))
    for items in (draft.unexpressed, draft.differences):  # the merges of a stage's slices say the same things
        items[:] = dict.fromkeys(items)


def _stage_refs(doc: dict, stages: dict, where: str) -> set[str]:
    refs = set()
    for value in ref_values(doc):
        ref = parse_ref(value, where)
        if ref.path in stages and ref.path is not None:
            refs.add(ref.path)
    return refs


def _topological(deps: dict, where: str) -> list:
    order, done, visiting = [], set(), set()
    for start in deps:
        stack = [(start, iter(sorted(deps[start], key=str)))]
        if start in done:
            continue
        visiting.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, MISSING)
            if child is MISSING:
                stack.pop()
                visiting.discard(node)
                done.add(node)
                order.append(node)
            elif child in visiting:
                raise InputError(f"{where}: stage {child!r} reads itself (a cycle of stages)")
            elif child not in done:
                visiting.add(child)
                stack.append((child, iter(sorted(deps[child], key=str))))
    return order


class _Context:
    def __init__(self, draft: Draft, finder: ModelFinder, folder: Path, stage_names: dict):
        self.draft, self.finder, self.folder, self.stage_names = draft, finder, folder, stage_names
        self.models: dict[tuple, str] = {}
        self.paths: dict[str, Path | None] = {}

    def input_name(self, ref: Ref) -> str:
        if ref.path in self.stage_names:
            return self.stage_names[ref.path]
        if ref.lora:
            raise Unexpressible(f"{ref}: a LoRA applied with '+': bake it in with a `lora` merge (method lora) "
                                "and name that merge instead")
        key = (ref.path, ref.revision)
        if key in self.models:
            return self.models[key]
        name = self.draft.name(Path(ref.path.replace("\\", "/")).name)
        found = self.finder.by_path(ref.path, self.folder, Path.cwd())
        note = f"mergekit: {ref}" + (" (the revision is not checked: the folder is read as it is)" if ref.revision else "")
        if found is not None:
            self.draft.models[name] = DraftModel(self.draft.path_text(found), note)
        else:
            short = Path(ref.path).name
            self.draft.models[name] = DraftModel(f"MISSING: {ref.path} (not found: download it or name its folder "
                                                 f"with --models)", note)
            self.draft.missing.append(f"{ref.path}: no such folder here or under --models (a Hugging Face repo? "
                                      f"`huggingface-cli download {ref.path} --local-dir models/{short}`, then "
                                      "import again with --models models)")
        self.models[key] = name
        self.paths[name] = found
        return name


# --- one merge configuration -----------------------------------------------------------------
def _stage(doc: dict, label: str, ctx: _Context, name: str, output: Value | None) -> dict[str, DraftMerge]:
    """The merges of one mergekit config: its own, named `name`, last; before it, for slices
    that are no one merge layer by layer, those it stacks (mergekit_slices.py)."""
    draft = ctx.draft
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise Unexpressible("no merge_method")
    for key in doc:
        if key not in FIELDS:
            draft.unexpressed.append(f"{label}: {key}: not a mergekit config field; ignored (as mergekit ignores it)")
    if doc.get("modules"):
        raise Unexpressible("modules: (a merge per module) has no Mergefile form")
    generic = get_method(method) if method not in KNOWN else None
    if method not in KNOWN and (generic is None or "mergekit" not in generic.follows):
        raise Unexpressible(f"merge_method {method}: mergebuild has no such method (see docs/import.md)")
    segments, layers = read_segments(doc)
    base = parse_ref(doc["base_model"], f"{label} base_model") if doc.get("base_model") is not None else None
    global_params = doc.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise Unexpressible("parameters: not a mapping")
    source = tokenizer_source(doc, label, draft)
    one = _Merge(doc, label, ctx, method, generic, base, global_params)
    if doc.get("slices") and (method == "passthrough" or layers is None):
        def merge_slice(segment, n, aliases, vocab_source):
            return one.build([segment], n, None, aliases, vocab_source, models_form=False)
        return stack(doc, label, ctx, name, method, segments, base, global_params, source, output, merge_slice)
    merge = one.build(segments, layers, output, {}, source, models_form=bool(doc.get("models")))
    if layers is not None:
        merge.comments.append(f"the slices cover layers 0..{layers - 1}: the models are taken to have {layers} layers "
                              "(mergekit would drop any layer past them)")
    return {name: merge}


class _Merge:
    """One merge of a mergekit config: of all its models (`models:`, aligned slices) or of one
    slice's sources (then each is renamed by `aliases`, its cut)."""

    def __init__(self, doc, label, ctx, method, generic, base, global_params):
        self.doc, self.label, self.ctx, self.method, self.generic = doc, label, ctx, method, generic
        self.base, self.global_params = base, global_params

    def build(self, segments: list[Segment], layers, output, aliases: dict, vocab_source,
              models_form: bool) -> DraftMerge:
        doc, label, ctx, method, generic, base = self.doc, self.label, self.ctx, self.method, self.generic, self.base
        draft, global_params = ctx.draft, self.global_params
        refs = [ref for ref, _ in segments[0].sources]
        comments: list[str] = [f"{label} of the {draft.source}: merge_method {method}"]
        if generic is None:
            _note_unknown_params(method, global_params, segments, comments)
        rules: list[DraftRule] = []
        fields: dict[str, Value] = {}

        if method in GTA or method == "model_stock" or method == "slerp":
            if base is None:
                raise Unexpressible(f"{method} needs a base_model")
            others = [r for r in refs if r != base]
            inputs = [base, *others]
            inputs_note = "base_model first, then the other models in order"
        elif generic is not None:
            inputs, inputs_note = _generic_inputs(generic, method, base, refs, fields, models_form)
        else:
            inputs, inputs_note = refs, "the models in order"
        if aliases and any(r not in aliases for r in inputs):
            raise Unexpressible(f"a slice without the base_model {base} among its sources (mergekit's {method} "
                                "reads it in every slice)")
        if method == "slerp" and len(inputs) != 2:
            raise Unexpressible(f"slerp merges two models (the base_model and one other), got {len(inputs)}")
        if method == "model_stock" and len(inputs) < 3:
            raise Unexpressible("model_stock needs a base_model and two models or more")
        if method == "passthrough" and len(inputs) != 1:
            raise Unexpressible("passthrough with several models (mergekit's passthrough takes one tensor and "
                                "refuses it)")
        names = [aliases.get(r) or ctx.input_name(r) for r in inputs]
        if generic is not None and not generic.arity_ok(len(inputs)):
            raise Unexpressible(f"mergebuild's {method} takes {generic.arity_text()}, got {len(inputs)}")
        with_base = method in GTA or method == "model_stock" or inputs_note.startswith("base")
        models = inputs[1:] if with_base else inputs
        param = Params(ctx, label, segments, global_params, layers, names)

        if method in GTA:
            mb = self._gta(param, models, fields, rules, comments)
        elif method == "linear":
            weights = param.per_model_list("weight", models, None, required=True)
            normalize = param.flag("normalize", True)
            if len(names) == 1:
                mb = "copy"
            else:
                mb = "soup"
                fields["weights"] = Value(weights, "each model's parameters.weight (soup normalises them, as "
                                          "mergekit's normalize: true)")
                total = sum(weights)
                if not normalize and not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-12):
                    draft.unexpressed.append(f"{label}: normalize: false with weights summing to {total:g}: "
                                             f"mergebuild's soup normalises; this result is mergekit's divided by "
                                             f"{total:g}")
        elif method == "slerp":
            mb = "slerp"
            param.numeric("t", fields, rules, default=MISSING, as_name="alpha",
                          note_default="parameters.t (mergekit's t: 0 is the base_model)")
            fields["variant"] = Value("mergekit", "mergekit's slerp: the raw tensors combined")
        elif method == "model_stock":
            mb = "model_stock"
            filter_wise = param.flag("filter_wise", False)
            if filter_wise:
                fields["filter_wise"] = Value(True, "parameters.filter_wise")
        elif generic is not None:
            mb = method
            _generic_params(generic, param, models, fields, rules, global_params, segments, draft, label, comments)
        else:  # passthrough of one model
            scaled = any(param.chain("scale", m, s) for m in models for s in segments)
            mb = "passthrough" if scaled else "copy"
            if scaled:
                param.numeric("scale", fields, rules, models=models, default=1.0, write_default=False)

        dtype(doc, label, fields, draft)
        vocabulary(vocab_source, label, draft, mb, base, inputs, names, fields)
        if output is not None:
            fields["output"] = output
        if rules and not get_method(mb).params:
            rules = []
        return DraftMerge(Value(mb, f"mergekit {method}"), Value(names, inputs_note), fields, rules, comments)

    def _gta(self, param, models, fields, rules, comments) -> str:
        method, label, draft, global_params = self.method, self.label, self.ctx.draft, self.global_params
        mb, sign, sparsifies, normalize_default, rescale_default = GTA[method]
        spec = get_method(mb)
        weights = param.per_model_list("weight", models, 1.0, required=True)
        fields["weights"] = Value(weights, "each model's parameters.weight, in input order")
        if sparsifies:
            param.numeric("density", fields, rules, models=models, default=1.0,
                          note_default="mergekit's default density, 1.0 (mergebuild's own differs)")
        else:
            param.unused("density", models, comments, "task_arithmetic does not sparsify")
        if "breadcrumbs" in method:
            param.numeric("gamma", fields, rules, models=models, default=0.01)
        if "della" in method:
            param.numeric("epsilon", fields, rules, models=models, default=0.15)
        lam = param.numeric("lambda", fields, rules, default=1.0, write_default=False)
        if sign is not None and spec.param("sign"):
            fields["sign"] = Value(sign, "mergekit's sum consensus (TIES's sign of the summed deltas)"
                                   if sign == "mass" else f"{method}: no sign election")
        normalize = param.flag("normalize", normalize_default)
        if spec.param("normalize"):
            fields["normalize"] = Value(normalize, "parameters.normalize" if "normalize" in global_params
                                        else f"mergekit's default for {method}")
        elif normalize:
            _fold_normalize(weights, lam, fields, rules, draft, label)
        rescale = param.flag("rescale", rescale_default)
        _rescale(spec, method, rescale, fields, draft, label)
        if mb == "ties" and spec.param("ties_rules") and "mergekit" in spec.param("ties_rules").choices:
            fields["ties_rules"] = Value("mergekit", "mergekit's TIES edge rules (at least one entry kept)")
        if param.flag("int8_mask", False):
            comments.append("int8_mask: the dtype of mergekit's sign mask only, no effect on the numbers: left out")
        if method in RANDOM:
            _once(draft.differences, f"{label}: {method} keeps random entries; mergekit draws them from torch's "
                                     "global random state, mergebuild from a seeded stream per tensor (seed 0): the "
                                     "same distribution, different entries")
        if "della" in method:
            _once(draft.differences, f"{label}: DELLA ranks magnitudes along dim 1 in mergekit, within rows "
                                     "(dim 0, the rest flattened) in mergebuild: they differ on convolutions")
        return mb


# mergekit's own parameters of the methods mergebuild has under its name: (the config's, each
# model's); those of mergebuild's that mergekit lacks (karcher's weights) are not read from it
GENERIC_READS = {
    "nuslerp": ({"nuslerp_flatten", "nuslerp_row_wise"}, {"weight"}),
    "multislerp": ({"normalize_weights", "eps"}, {"weight"}),
    "karcher": ({"max_iter", "tol"}, set()),
    "sce": ({"select_topk", "int8_mask"}, set()),
    "nearswap": ({"t"}, set()),
}
# values mergebuild's method needs to give mergekit's numbers, beyond what the config says
GENERIC_FIXED = {"sce": {"select_rules": ("mergekit", "torch.topk's choice among equal variances at the cut: "
                                          "mergekit's bytes on the same torch build and device")}}


def _generic_inputs(spec, method: str, base, refs: list, fields: dict, models_form: bool) -> tuple[list, str]:
    """The inputs of a mergebuild method that follows mergekit's of the same name: the base
    first where it takes one (docs/methods.md, "mergekit's methods")."""
    others = [r for r in refs if r != base]
    base_flag = spec.param("base")
    takes_base = spec.inputs[0] == "Base" or (base_flag is not None and base_flag.kind is bool) \
        or "Base" in spec.arity_text()
    if spec.inputs[0] == "Base" and base is None:
        raise Unexpressible(f"{method} needs a base_model")
    if method == "nuslerp" and len(others) != 2:
        raise Unexpressible(f"nuslerp merges two models (besides the base_model), got {len(others)} (mergekit "
                            "refuses it)")
    if base is not None and takes_base:
        if base_flag is not None and base_flag.kind is bool:
            fields["base"] = Value(True, "base_model: the first input is the base")
        return [base, *others], "base_model first, then the other models in order"
    if base is not None and base not in refs and models_form:
        return [*refs, base], f"the models in order, then the base_model: mergekit adds it to the models of {method}"
    return refs, "the models in order"


def _generic_params(spec, param, models, fields, rules, global_params, segments, draft, label, comments) -> None:
    """Parameters by name, for a mergebuild method that follows mergekit's of the same name."""
    per_model = {k for s in segments for _, p in s.sources for k in p}
    given = set(global_params) | {k for s in segments for k in s.params} | per_model
    reads, model_reads = GENERIC_READS.get(spec.name, (None, None))
    reads_weight = "weight" in model_reads if model_reads is not None else spec.param("weights") is not None
    if reads_weight and "weight" in given:
        fields["weights"] = Value(param.per_model_list("weight", models, 1.0, required=False),
                                  "each model's parameters.weight, in input order")
    names = given - {"weight"}
    if reads is not None:
        ignored = sorted(given - reads - model_reads)
        if ignored:
            comments.append(f"parameters {', '.join(ignored)}: not read by mergekit's {spec.name}; left out, as "
                            "mergekit ignores them")
        names &= reads
    if "int8_mask" in names:
        names.discard("int8_mask")
        comments.append("int8_mask: the dtype of mergekit's mask only, no effect on the numbers: left out")
    for name in sorted(names):
        p = spec.param(name)
        if p is None or p.kind is list:
            draft.unexpressed.append(f"{label}: {name}: not a parameter of mergebuild's {spec.name}; left out")
        elif p.numeric:
            param.numeric(name, fields, rules, models=models if name in per_model else None,
                          default=MISSING if p.required else p.default)
        else:
            value = param.constant(name, p.default)
            if not p.accepts(value):
                raise Unexpressible(f"{name}: {value!r}: mergebuild's {spec.name} takes {p.describe()}")
            fields[name] = Value(value, f"parameters.{name}")
    missing = [p.name for p in spec.params if p.required and p.name not in fields]
    if missing:
        raise Unexpressible(f"{', '.join(missing)}: missing (mergekit requires it)")
    for name, (value, note) in GENERIC_FIXED.get(spec.name, {}).items():
        fields[name] = Value(value, note)
    if spec.name not in GENERIC_READS:
        _once(draft.differences, f"{label}: {spec.name} is mergebuild's version of mergekit's; docs/methods.md says "
                                 "where it departs from it")


def _note_unknown_params(method, global_params, segments, comments) -> None:
    glob, per_model = KNOWN[method]
    seen = set(global_params)
    for s in segments:
        seen |= set(s.params)
        for _, p in s.sources:
            seen |= set(p)
    unknown = sorted(seen - glob - per_model)
    if unknown:
        comments.append(f"parameters {', '.join(unknown)}: not read by mergekit's {method}; left out, as mergekit "
                        "ignores them")


def _once(items: list, text: str) -> None:
    if text not in items:
        items.append(text)


def _rescale(spec, method: str, rescale: bool, fields: dict, draft: Draft, label: str) -> None:
    param = spec.param("rescale")
    if param is None:
        if rescale:
            draft.unexpressed.append(f"{label}: rescale: true: mergebuild's {spec.name} does not rescale what it "
                                     "keeps; left out")
        return
    if rescale and "l1" in param.choices:
        fields["rescale"] = Value("l1", "mergekit rescales each sparsified delta to its L1 norm")
    elif rescale:
        fields["rescale"] = Value(True, "mergekit rescales (to the L1 norm)")
        draft.differences.append(f"{label}: mergekit rescales to the L1 norm; this mergebuild divides by density")
    else:
        fields["rescale"] = Value("none" if "none" in param.choices else False, "rescale: false")


def _fold_normalize(weights: list, lam, fields: dict, rules: list, draft: Draft, label: str) -> None:
    """normalize: true without a sign election divides the sum by the sum of the weights: the
    same as dividing lambda by it."""
    total = sum(weights)
    divisor = total if abs(total) >= 1e-8 else 1.0
    if divisor == 1.0:
        return

    def scaled(v):
        if isinstance(v, dict):
            return {k: (scaled(x) if k != "gradient" else [p / divisor for p in x]) for k, x in v.items()}
        return v / divisor

    fields["lambda"] = Value(scaled(lam), f"lambda / {divisor:g}: mergekit's normalize: true divides by the weights' "
                             "sum")
    for rule in rules:
        if "lambda" in rule.params:
            rule.params["lambda"] = scaled(rule.params["lambda"])


