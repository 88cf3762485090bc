"""The Mergefile as a DAG: cycle check, topological order, what a target needs.

Built on the standard library's graphlib, not networkx: importing networkx (and the numpy it
pulls in) was more than a third of a no-op build. The pictures (render/) still draw with networkx.
"""

from __future__ import annotations

import graphlib
import heapq
from dataclasses import dataclass, field

from mergebuild.errors import MergefileError, UsageError
from mergebuild.mergefile.model import Mergefile


@dataclass
class Dag:
    """Models and merges; `inputs[n]`: the nodes n reads (an edge input -> n)."""

    kinds: dict[str, str] = field(default_factory=dict)  # node -> "model" | "merge"
    inputs: dict[str, set[str]] = field(default_factory=dict)

    def add(self, node: str, kind: str) -> None:
        self.kinds[node] = kind
        self.inputs.setdefault(node, set())

    def read(self, source: str, node: str) -> None:
        self.kinds.setdefault(source, "")
        self.inputs.setdefault(source, set())
        self.inputs.setdefault(node, set()).add(source)

    def ancestors(self, node: str) -> set[str]:
        """Every node `node` is made from, directly or not."""
        seen: set[str] = set()
        stack = list(self.inputs.get(node, ()))
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self.inputs.get(n, ()))
        return seen

    def order(self) -> list[str]:
        """Inputs before their readers; among nodes ready at once, the smallest name first (the
        same order as networkx's lexicographical_topological_sort). CycleError on a cycle."""
        sorter = graphlib.TopologicalSorter(self.inputs)
        sorter.prepare()
        ready = list(sorter.get_ready())
        heapq.heapify(ready)
        out = []
        while ready:
            node = heapq.heappop(ready)
            out.append(node)
            sorter.done(node)
            for n in sorter.get_ready():
                heapq.heappush(ready, n)
        return out


def build_graph(mf: Mergefile) -> Dag:
    """Nodes are models and merges; an edge input -> merge. Raises MergefileError on a cycle."""
    g = Dag()
    for name, model in mf.models.items():
        g.add(name, "model")
        if model.fisher is not None:  # a computed source reads its model
            g.read(model.fisher.of, name)
    for name, merge in mf.merges.items():
        g.add(name, "merge")
        for source in merge.inputs:
            g.read(source, name)
    try:
        graphlib.TopologicalSorter(g.inputs).prepare()
    except graphlib.CycleError as e:
        cycle = list(e.args[1])  # [a, b, ..., a], each node read by the next
        raise MergefileError(mf.path, f"merges.{cycle[1]}", "inputs", "cycle: " + " -> ".join(cycle)) from None
    return g


def build_order(mf: Mergefile, g: Dag, targets: list[str]) -> list[str]:
    """The targets and everything they need, inputs before the merges that read them."""
    for t in targets:
        if t not in mf.merges:
            known = ", ".join(mf.merges) or "none"
            kind = "a model, not a merge" if t in mf.models else "unknown"
            raise UsageError(f"target {t!r} is {kind} (merges: {known})")
    needed = set(targets)
    for t in targets:
        needed |= g.ancestors(t)
    return [n for n in g.order() if n in needed]
