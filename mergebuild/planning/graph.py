"""The Mergefile as a networkx DAG: cycle check, topological order, what a target needs."""

from __future__ import annotations

import networkx as nx

from mergebuild.errors import MergefileError, UsageError
from mergebuild.mergefile.model import Mergefile


def build_graph(mf: Mergefile) -> nx.DiGraph:
    """Nodes are models and merges; an edge input -> merge. Raises MergefileError on a cycle."""
    g = nx.DiGraph()
    for name, model in mf.models.items():
        g.add_node(name, kind="model")
        if model.fisher is not None:  # a computed source reads its model
            g.add_edge(model.fisher.of, name, position=0)
    for name, merge in mf.merges.items():
        g.add_node(name, kind="merge")
        for position, source in enumerate(merge.inputs):
            g.add_edge(source, name, position=position)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return g
    names = [u for u, _ in cycle] + [cycle[0][0]]
    raise MergefileError(mf.path, f"merges.{cycle[0][1]}", "inputs", "cycle: " + " -> ".join(names))


def build_order(mf: Mergefile, g: nx.DiGraph, targets: list[str]) -> list[str]:
    """The targets and everything they need, inputs before the merges that read them."""
    for t in targets:
        if t not in mf.merges:
            known = ", ".join(mf.merges) or "none"
            kind = "a model, not a merge" if t in mf.models else "unknown"
            raise UsageError(f"target {t!r} is {kind} (merges: {known})")
    needed = set(targets)
    for t in targets:
        needed |= nx.ancestors(g, t)
    return [n for n in nx.lexicographical_topological_sort(g) if n in needed]
