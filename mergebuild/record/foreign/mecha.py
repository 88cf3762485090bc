"""sd-mecha's `.mecha` recipes as Mergefiles, and as lineage.

The format is sd-mecha 1.1.x's (sd_mecha/serialization.py, header `version 0.1.0`): one
instruction a line, each line's result referenced later as `&N` (N counts from the line after
the header):

    model "path" model_config="sd1-ldm" merge_space="weight"
    dict key=0.3
    literal &2 model_config="singleton-mecha" merge_space="param"
    merge "convert_singleton" &3
    merge "weighted_sum" &0 &1 &4

A serialized recipe is finalized: wrappers such as add_difference(a, b, c) appear as the
primitives they are made of (subtract, add_difference, fallback), parameters as literals, block
weights as a block literal converted to keys. Those patterns are read back into mergebuild's
methods (docs/import.md lists them); anything else is not expressible, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.dtypes import OUTPUT_DTYPES
from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Draft, DraftMerge, DraftModel, Unexpressible, Value
from mergebuild.methods.registry import get_method
from mergebuild.record.foreign.finder import ModelFinder
from mergebuild.record.foreign.mecha_read import BlockTable, Literal, Merge, Model, bind, param_value, parse

# model configs whose files are whole checkpoints mergebuild reads as they are
CHECKPOINT_CONFIGS = ("sd1-ldm", "sdxl-sgm", "sd3-comfyui", "flux-flux")
COMPONENTS = {"diffuser": "unet", "vae": "vae", "clip_l": "text_encoder", "clip_g": "clip_g", "ema": "ema"}
SDXL_COMPONENTS = {"clip_l": "clip_l"}

# --- a Mergefile -----------------------------------------------------------------------------
def import_mecha(text: str, path: Path, draft: Draft, finder: ModelFinder, origin: str = "") -> None:
    results = parse(text, str(path))
    draft.source = origin or f"sd-mecha recipe {path.name}"
    for r in results:
        if isinstance(r, Merge):
            bind(r)
    uses: dict[int, int] = {}
    for r in results:
        if isinstance(r, Merge):
            for v in [*r.inputs, *r.params.values()]:
                uses[id(v)] = uses.get(id(v), 0) + 1
    t = _Translator(draft, finder, path.parent, uses)
    root = results[-1]
    for r in results:
        if isinstance(r, (Model, Merge)):
            t.translate(r)
    outcome = t.done.get(id(root))
    if isinstance(root, (dict, Literal)):
        raise InputError(f"{path}: the recipe's last line is a value, not a model or merge")
    if isinstance(outcome, Failed):
        raise InputError(f"{path}: this recipe cannot be written as a Mergefile: {outcome.reason}")
    if not isinstance(outcome, str):
        raise InputError(f"{path}: this recipe cannot be written as a Mergefile: its result is "
                         f"{'a difference (a delta)' if isinstance(outcome, Delta) else 'not a model'}")
    read = {i for m in draft.merges.values() for i in m.inputs.value}
    if outcome in draft.models:  # the recipe is one model: a copy of it
        name = draft.name(path.stem)
        draft.merges[name] = DraftMerge(Value("copy", "the recipe is one model"), Value([outcome]), {})
    elif outcome not in read:  # the result is named after the recipe
        draft.release(outcome)
        name = draft.name(path.stem)
        draft.merges[name] = draft.merges.pop(outcome)
    else:
        name = outcome
    draft.merges[name].fields["output"] = Value(f"out/{path.stem}.safetensors", "sd-mecha writes where its merge() "
                                                "call says; here it goes under out/")
    draft.merges[name].comments.insert(0, f"the result of the {draft.source}")


@dataclass
class Delta:
    """A difference (sd-mecha's delta space): subtract(a, b), or a TIES or Model Stock of such."""

    kind: str  # "subtract", "ties", "stock"
    a: object = None
    b: object = None
    parts: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    line: int = 0


@dataclass
class Failed:
    reason: str


@dataclass
class Mask:
    a: object
    b: object
    c: object
    alpha: object


class _Translator:
    """Translates each instruction once, in file order (references only point back: no recursion)."""

    def __init__(self, draft: Draft, finder: ModelFinder, folder: Path, uses: dict):
        self.draft, self.finder, self.folder, self.uses = draft, finder, folder, uses
        self.done: dict[int, object] = {}
        self.paths: dict[str, str] = {}  # a model line's path -> its model's name: each path is one model
        self.sdxl = False

    def translate(self, node) -> None:
        try:
            self.done[id(node)] = self._model(node) if isinstance(node, Model) else self._merge(node)
        except Unexpressible as e:
            self.done[id(node)] = Failed(str(e))

    def result(self, value):
        out = self.done.get(id(value))
        if isinstance(out, Failed):
            raise Unexpressible(out.reason)
        if out is None:
            raise Unexpressible(f"a parameter where a model is expected (line {getattr(value, 'line', '?')})")
        return out

    def weights(self, value) -> str:
        out = self.result(value)
        if not isinstance(out, str):
            raise Unexpressible(f"line {getattr(value, 'line', '?')}: a difference or a part of a model where a "
                                "whole model is expected")
        return out

    def _model(self, m: Model) -> str:
        if m.space not in (None, "weight"):
            raise Unexpressible(f"line {m.line}: model {m.path!r} in merge space {m.space!r} (mergebuild reads "
                                "checkpoints)")
        if m.config not in CHECKPOINT_CONFIGS:
            raise Unexpressible(f"line {m.line}: model config {m.config!r}: mergebuild reads {', '.join(CHECKPOINT_CONFIGS)}"
                                " checkpoints (a LoRA or another layout: convert it, or bake it with method lora)")
        self.sdxl = self.sdxl or m.config == "sdxl-sgm"
        if m.path in self.paths:
            return self.paths[m.path]
        name = self.draft.name(Path(m.path.replace("\\", "/")).stem)
        found = self.finder.by_path(m.path, self.folder, Path.cwd())
        note = f"line {m.line}: model {m.path!r} ({m.config})"
        if found is None:
            model = DraftModel(f"MISSING: {m.path} (not found next to the recipe nor under --models)", note)
            self.draft.missing.append(f"{m.path}: not found next to the recipe nor under --models (sd-mecha looks "
                                      "in its model folders: name them with --models)")
        else:
            model = DraftModel(self.draft.path_text(found), note)
        self.paths[m.path] = name
        self.draft.models[name] = model
        return name

    def _new(self, method: str, inputs: list[str], fields: dict, line: int, what: str) -> str:
        name = self.draft.name(method)
        self.draft.merges[name] = DraftMerge(Value(method, f"line {line}: sd-mecha {what}"), Value(inputs), fields)
        return name

    def _alpha(self, value, name: str, line: int) -> Value:
        v = param_value(value)
        if isinstance(v, BlockTable):
            self.draft.setting("time_embed", "BASE", "sd-mecha's block weights put time_embed (and label_emb) in BASE")
            blocks = dict(v.blocks)
            if "VAE" in blocks:
                vae = blocks.pop("VAE")
                if vae != blocks.get("BASE"):
                    self.draft.differences.append(f"line {line}: {name}: sd-mecha's VAE block ({vae:g}) is part of "
                                                  f"BASE ({blocks.get('BASE')}) in mergebuild")
            return Value(blocks, f"line {line}: {name}, by block ({v.conversion})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Unexpressible(f"line {line}: {name} = {v!r}: not a number")
        return Value(v, f"line {line}: {name}")

    def _merge(self, m: Merge):
        method, p = m.method, m.params
        if method == "subtract":
            return Delta("subtract", self.weights(m.inputs[0]), self.weights(m.inputs[1]), line=m.line)
        if method in ("ties_sum", "model_stock"):
            deltas = [self.result(d) for d in m.inputs]
            if not deltas or not all(isinstance(d, Delta) and d.kind == "subtract" for d in deltas) \
                    or len({d.b for d in deltas}) != 1:
                raise Unexpressible(f"line {m.line}: {method} of differences that do not share one base")
            return Delta("ties" if method == "ties_sum" else "stock", b=deltas[0].b, parts=[d.a for d in deltas],
                         params=p, line=m.line)
        if method == "train_difference_mask":
            return Mask(*(self.weights(x) for x in m.inputs), p.get("alpha"))
        if method == "pick_component":
            return ("component", self.weights(m.inputs[0]), p.get("component"), m.line)
        if method == "weighted_sum":
            a, b = (self.weights(x) for x in m.inputs)
            return self._new("weighted_sum", [a, b], {"alpha": self._alpha(p["alpha"], "alpha", m.line)}, m.line,
                             "weighted_sum")
        if method == "slerp":
            a, b = (self.weights(x) for x in m.inputs)
            fields = {"alpha": self._alpha(p["alpha"], "alpha", m.line),
                      "variant": Value("mecha", "sd-mecha's slerp: unit tensors, rescaled to the interpolated norm")}
            return self._new("slerp", [a, b], fields, m.line, "slerp")
        if method == "add_difference":
            return self._add_difference(m)
        if method == "n_average":
            models = [self.weights(x) for x in m.inputs]
            if len(models) == 1:
                return models[0]
            return self._new("soup", models, {}, m.line, "n_average (the uniform mean)")
        if method == "geometric_median":
            models = [self.weights(x) for x in m.inputs]
            fields = {k: Value(param_value(p[k]), f"line {m.line}: {k}") for k in ("eps", "maxiter", "ftol")}
            return self._new("geometric_median", models, fields, m.line, "geometric_median")
        if method == "fallback":
            return self._fallback(m)
        if method == "cast":
            return self._cast(m)
        raise Unexpressible(f"line {m.line}: sd-mecha's {method}: no mergebuild method matches it (docs/import.md)")

    def _add_difference(self, m: Merge):
        a = self.weights(m.inputs[0])
        delta = self.result(m.inputs[1])
        alpha = m.params["alpha"]
        if not isinstance(delta, Delta):
            raise Unexpressible(f"line {m.line}: add_difference of a model (sd-mecha adds a difference)")
        if delta.kind == "subtract":
            mask = self.done.get(id(alpha))
            if isinstance(mask, Mask):
                if (mask.a, mask.b, mask.c) != (a, delta.a, delta.b):
                    raise Unexpressible(f"line {m.line}: a train-difference mask of other models")
                fields = {"alpha": self._alpha(mask.alpha, "alpha", m.line)}
                return self._new("train_difference", [a, delta.a, delta.b], fields, m.line,
                                 "add_difference with train_difference_mask (supermerger's train difference)")
            fields = {"alpha": self._alpha(alpha, "alpha", m.line)}
            return self._new("add_difference", [a, delta.a, delta.b], fields, m.line, "add_difference of subtract")
        if delta.b != a:
            raise Unexpressible(f"line {m.line}: add_difference onto a model other than the differences' base")
        if delta.kind == "ties":
            vote = param_value(delta.params.get("vote_sgn"))
            fields = {"density": Value(param_value(delta.params.get("k")), f"line {delta.line}: ties_sum k"),
                      "lambda": self._alpha(alpha, "alpha (add_difference)", m.line),
                      "sign": Value("mass" if vote else "count", f"line {delta.line}: vote_sgn = {str(bool(vote)).lower()}")}
            spec = get_method("ties")
            if not vote and spec.param("sign") and "count_mergekit" not in spec.param("sign").choices:
                self.draft.differences.append(f"line {delta.line}: a tied sign vote keeps nothing in sd-mecha; this "
                                              "mergebuild's count elects +")
            self.draft.differences.append(f"line {delta.line}: sd-mecha's TIES keeps every entry at least as large as "
                                          "its k-th (one more entry per tensor, more on ties); mergebuild keeps "
                                          "int(density * n)")
            return self._new("ties", [a, *delta.parts], fields, m.line, "add_difference of ties_sum")
        alpha_value = param_value(alpha)
        if alpha_value != 1.0 and alpha_value != 1:
            raise Unexpressible(f"line {m.line}: model_stock added with alpha {alpha_value!r} (mergebuild adds it whole)")
        self.draft.differences.append(f"line {delta.line}: sd-mecha's model_stock averages the cosines of consecutive "
                                      "pairs; mergebuild's (mergekit's) of all pairs")
        return self._new("model_stock", [a, *delta.parts], {}, m.line, "add_difference of model_stock")

    def _fallback(self, m: Merge):
        main, default = m.inputs
        picked = self.done.get(id(main))
        if isinstance(picked, tuple) and picked[0] == "component":
            _, source, component, line = picked
            comp = param_value(component)
            mapped = (SDXL_COMPONENTS if self.sdxl else {}).get(comp) or COMPONENTS.get(comp)
            if mapped is None:
                raise Unexpressible(f"line {line}: component {comp!r}: no mergebuild component matches it")
            fields = {"component": Value(mapped, f"line {line}: pick_component {comp!r}")}
            return self._new("swap", [self.weights(default), source], fields, m.line,
                             "fallback of pick_component (a component swap)")
        name = self.weights(main)
        other = self.weights(default)
        merge = self.draft.merges.get(name)
        if merge is not None and merge.inputs.value and merge.inputs.value[0] == other:
            merge.comments.append(f"line {m.line}: fallback to {other}: mergebuild takes the keys a method does not "
                                  "merge from its first input, as this fallback does")
            return name
        if name == other:
            return name
        raise Unexpressible(f"line {m.line}: fallback to {other}, which is not the first input of {name}")

    def _cast(self, m: Merge):
        name = self.weights(m.inputs[0])
        dtype = param_value(m.params.get("dtype"))
        if m.params.get("device") is not None and dtype is None:
            return name  # a device move: the numbers stay
        if dtype not in OUTPUT_DTYPES:
            raise Unexpressible(f"line {m.line}: cast to {dtype!r}: mergebuild writes {', '.join(OUTPUT_DTYPES)}")
        merge = self.draft.merges.get(name)
        if merge is not None and self.uses.get(id(m.inputs[0]), 0) == 1 and "dtype" not in merge.fields:
            merge.fields["dtype"] = Value(dtype, f"line {m.line}: cast")
            return name
        return self._new("copy", [name], {"dtype": Value(dtype, f"line {m.line}: cast")}, m.line, "cast")


# --- lineage (the mecha_recipe key of an sd-mecha output) ------------------------------------
def mecha_lineage(text: str, prefix: str) -> tuple[dict, str | None, list[str]]:
    """The recipe an sd-mecha output records, as lineage nodes: (nodes, root, warnings)."""
    try:
        results = parse(text, "mecha_recipe")
    except InputError as e:
        return {}, None, [f"{prefix}: {e}; its lineage is left out"]
    nodes: dict[str, dict] = {}
    ids: dict[int, str] = {}
    for i, r in enumerate(results):
        if isinstance(r, Model):
            nid = f"{prefix}/{i}:{Path(r.path.replace(chr(92), '/')).name}"
            nodes[nid] = {"kind": "model", "name": Path(r.path.replace("\\", "/")).name, "file": r.path}
            ids[id(r)] = nid
        elif isinstance(r, Merge):
            bind(r)
            inputs = [ids[id(x)] for x in r.inputs if id(x) in ids]
            if r.method == "fallback" and inputs:  # fallback(x, default): x, as shown
                ids[id(r)] = inputs[0]
                continue
            params = {}
            for k, v in r.params.items():
                if id(v) in ids:
                    inputs.append(ids[id(v)])
                    continue
                try:
                    value = param_value(v)
                except Unexpressible:
                    continue
                params[k] = value.blocks if isinstance(value, BlockTable) else value
            if not inputs and r.method.startswith("convert_"):
                continue  # a parameter's conversion
            nid = f"{prefix}/{i}:{r.method}"
            nodes[nid] = {"kind": "merge", "name": r.method, "tool": "sd-mecha", "method": r.method,
                          "params": params, "inputs": inputs}
            ids[id(r)] = nid
    root = ids.get(id(results[-1]))
    return nodes, root, []
