"""mergekit's per-tensor parameters as a merge's values and rules.

mergekit resolves a parameter for each tensor from a chain of settings: the model's own (in
`models:` or a slice's sources), the slice's, the config's. A setting is a number, a gradient (a
list, interpolated over the layers of its slice: t = i / (n - 1), and t = 0 for the tensors
outside the layers) or a list of `{filter, value}`, of which the first whose filter is a
substring of the tensor's name wins; a filter-less entry ends the list, and no match falls
through to the next setting of the chain. So a chain is a list of first-match clauses.

In a Mergefile the catch-all clause is the merge's value (a gradient a `{ gradient = [...] }`;
slices, whose gradients are each their own, an N-point gradient holding each layer's value), and
each filter is a rule, the rules in reverse order: later rules win, so the first filter does. A
filter whose value varies by layer becomes a rule per run of layers with one value, which needs
the layer count: slices give it, a model folder's config.json does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mergebuild.layouts.blocks import fallback
from mergebuild.mergefile.importing import DraftRule, Unexpressible, Value
from mergebuild.record.foreign.finder import layer_count

MISSING = object()  # a parameter mergekit requires
LAYER = r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\."  # the generic layout's, if its file has none


@dataclass(frozen=True)
class Ref:
    """A mergekit ModelReference: a path or Hugging Face repo, a revision, a LoRA."""

    path: str
    revision: str | None = None
    lora: str | None = None

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        return text + (f"+{self.lora}" if self.lora else "")


@dataclass
class Segment:
    """An output slice: its layers (None: all, in `models:` form), its sources and parameters,
    and each source's layer_range (as many layers as the slice has; None in `models:` form)."""

    layers: tuple[int, int] | None
    sources: list[tuple[Ref, dict]]
    params: dict
    ranges: list[tuple[int, int]] | None = None


class Params:
    """The parameters of one mergekit merge configuration."""

    def __init__(self, ctx, label: str, segments: list[Segment], global_params: dict, layers, inputs: list[str]):
        self.ctx, self.label, self.segments, self.global_params = ctx, label, segments, global_params
        if layers is None:  # `models:` form: the layer count of the first input folder that says
            layers = next((n for n in (layer_count(ctx.paths.get(i)) for i in inputs) if n is not None), None)
        self.layers = layers
        generic = fallback()  # LLM layer names, as mergebuild reads them
        self.layer_re = generic.layer_pattern.pattern if generic and generic.layer_pattern else LAYER
        self.embed = [re.escape(n) for n in (generic.components.get("embeddings", ()) if generic else ("embed",))]

    def chain(self, name: str, model: Ref | None, segment: Segment) -> list:
        out = []
        if model is not None:
            for ref, params in segment.sources:
                if ref == model and name in params:
                    out.append(params[name])
        if name in segment.params:
            out.append(segment.params[name])
        if name in self.global_params:
            out.append(self.global_params[name])
        return out

    def clauses(self, chain: list, default) -> list[tuple[str | None, object]]:
        """The first-match clauses of a chain: (filter, value) pairs, the last one (None, value)."""
        out = []
        for setting in chain:
            if setting is None:
                continue
            if isinstance(setting, dict):
                setting = [setting]
            if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
                for cond in setting:
                    if "value" not in cond:
                        raise Unexpressible("a {filter, value} entry without a value")
                    f = cond.get("filter")
                    if f is None or f == "*":
                        out.append((None, cond["value"]))
                        return out
                    if not isinstance(f, str) or not f:
                        raise Unexpressible(f"filter {f!r}: not a string")
                    if f not in [g for g, _ in out]:  # a repeated filter is never reached
                        out.append((f, cond["value"]))
                continue
            out.append((None, setting))
            return out
        if default is MISSING:
            raise Unexpressible("a required parameter is missing (mergekit requires it)")
        out.append((None, default))
        return out

    # --- values ---------------------------------------------------------------------------
    @staticmethod
    def numbers(value, name: str):
        if isinstance(value, bool) or not isinstance(value, (int, float, list)):
            raise Unexpressible(f"{name}: {value!r} is not a number or a gradient")
        if isinstance(value, list) and (not value or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             for x in value)):
            raise Unexpressible(f"{name}: a list of numbers expected (a gradient)")
        return value

    @staticmethod
    def at(value, t: float) -> float:
        """mergekit's evaluate_setting of a number or gradient at t."""
        if not isinstance(value, list):
            return value
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]

    @staticmethod
    def written(value):
        if isinstance(value, list):
            return value[0] if len(set(value)) == 1 else {"gradient": list(value)}
        return value

    def per_layer(self, per_segment: list) -> list[float]:
        """Each layer's value of a clause whose value is given per segment (t is local to a slice)."""
        if self.segments[0].layers is None:
            n = self.layers
            return [self.at(per_segment[0], i / (n - 1) if n > 1 else 1) for i in range(n)]
        out = []
        for seg, v in zip(self.segments, per_segment):
            n = seg.layers[1] - seg.layers[0]
            out += [self.at(v, i / (n - 1) if n > 1 else 1) if v is not None else None for i in range(n)]
        return out

    def _layers(self, layers: list[int]) -> str:
        alternatives = "|".join(str(i) for i in layers)
        return self.layer_re.replace(r"(\d+)", alternatives if len(layers) == 1 else f"(?:{alternatives})")

    def _outside_layers(self) -> str:
        return "(?!.*" + self.layer_re.replace(r"(\d+)", r"\d+") + ")"

    # --- a parameter that varies by tensor --------------------------------------------------
    def numeric(self, name: str, fields: dict, rules: list, models: list | None = None, default=None,
                as_name: str | None = None, note_default: str = "", write_default: bool = True):
        """A number that may vary by tensor: the merge's value (returned) and rules for filters."""
        target = as_name or name
        draft = self.ctx.draft
        if models is None:
            chains = [self.chain(name, None, s) for s in self.segments]
        else:
            per_model = {str(m): [self.chain(name, m, s) for s in self.segments] for m in models}
            chains = next(iter(per_model.values()))
            if len({json.dumps(c, sort_keys=True) for c in per_model.values()}) > 1:
                draft.unexpressed.append(f"{self.label}: {name} differs between models; mergebuild's {target} is one "
                                         f"per merge: the first model's ({models[0]}) is used")
        clauses = [self.clauses(c, default) for c in chains]  # per segment
        order = _atom_order([[f for f, _ in cl[:-1]] for cl in clauses], name)
        by_atom = [{f: self.numbers(v, name) for f, v in cl[:-1]} for cl in clauses]
        wild = [self.numbers(cl[-1][1], name) for cl in clauses]
        where = "parameters" if models is None else "models' parameters"

        if len(self.segments) == 1 and not (self.layers == 1 and isinstance(wild[0], list)):
            base = self.written(wild[0])
        else:  # slices, or one layer (mergekit's t is 1 there, a Mergefile gradient's 0)
            per_layer = self.per_layer(wild)
            outside = self.at(wild[0], 0)
            points = per_layer * 2 if len(per_layer) == 1 else per_layer  # a gradient has two points or more
            base = outside if len(set(per_layer + [outside])) == 1 else {"gradient": points, "default": outside}
            last = self.at(wild[-1], 0)
            if last != outside:  # mergekit's post weights (final norm, head) read the last slice
                rules.append(DraftRule({target: last}, regex="^" + self._outside_layers() + "(?!.*(?:"
                                       + "|".join(self.embed) + "))", note=f"{where}.{name}: the tensors after the "
                                       "layers (final norm, head) take the last slice's value, as in mergekit"))
        if chains and any(chains) or write_default:
            fields[target] = Value(base, f"{where}.{name}" if any(chains) else note_default or f"mergekit's default {name}")

        for atom in reversed(order):
            values = [a.get(atom) for a in by_atom]  # None where a slice has no such filter
            everywhere = all(v is not None for v in values)
            shown = {json.dumps(self.written(v)) for v in values}
            note = f"{where}.{name}: filter {atom!r} (the first matching filter wins in mergekit; the last rule here)"
            if everywhere and len(shown) == 1 and not isinstance(self.written(values[0]), dict):
                rules.append(DraftRule({target: self.written(values[0])}, match=[atom], note=note))
                continue
            if self.layers is None:
                raise Unexpressible(f"{name} under filter {atom!r} varies by layer, and a rule takes one value: "
                                    "it needs the layer count (have the models' folders at hand: --models)")
            needle = "^(?=.*" + re.escape(atom) + ")"
            outside = self.at(values[0], 0) if values[0] is not None else None
            if everywhere:
                rules.append(DraftRule({target: outside}, match=[atom], note=note + ", a value per layer below"))
            elif outside is not None:
                rules.append(DraftRule({target: outside}, regex=needle + self._outside_layers(), note=note
                                       + ", outside the layers; the slices' layers below"))
            runs: dict[float, list[int]] = {}
            for layer, v in enumerate(self.per_layer(values)):
                if v is not None and not (everywhere and v == outside):
                    runs.setdefault(v, []).append(layer)
            for i, (v, layers) in enumerate(runs.items()):
                first = i == 0 and not everywhere and outside is None
                rules.append(DraftRule({target: v}, regex=needle + ".*?" + self._layers(layers),
                                       note=note + ", in the layers of the slices that have it" if first else ""))
        return base

    def constant(self, name: str, default):
        """A value that must be the same for every tensor (normalize, rescale, filter_wise)."""
        clauses = [self.clauses(self.chain(name, None, s), default) for s in self.segments]
        values = {json.dumps(cl[-1][1]) for cl in clauses}
        if any(len(cl) > 1 for cl in clauses) or len(values) > 1:
            raise Unexpressible(f"{name} varies by tensor or slice: mergebuild takes one value per merge")
        return clauses[0][-1][1]

    def flag(self, name: str, default) -> bool:
        value = self.constant(name, default)
        if not isinstance(value, bool):
            raise Unexpressible(f"{name}: {value!r} is not true or false")
        return value

    def per_model_list(self, name: str, models: list, default, required: bool) -> list:
        """One number per model (weights): each must be the same for every tensor."""
        out = []
        for m in models:
            chains = [self.chain(name, m, s) for s in self.segments]
            if required and not any(chains):
                if default is None:
                    raise Unexpressible(f"{m}: no {name} (mergekit requires one per model)")
                self.ctx.draft.unexpressed.append(f"{self.label}: {m} has no {name} (mergekit requires one); "
                                                  f"{default:g} is used")
            clauses = [self.clauses(c, default) for c in chains]
            values = [self.numbers(cl[-1][1], f"{m}: {name}") for cl in clauses]
            value = values[0]
            if any(len(cl) > 1 for cl in clauses) or any(json.dumps(v) != json.dumps(value) for v in values) \
                    or isinstance(value, list):
                flat = value if isinstance(value, list) else [value]
                value = sum(flat) / len(flat)
                self.ctx.draft.unexpressed.append(f"{self.label}: {m}'s {name} varies by tensor (a filter, a gradient "
                                                  f"or slices): mergebuild's {name}s are one list per merge; "
                                                  f"{value:g} is used")
            out.append(value)
        return out

    def unused(self, name: str, models: list, comments: list, why: str) -> None:
        if any(self.chain(name, m, s) for m in models for s in self.segments):
            comments.append(f"{name} is left out: {why} (mergekit ignores it too)")


def _atom_order(per_segment: list[list[str]], name: str) -> list[str]:
    """One order of every filter that agrees with each slice's: then reversed rules, each set
    where its slice has it, give each slice's first match."""
    after: dict[str, set[str]] = {}
    for filters in per_segment:
        for i, f in enumerate(filters):
            after.setdefault(f, set()).update(filters[i + 1:])
    order, placed = [], set()
    while len(order) < len(after):
        ready = [f for f in after if f not in placed and not any(f in after[g] for g in after if g not in placed)]
        if not ready:
            raise Unexpressible(f"{name}: the slices order its filters differently")
        first = min(ready, key=lambda f: min(s.index(f) for s in per_segment if f in s))
        order.append(first)
        placed.add(first)
    return order
