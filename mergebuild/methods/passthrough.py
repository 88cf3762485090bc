"""passthrough: layers stacked from slices of the inputs, renumbered (frankenmerges, depth up-scaling).

mergekit's `slices: - sources: - model: X  layer_range: [0, 16]` is written in a Mergefile as

    slices = [ { input = "a", layer_range = [0, 16] }, { input = "b", layer_range = [8, 24] } ]

A slice takes layers start..end-1 of one input (mergekit's half-open range); the output's layers
are the slices' in order, numbered 0..M-1. As in mergekit's planner, the keys before the layers
(embeddings, a VLM's vision tower and projector) come from the first slice's input and those
after them (the architecture's llm.post_layers: final norm, lm_head) from the last slice's. No
tensor is computed: each is its input's bytes (cast to the merge's dtype), unless `scale` (per key
through rules, mergekit's `filter`) multiplies it. A folder output's config.json gets the new
layer count and its per-layer lists (layer_types) in the layers' new order. See docs/methods.md.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass

from mergebuild.dtypes import is_float
from mergebuild.methods.registry import Method, Param, PlannedTensor

FOLLOWS = "mergekit's passthrough with slices (layer_range half-open; first slice's embeddings, last slice's head)"
SLICE_FIELDS = ("input", "layer_range")
SLICE_FORM = "{ input = NAME, layer_range = [start, end] }"
MERGEKIT_NAMES = {"model": "input"}  # mergekit's names for a slice's fields


def passthrough(a, scale: float = 1.0):
    """Stacks the layers of `slices` of the inputs, renumbered (mergekit's passthrough): a
    frankenmerge or a depth up-scaling. Nothing is computed, unless scale is not 1."""
    return a * scale


@dataclass(frozen=True)
class Slice:
    input: int  # position in the merge's inputs
    start: int
    end: int  # not included, as in mergekit

    def __len__(self) -> int:
        return self.end - self.start


def check_slices(value) -> tuple[str, str] | None:
    """What is wrong with `slices` as written, before any model is read: (where, what), or None."""
    if not isinstance(value, list):
        return "", f"expected a list of slices, each {SLICE_FORM}"
    for i, s in enumerate(value):
        where = f"[{i}]"
        if not isinstance(s, dict):
            return where, f"expected a slice {SLICE_FORM}, got {s!r}"
        for key in s:
            if key not in SLICE_FIELDS:
                return f"{where}.{key}", f"a slice has input and layer_range only{_hint(key)}"
        if "input" in s and (not isinstance(s["input"], str) or not s["input"]):
            return f"{where}.input", f"expected the name of one of the merge's inputs, got {s['input']!r}"
        r = s.get("layer_range")
        if r is None:
            return f"{where}.layer_range", "missing: which layers, [start, end] (end not included)"
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            return f"{where}.layer_range", f"expected [start, end], two whole numbers, got {r!r}"
        if not 0 <= r[0] < r[1]:
            return f"{where}.layer_range", f"{r}: expected 0 <= start < end (end is not included, as in mergekit)"
    return None


def _hint(key: str) -> str:
    """What a field of a slice that is none means: mergekit's name for one, or a typo."""
    if key == "sources":
        return (" (one slice is one source here; mergekit's several sources in a slice merge those layers, "
                "which passthrough does not: merge the models first, then slice the merge)")
    close = MERGEKIT_NAMES.get(key) or next(iter(difflib.get_close_matches(key, SLICE_FIELDS, n=1, cutoff=0.5)), None)
    return f" (did you mean {close!r}?)" if close else " (per-slice parameters are not supported)"


def _slices(ctx) -> list[Slice]:
    """The slices, their inputs resolved to positions; ValueError for names the merge lacks."""
    inputs = list(ctx.spec.inputs)
    out = []
    for i, s in enumerate(ctx.spec.params.get("slices") or []):
        name = s.get("input")
        if name is None:
            if len(set(inputs)) > 1:
                raise ValueError(f"slices[{i}]: which input? (input = one of {', '.join(inputs)}; it may be left "
                                 "out only when the merge has one input)")
            name = inputs[0]
        if name not in inputs:
            close = difflib.get_close_matches(name, inputs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"slices[{i}].input: {name!r} is not an input of this merge ({', '.join(inputs)}){hint}")
        out.append(Slice(inputs.index(name), *s["layer_range"]))
    unused = [n for n in dict.fromkeys(inputs) if all(inputs[s.input] != n for s in out)]
    if out and unused:
        raise ValueError(f"input {unused[0]!r} is in no slice: every input of a passthrough gives it layers "
                         "(remove it from inputs, or add a slice of it)")
    return out


def _layers(ctx, i: int, pattern: re.Pattern) -> tuple[dict[int, list[tuple[str, re.Match]]], list[str]]:
    """Input i's keys: {layer: [(key, its match)]} in the main stack of layers, and the rest."""
    layers: dict[int, list] = {}
    rest = []
    for key in ctx.names(i):
        m = pattern.search(key)
        if m:
            layers.setdefault(int(m.group(1)), []).append((key, m))
        else:
            rest.append(key)
    return layers, rest


def plan_passthrough(ctx):
    """The output's tensors: each an input's tensor under its name in the output."""
    arch, inputs = ctx.arch, ctx.spec.inputs
    slices = _slices(ctx)
    planned: dict[str, tuple[int, str]] = {}  # output name -> (input, key)

    def take(name: str, i: int, key: str):
        if name in planned:
            j, other = planned[name]
            raise ValueError(f"two tensors would be named {name!r} in the output ({inputs[j]}'s {other} and "
                             f"{inputs[i]}'s {key}): {arch.name}'s layer pattern {arch.layer_pattern.pattern!r} "
                             "does not tell these keys' layers apart")
        planned[name] = (i, key)

    if not slices:
        if len(set(inputs)) > 1:
            raise ValueError(f"passthrough of {len(inputs)} inputs needs slices = [{SLICE_FORM}, ...]: which "
                             "layers of which input, in order")
        for key in ctx.names(0):
            take(key, 0, key)
        return _tensors(ctx, planned)
    if arch.layer_pattern is None:
        raise ValueError(f"slices need a model with numbered layers: {inputs[0]} is {arch.name}, whose keys have "
                         "no layer index (slices are for LLMs; swap or rules take parts of other models)")
    found = {i: _layers(ctx, i, arch.layer_pattern) for i in sorted({s.input for s in slices})}
    counts = {i: max(layers, default=-1) + 1 for i, (layers, _) in found.items()}
    for n, s in enumerate(slices):
        have = counts[s.input]
        if have == 0:
            raise ValueError(f"slices[{n}]: {inputs[s.input]} is not a layered model: no key matches "
                             f"{arch.layer_pattern.pattern!r} ({arch.name}, the architecture of {inputs[0]})")
        if s.end > have:
            raise ValueError(f"slices[{n}].layer_range [{s.start}, {s.end}]: {inputs[s.input]} has {have} layers "
                             f"(0..{have - 1}; the end is not included, so [0, {have}] is all of them)")
        missing = [j for j in range(s.start, s.end) if j not in found[s.input][0]]
        if missing:
            raise ValueError(f"slices[{n}]: {inputs[s.input]} has no tensors in layer {missing[0]}")
    post = tuple(arch.llm.get("post_layers", ()))
    first, last = slices[0].input, slices[-1].input
    for key in found[first][1]:
        if not key.startswith(post):
            take(key, first, key)
    out = 0
    for s in slices:
        for j in range(s.start, s.end):
            for key, m in found[s.input][0][j]:
                take(key[:m.start(1)] + str(out) + key[m.end(1):], s.input, key)
            out += 1
    for key in found[last][1]:
        if key.startswith(post):
            take(key, last, key)
    shown = ", ".join(f"{inputs[s.input]} {s.start}-{s.end - 1}" for s in slices)
    ctx.note(f"{out} layers: {shown}")
    base = ctx.config if ctx.config is not None else ctx.input_config(0)  # the first input's, or as changed
    if base is not None:
        configs = {i: ctx.input_config(i) or base for i in found}
        ctx.config, warnings = output_config(base, arch.llm.get("config", {}), slices, configs, counts)
        for text in warnings:
            ctx.warn(text)
    return _tensors(ctx, planned)


def _tensors(ctx, planned: dict[str, tuple[int, str]]) -> list[PlannedTensor]:
    out = []
    for name, (i, key) in planned.items():
        ref = ctx.ref(i, key)
        params = ctx.params(key) if is_float(ref.dtype) else None
        scale = params.get("scale", 1.0) if params else 1.0
        out.append(PlannedTensor(name, ctx.out_dtype(ref.dtype), tuple(ref.shape), ((i, key),),
                                 None if scale == 1 else {"scale": scale}))
    return out


def output_config(base: dict, spec: dict, slices: list[Slice], configs: dict[int, dict],
                  counts: dict[int, int]) -> tuple[dict, list[str]]:
    """The output's config.json: `base` (the first input's) with the layer count of the slices
    and each per-layer list (spec's layer_lists) made of the slices' own layers' entries, in
    their new order, in every config section (a VLM's text_config) that has a layer count."""
    out, warnings = copy.deepcopy(base), []
    total = sum(len(s) for s in slices)
    counted = False
    for section in spec.get("sections", [""]):
        target = _section(out, section)
        keys = [k for k in spec.get("num_layers", ["num_hidden_layers"]) if isinstance(target, dict) and k in target]
        if not keys:
            continue
        counted = True
        for key in keys:
            target[key] = total
        for name in spec.get("layer_lists", []):
            rule = spec.get("derived", {}).get(name)
            values: list | None = []
            for s in slices:
                entries = _per_layer(_section(configs[s.input], section), name, counts[s.input], rule)
                if entries is None:
                    values = None
                    break
                values += entries[s.start:s.end]
            where = f"{section}.{name}" if section else name
            if values is not None:
                target[name] = values
            elif name in target:
                del target[name]
                warnings.append(f"config.json {where}: an input has no entry per layer, so the list was left out "
                                "(the model's defaults apply)")
    if not counted:
        names = " or ".join(spec.get("num_layers", ["num_hidden_layers"]))
        warnings.append(f"config.json has no {names}: it is copied as it is, without the new count of {total} layers")
    return out, warnings


def _section(config, section: str):
    if not isinstance(config, dict):
        return None
    return config if not section else config.get(section)


def _per_layer(config, name: str, layers: int, rule: dict | None) -> list | None:
    """An input's list of one entry per layer: its config's, else made by the architecture's
    rule (Gemma: every n-th layer full attention, the others sliding), else None."""
    values = config.get(name) if isinstance(config, dict) else None
    if isinstance(values, list) and len(values) == layers:
        return values
    if rule is None:
        return None
    every = config.get(rule["pattern_key"], rule["every"]) if isinstance(config, dict) and "pattern_key" in rule \
        else rule["every"]
    if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
        return None
    return [rule["last"] if (i + 1) % every == 0 else rule["each"] for i in range(layers)]


METHODS = [
    Method("passthrough", 1, passthrough, ("A",), (
        Param("slices", list, [], "a list of slices, each " + SLICE_FORM + ": layers start..end-1 of that input "
              "(mergekit's layer_range), stacked in order and renumbered; none: the one input as it is",
              check=check_slices),
        Param("scale", float, 1.0, "multiplies each tensor (mergekit's passthrough scale; rules set it per key, "
              "as mergekit's filter does)"),
    ), passthrough.__doc__, merges_tensors=False, variadic=True, plan_tasks=plan_passthrough),
]
