"""Permutation specs: which tensor axes share a permutation of units (re-basin, `permute`).

An architecture file's `permutations` object is data (docs/architecture.md):
  "rules": [[regex, [[group template, axis], [group template, axis, {"repeat": 2}], ...]], ...]
      every rule whose regex matches a key adds its axes: axis `axis` of that key is permuted by
      the group named by formatting the template with the regex's groups. `repeat` k: the axis
      is k equal chunks, each permuted alike (GEGLU's value and gate halves);
  "structure": [[group-name regex, {"blocks": n} | {"block_size": n}, "move_blocks": bool], ...]
      the units of a matching group fall in equal consecutive blocks (GroupNorm groups,
      attention heads) that a permutation must keep whole: units stay inside their block, and
      whole blocks may trade places only with "move_blocks" (a GroupNorm group may; a head
      whose q/k and v/out are permuted apart may not);
  "derive": "sequential": no rules: the groups come from the key chain of a sequential model
      (each weight's rows, its bias and the 1-D tensors after it, with the next weight's columns).

Every permutation made from a spec keeps the model's function exactly; a spec that does not
fit a model (axes of one group that disagree in size, blocks that do not divide it) is a
ValueError naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Axis:
    key: str
    axis: int
    repeat: int = 1


@dataclass
class Group:
    name: str
    size: int = 0
    axes: list[Axis] = field(default_factory=list)
    blocks: int = 1  # equal blocks of units kept whole
    move_blocks: bool = False  # whole blocks may trade places

    def as_doc(self) -> list:
        """JSON-able, for cache keys and the statistic's parameters."""
        return [self.name, self.size, self.blocks, self.move_blocks, [[a.key, a.axis, a.repeat] for a in self.axes]]


def groups_from_doc(doc: list) -> dict[str, Group]:
    """Groups back from Group.as_doc() (a statistic's parameters)."""
    return {name: Group(name, size, [Axis(k, a, r) for k, a, r in axes], blocks, move)
            for name, size, blocks, move, axes in doc}


def has_spec(arch) -> bool:
    return bool(arch is not None and arch.extra.get("permutations"))


def permutation_groups(arch, shapes: dict[str, tuple[int, ...]]) -> dict[str, Group]:
    """The groups of the architecture's spec on a model with these keys and shapes (in key order)."""
    spec = arch.extra.get("permutations") if arch is not None else None
    if not spec:
        raise ValueError(f"architecture {arch.name if arch else '?'} has no permutation spec")
    if spec.get("derive") == "sequential":
        groups = _sequential(shapes)
    else:
        groups = _from_rules(spec.get("rules", []), shapes)
    _structure(groups, spec.get("structure", []))
    return {n: g for n, g in groups.items() if len({a.key for a in g.axes}) >= 2}


def _from_rules(rules: list, shapes: dict[str, tuple[int, ...]]) -> dict[str, Group]:
    compiled = [(re.compile(pattern), axes) for pattern, axes in rules]
    groups: dict[str, Group] = {}
    for key, shape in shapes.items():
        taken: dict[int, str] = {}
        for pattern, axes in compiled:
            m = pattern.search(key)
            if not m:
                continue
            for entry in axes:
                template, axis = entry[0], entry[1]
                repeat = int(entry[2].get("repeat", 1)) if len(entry) > 2 else 1
                name = template.format(*m.groups())
                if axis in taken and taken[axis] != name:
                    raise ValueError(f"the permutation spec gives {key!r} axis {axis} to both {taken[axis]} and {name}")
                taken[axis] = name
                _add(groups, name, Axis(key, axis, repeat), shape)
    return groups


def _add(groups: dict[str, Group], name: str, axis: Axis, shape: tuple[int, ...]) -> None:
    if axis.axis >= len(shape) or shape[axis.axis] % axis.repeat:
        raise ValueError(f"{axis.key!r} {list(shape)} has no axis {axis.axis} that permutation group {name} fits")
    size = shape[axis.axis] // axis.repeat
    group = groups.setdefault(name, Group(name, size))
    if size != group.size:
        first = group.axes[0]
        raise ValueError(f"permutation group {name}: {axis.key!r} has {size} units on axis {axis.axis}, "
                         f"{first.key!r} {group.size}: the spec does not fit this model")
    group.axes.append(axis)


def _structure(groups: dict[str, Group], structure: list) -> None:
    compiled = [(re.compile(pattern), how) for pattern, how in structure]
    for group in groups.values():
        how = next((h for p, h in compiled if p.search(group.name)), None)
        if how is None:
            continue
        blocks = how.get("blocks") or (group.size // how["block_size"] if how.get("block_size") else 1)
        if blocks < 1 or group.size % blocks or (how.get("block_size") and group.size % how["block_size"]):
            raise ValueError(f"permutation group {group.name}: {group.size} units do not fall in "
                             f"{how}: the spec does not fit this model")
        group.blocks, group.move_blocks = blocks, bool(how.get("move_blocks", False))


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _sequential(shapes: dict[str, tuple[int, ...]]) -> dict[str, Group]:
    """Groups of a sequential model: the weights (2-D or more, by module in key order) form a
    chain where each one's rows are the next one's columns."""
    modules: dict[str, dict[str, tuple]] = {}
    for key, shape in sorted(shapes.items(), key=lambda kv: _natural(kv[0])):
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = shape
    order = list(modules)
    weights = [m for m in order if len(modules[m].get("weight", ())) >= 2]
    if len(weights) < 2:
        raise ValueError("the model has fewer than two weight matrices: no sequential chain to permute")
    groups: dict[str, Group] = {}
    for this, after in zip(weights, weights[1:]):
        n, takes = modules[this]["weight"][0], modules[after]["weight"][1]
        if n != takes:
            raise ValueError(f"{after}.weight {list(modules[after]['weight'])} does not take the {n} outputs of "
                             f"{this}.weight: the keys are not a sequential chain (no spec fits this model)")
        group = Group(this, n, [Axis(f"{this}.weight", 0)])
        between = order[order.index(this):order.index(after)]
        for module in between:  # its bias, and what follows it (a norm's weight, bias, running statistics)
            for leaf, shape in modules[module].items():
                if len(shape) == 1 and shape[0] == n and not (module == this and leaf == "weight"):
                    group.axes.append(Axis(f"{module}.{leaf}", 0))
        group.axes.append(Axis(f"{after}.weight", 1))
        groups[this] = group
    return groups


def tensor_axes(groups: dict[str, Group]) -> dict[str, list[tuple[str, int, int]]]:
    """key -> [(group, axis, repeat)] of every permuted key."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for group in groups.values():
        for a in group.axes:
            out.setdefault(a.key, []).append((group.name, a.axis, a.repeat))
    return out
