"""mergekit's `slices:` as Mergefile merges.

mergekit's output layers are its slices' in order (mergekit/plan.py, plan_slice): each slice
merges layer i of every source's layer_range with the method, its gradients spanning the slice
(t = i / (n - 1)); the embeddings come from the first slice's sources, the final norm and head
from the last one's. Three Mergefile forms say that:

- slices that merge each layer with the same layer of the same models ([0, n), [n, m), ...):
  one merge (mergekit.py does it; the slices' parameters become per-layer values);
- `passthrough` with one source per slice (frankenmerges, depth up-scaling): one `passthrough`
  merge with `slices` (docs/methods.md, "Stacking layers");
- any other: a merge per slice, then a passthrough that stacks them, as docs/methods.md tells
  users to write by hand. Each source is first cut to its layer_range (a one-slice passthrough:
  copies, nothing computed), so the slice's merge spans those layers, renumbered 0..n-1, and its
  gradients are the slice's. A passthrough slice whose `scale` differs from the others' is such
  a merge too (a passthrough with scale of its cut).
"""

from __future__ import annotations

import json

from mergebuild.mergefile.importing import DraftMerge, DraftRule, Unexpressible, Value
from mergebuild.record.foreign.mergekit_fields import dtype, vocabulary
from mergebuild.record.foreign.mergekit_params import Params, Segment
from mergebuild.record.foreign.mergekit_read import parse_ref

MAX_LAYERS = 10_000


def read_segments(doc: dict) -> tuple[list[Segment], int | None]:
    """The config's output slices (one, of every layer, in `models:` form) and, when they merge
    each layer with the same layer of the same models, the layer count they cover; None when
    they move, repeat or mix layers (a frankenmerge, or merges per slice: see `stack`)."""
    models, slices = doc.get("models"), doc.get("slices")
    if bool(models) == bool(slices):
        raise Unexpressible("exactly one of models: and slices: must be given")
    if models:
        if not isinstance(models, list):
            raise Unexpressible("models: not a list")
        sources = []
        for i, entry in enumerate(models):
            if not isinstance(entry, dict) or "model" not in entry:
                raise Unexpressible(f"models[{i}]: not a {{model: ...}} entry")
            sources.append((parse_ref(entry["model"], f"models[{i}].model"), mapping(entry.get("parameters"))))
        return [Segment(None, sources, {})], None
    if not isinstance(slices, list):
        raise Unexpressible("slices: not a list")
    segments, position, order, aligned = [], 0, None, True
    for i, s in enumerate(slices):
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            raise Unexpressible(f"slices[{i}]: no sources")
        if s.get("base_model") is not None and s["base_model"] != doc.get("base_model"):
            raise Unexpressible(f"slices[{i}].base_model: a base per slice has no Mergefile form")
        if s.get("residual_weight") is not None:
            raise Unexpressible(f"slices[{i}].residual_weight: no Mergefile form")
        sources, ranges = [], []
        for j, src in enumerate(s["sources"]):
            if not isinstance(src, dict) or "model" not in src:
                raise Unexpressible(f"slices[{i}].sources[{j}]: not a {{model: ..., layer_range: ...}} entry")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in lr)):
                raise Unexpressible(f"slices[{i}].sources[{j}].layer_range: expected [start, end]")
            if not 0 <= lr[0] < lr[1]:
                raise Unexpressible(f"slices[{i}].sources[{j}].layer_range {lr}: expected 0 <= start < end")
            if lr[1] > MAX_LAYERS:
                raise Unexpressible(f"slices[{i}]: layer {lr[1]}: more layers than any model has")
            ranges.append(tuple(lr))
            sources.append((parse_ref(src["model"], f"slices[{i}].sources[{j}].model"), mapping(src.get("parameters"))))
        if len({b - a for a, b in ranges}) > 1:
            raise Unexpressible(f"slices[{i}]: its sources have different numbers of layers (mergekit refuses it)")
        keys = [str(r) for r, _ in sources]
        if len(set(keys)) < len(keys):
            raise Unexpressible(f"slices[{i}]: a model is given twice among its sources")
        start, end = ranges[0]
        if len(set(ranges)) > 1 or start != position or (order is not None and keys != order):
            aligned = False
        order, position = keys, end
        segments.append(Segment((start, end), sources, mapping(s.get("parameters")), ranges))
    return segments, position if aligned else None


def mapping(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Unexpressible("parameters: not a mapping")
    return value


def stack(doc: dict, label: str, ctx, name: str, method: str, segments: list[Segment], base, global_params: dict,
          vocab_source, output: Value | None, merge_slice) -> dict[str, DraftMerge]:
    """The merges of slices that are not one merge layer by layer: the passthrough named `name`
    last, and before it the cuts and the merges per slice it stacks. merge_slice(segment,
    layers, aliases, vocab_source) is the one merge of a slice whose sources are the cuts named
    in aliases (mergekit reference -> merge name)."""
    draft = ctx.draft
    plain = method == "passthrough"
    if plain and any(len(s.sources) > 1 for s in segments):
        raise Unexpressible("passthrough with several sources in a slice (mergekit's passthrough takes one tensor "
                            "and refuses it)")
    if vocab_source is not None and plain:
        vocabulary(vocab_source, label, draft, "passthrough", base, [], [], {})  # listed: no rows to align
        vocab_source = None
    if vocab_source is not None and len({json.dumps([str(r) for r, _ in s.sources]) for s in segments}) > 1:
        draft.unexpressed.append(f"{label}: tokenizer_source {vocab_source}: mergekit builds one vocabulary of "
                                 "every slice's models; a merge per slice aligns its own models' rows only, and "
                                 "these slices merge different models; left out")
        vocab_source = None
    scale = _shared_scale(ctx, label, segments, global_params) if plain else None
    merges: dict[str, DraftMerge] = {}
    cuts: dict[tuple, str] = {}
    stacked, fields, rules = [], {}, []
    for i, seg in enumerate(segments):
        n = seg.layers[1] - seg.layers[0]
        if plain and (scale is not None or not _scales(ctx, seg, global_params)):
            stacked.append({"input": ctx.input_name(seg.sources[0][0]), "layer_range": list(seg.ranges[0])})
            continue
        aliases = {}
        for (ref, _), (a, b) in zip(seg.sources, seg.ranges):
            if (ref, a, b) not in cuts:
                source = ctx.input_name(ref)
                cut = cuts[(ref, a, b)] = draft.name(f"{source}_layers{a}" + (f"-{b - 1}" if b - a > 1 else ""))
                merges[cut] = DraftMerge(
                    Value("passthrough", "copies: nothing is computed"), Value([source]),
                    {"slices": Value([{"input": source, "layer_range": [a, b]}], f"mergekit's layer_range [{a}, {b}]")},
                    comments=[f"layers {a}..{b - 1} of {source} (a source of slices[{i}]), renumbered 0..{n - 1}, so "
                              f"that the merge of the slice spans them as mergekit's does"])
            aliases[ref] = cuts[(ref, a, b)]
        part = draft.name(f"{name}_slice{i}")
        merge = merge_slice(Segment((0, n), seg.sources, seg.params, [(0, n)] * len(seg.sources)), n, aliases,
                            vocab_source)
        merge.comments[:1] = [f"slices[{i}] of {label}: mergekit's {method}" + (" with this slice's own scale"
                              if plain else "") + ", of its sources' layers cut out above"]
        merges[part] = merge
        stacked.append({"input": part, "layer_range": [0, n]})
    if scale:
        fields["scale"], rules = scale
    fields = {"slices": Value(stacked, "mergekit's slices, in order")} | fields
    dtype(doc, label, fields, draft)
    if output is not None:
        fields["output"] = output
    inputs = list(dict.fromkeys(s["input"] for s in stacked))
    comments = [f"{label} of the {draft.source}: merge_method {method} with slices"]
    if merges:
        comments.append("the merges above are mergekit's slices, each of its own; this passthrough stacks them")
    comments.append("the output's layers are the slices' in order; embeddings from the first slice, final norm "
                    "and head from the last (mergekit's planner takes them so)")
    merges[name] = DraftMerge(Value("passthrough", f"mergekit {method} with slices"),
                              Value(inputs, "each slice's model, in the order of the slices"), fields, rules, comments)
    return merges


def _scales(ctx, seg: Segment, global_params: dict) -> list:
    return Params(ctx, "", [seg], global_params, None, []).chain("scale", seg.sources[0][0], seg)


def _shared_scale(ctx, label: str, segments: list[Segment], global_params: dict):
    """One passthrough's `scale` and rules, when every slice has the same one and it does not
    vary by layer (a passthrough's gradient spans its inputs' layers, not a slice's); None when
    a slice needs its own (a merge of its own); () when no slice scales."""
    chains = [_scales(ctx, s, global_params) for s in segments]
    if not any(chains):
        return ()
    if len({json.dumps(c, sort_keys=True) for c in chains}) > 1 or any(_by_layer(s) for s in chains[0]):
        return None
    fields: dict[str, Value] = {}
    rules: list[DraftRule] = []
    first = segments[0]
    params = Params(ctx, label, [Segment(None, first.sources, first.params)], global_params, None, [])
    params.numeric("scale", fields, rules, models=[first.sources[0][0]], default=1.0, write_default=False)
    return fields["scale"], rules


def _by_layer(value) -> bool:
    """Whether a parameter setting holds a gradient (a list of numbers)."""
    if isinstance(value, list):
        if value and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            return True
        return any(_by_layer(v) for v in value)
    if isinstance(value, dict):
        return any(_by_layer(v) for v in value.values())
    return False
