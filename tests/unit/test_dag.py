"""planning/graph.py's DAG (graphlib) against networkx, which it replaced on the build path:
the same topological order (smallest name first among nodes ready at once), the same ancestors,
every cycle found."""

from __future__ import annotations

import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebuild.planning.graph import Dag

NAMES = [f"n{i:02d}" for i in range(12)] + ["a", "base", "mix", "z"]


@st.composite
def dags(draw):
    names = draw(st.permutations(NAMES))[: draw(st.integers(2, len(NAMES)))]
    edges = draw(st.lists(st.tuples(st.integers(0, len(names) - 1), st.integers(0, len(names) - 1)), max_size=40))
    return names, [(names[i], names[j]) for i, j in edges if i < j]  # earlier -> later: acyclic


@settings(max_examples=200, deadline=None)
@given(dags())
def test_order_and_ancestors_are_networkx_s(case):
    names, edges = case
    ours, theirs = Dag(), nx.DiGraph()
    for n in names:
        ours.add(n, "merge")
        theirs.add_node(n)
    for u, v in edges:
        ours.read(u, v)
        theirs.add_edge(u, v)
    assert ours.order() == list(nx.lexicographical_topological_sort(theirs))
    for n in names:
        assert ours.ancestors(n) == nx.ancestors(theirs, n)


@settings(max_examples=100, deadline=None)
@given(dags(), st.data())
def test_a_back_edge_is_a_cycle(case, data):
    import graphlib

    import pytest

    names, edges = case
    if not edges:
        return
    u, v = data.draw(st.sampled_from(edges))
    g = Dag()
    for n in names:
        g.add(n, "merge")
    for a, b in edges + [(v, u)]:
        g.read(a, b)
    with pytest.raises(graphlib.CycleError):
        g.order()
