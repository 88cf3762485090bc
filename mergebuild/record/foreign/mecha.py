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

import math
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.dtypes import OUTPUT_DTYPES
from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Draft, DraftMerge, DraftModel, Unexpressible, Value
from mergebuild.methods.registry import get_method
from mergebuild.record.foreign.finder import ModelFinder

HEADER = "version 0.1.0"
MAX_LINES = 200_000
CONSTANTS = {"null": None, "true": True, "false": False}
# model configs whose files are whole checkpoints mergebuild reads as they are
CHECKPOINT_CONFIGS = ("sd1-ldm", "sdxl-sgm", "sd3-comfyui", "flux-flux")
BLOCK_CONVERSIONS = {"convert_sd1_blocks_to_ldm": "sd1-supermerger_blocks",
                     "convert_sdxl_blocks_to_sgm": "sdxl-supermerger_blocks"}
COMPONENTS = {"diffuser": "unet", "vae": "vae", "clip_l": "text_encoder", "clip_g": "clip_g", "ema": "ema"}
SDXL_COMPONENTS = {"clip_l": "clip_l"}
# positional parameters after the model inputs (sd-mecha 1.1's signatures), and their defaults
SIGNATURES = {
    "weighted_sum": (2, (("alpha", 0.5),)),
    "slerp": (2, (("alpha", 0.5),)),
    "add_difference": (2, (("alpha", 1.0),)),
    "subtract": (2, ()),
    "train_difference_mask": (3, (("alpha", 1.0),)),
    "fallback": (2, ()),
    "pick_component": (1, (("component", None),)),
    "cast": (1, (("device", None), ("dtype", None))),
    "n_average": (None, ()),
    "geometric_median": (None, (("eps", 1e-6), ("maxiter", 100), ("ftol", 1e-20))),
    "ties_sum": (None, (("k", 1.0), ("vote_sgn", False))),
    "model_stock": (None, (("cos_eps", 1e-6),)),
}


@dataclass
class Model:
    path: str
    config: str | None
    space: str | None
    line: int


@dataclass
class Literal:
    value: object
    config: str | None
    space: str | None
    line: int


@dataclass
class Merge:
    method: str
    args: list
    kwargs: dict
    line: int
    params: dict = field(default_factory=dict)  # bound by name (SIGNATURES)
    inputs: list = field(default_factory=list)


# --- reading (untrusted) ---------------------------------------------------------------------
def parse(text: str, where: str) -> list:
    """The results of a .mecha recipe's lines, in order; one line (InputError) if it is not one."""
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        raise InputError(f"{where}: {len(lines):,} lines: too long for a recipe")
    first = lines[0].strip().lstrip("\ufeff")
    if not first.startswith("version"):
        raise InputError(f"{where}: not an sd-mecha recipe (expected `{HEADER}` on line 1)")
    if first != HEADER:
        raise InputError(f"{where}: sd-mecha recipe {first!r}: this reader knows `{HEADER}` (sd-mecha 1.1)")
    results: list = []
    for number, line in enumerate(lines[1:], 2):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            results.append(_instruction(line, results, number))
        except ValueError as e:
            raise InputError(f"{where}: line {number}: {e}") from None
    if not results:
        raise InputError(f"{where}: the recipe is empty")
    return results


def _instruction(line: str, results: list, number: int):
    command, *tokens = _tokenize(line)
    args, kwargs = [], {}
    for token in tokens:
        if "=" in token and not token.startswith('"'):
            key, raw = token.split("=", 1)
            if not key.isidentifier():
                raise ValueError(f"{key!r} is not a parameter name")
            kwargs[key] = _value(raw, results)
        else:
            args.append(_value(token, results))
    if command == "dict":
        if args:
            raise ValueError("dict takes key=value pairs only")
        return dict(kwargs)
    if command == "literal":
        if len(args) != 1:
            raise ValueError("literal takes one value")
        return Literal(args[0], _text(kwargs.get("model_config")), _text(kwargs.get("merge_space")), number)
    if command == "model":
        if len(args) != 1 or not isinstance(args[0], str):
            raise ValueError("model takes a quoted path")
        return Model(args[0], _text(kwargs.get("model_config")), _text(kwargs.get("merge_space")), number)
    if command in ("merge", "call"):
        if not args or not isinstance(args[0], str):
            raise ValueError(f"{command} takes a quoted method name first")
        return Merge(args[0], args[1:], kwargs, number)
    raise ValueError(f"unknown command {command!r} (expected dict, literal, model or merge)")


def _text(value):
    return value if isinstance(value, str) else None


def _value(token: str, results: list):
    if token in CONSTANTS:
        return CONSTANTS[token]
    if token.startswith("&"):
        try:
            index = int(token[1:])
        except ValueError:
            raise ValueError(f"{token!r} is not a reference") from None
        if not 0 <= index < len(results):
            raise ValueError(f"reference {token} out of bounds (only earlier lines can be referenced)")
        return results[index]
    if token.startswith('"') and token.endswith('"') and len(token) >= 2:
        return token[1:-1]
    try:
        number = float(token) if ("." in token or "e" in token.lower()) else int(token)
    except ValueError:
        raise ValueError(f"{token[:40]!r} is not a value") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{token} is not a finite number")
    return number


def _tokenize(line: str) -> list[str]:
    """sd-mecha's tokenizer: spaces split, double quotes group, a backslash escapes one character."""
    tokens, current, prefix = [], [], []
    quoted = escaped = False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
            continue
        elif char == '"':
            quoted = not quoted
            if quoted:
                prefix, current = current, []
            else:
                tokens.append("".join(prefix) + '"' + "".join(current) + '"')
                current, prefix = [], []
            continue
        elif char == " " and not quoted:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("mismatched quotes")
    if current:
        tokens.append("".join(current))
    if not tokens:
        raise ValueError("empty instruction")
    return tokens


def bind(merge: Merge) -> None:
    """Name a merge's arguments by sd-mecha's signature: its model inputs, then its parameters."""
    arity, params = SIGNATURES.get(merge.method, (None, ()))
    args = list(merge.args)
    if arity is None:
        merge.inputs = args
        rest = []
    else:
        merge.inputs, rest = args[:arity], args[arity:]
    merge.params = {name: default for name, default in params}
    for (name, _), value in zip(params, rest):
        merge.params[name] = value
    for extra in rest[len(params):]:
        merge.params[f"#{len(merge.params)}"] = extra
    merge.params.update(merge.kwargs)


# --- parameter values ------------------------------------------------------------------------
def param_value(value):
    """A literal parameter: a number, string or flag; or a block table ({BASE: .., IN00: ..})."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Merge) and value.method == "convert_singleton" and len(value.args) == 1:
        return param_value(value.args[0])
    if isinstance(value, Merge) and value.method in BLOCK_CONVERSIONS and len(value.args) == 1:
        inner = value.args[0]
        if isinstance(inner, Literal) and isinstance(inner.value, dict):
            table = {k: param_value(v) for k, v in inner.value.items()}
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in table.values()):
                return BlockTable(table, value.method)
        raise Unexpressible(f"line {value.line}: block weights that are not numbers")
    if isinstance(value, Literal):
        inner = value.value
        if isinstance(inner, dict) and set(inner) == {"key"}:
            return param_value(inner["key"])
        if not isinstance(inner, dict):
            return param_value(inner)
        raise Unexpressible(f"line {value.line}: a literal of {value.config or 'keys'} (per-key values)")
    line = getattr(value, "line", "?")
    raise Unexpressible(f"line {line}: a parameter computed by {getattr(value, 'method', 'a model')}")


@dataclass
class BlockTable:
    blocks: dict
    conversion: str


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
