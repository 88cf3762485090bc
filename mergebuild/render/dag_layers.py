"""The merge DAG's layers and their left-to-right order, as a graph with no sizes: a layer per
node (a source just above the first merge that reads it, far-off sources drawn again near their
use), a lane wherever an edge crosses a layer, and each layer ordered to cut crossings (barycentre
sweeps, then swaps of neighbours). render/dag_geometry.py gives the result sizes and places.
"""

from __future__ import annotations

from itertools import combinations

MAX_SPAN = 3  # a source feeding a merge more layers below than this is drawn again beside it


def layered_layout(graph) -> dict:
    """{node: (layer, slot)}: the layer counts down from the sources (a source sits just above the
    first merge that reads it), the slot orders a layer left to right by the barycentre rule."""
    layers = _layers(graph)
    graph, _ = _with_lanes(graph, layers)
    rows = _order(graph, _rows(graph, layers))
    slots = {n: i for row in rows for i, n in enumerate(r for r in row if not isinstance(r, tuple))}
    return {n: (layers[n], slots[n]) for n in layers if not isinstance(n, tuple)}


def _dag(nodes: list[dict], edges):
    import networkx as nx

    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node(node["name"])
    for src, dst in edges:
        for end in (src, dst):
            if end not in graph:
                raise ValueError(f"edge {src!r} -> {dst!r}: no node named {end!r}")
        graph.add_edge(src, dst)
    if not nx.is_directed_acyclic_graph(graph):
        raise ValueError(f"the graph has a cycle: {nx.find_cycle(graph)}")
    return graph


def _components(graph) -> list[list]:
    """The weakly connected parts, each in node order, in the order of their first node."""
    import networkx as nx

    order = {n: i for i, n in enumerate(graph)}
    parts = [sorted(c, key=order.get) for c in nx.weakly_connected_components(graph)]
    return sorted(parts, key=lambda c: order[c[0]])


def _subgraph(graph, nodes):
    """The graph on `nodes`, in their order (networkx's subgraph views may iterate a set's order)."""
    import networkx as nx

    keep = set(nodes)
    sub = nx.DiGraph()
    sub.add_nodes_from(nodes)
    sub.add_edges_from((u, v) for u, v in graph.edges if u in keep and v in keep)
    return sub


def _layers(graph) -> dict:
    """Longest path from the sources; then every node with successors moves down to just above
    its first successor, so edges stay short."""
    import networkx as nx

    order = list(nx.topological_sort(graph))
    layer: dict = {}
    for n in order:
        layer[n] = max((layer[p] + 1 for p in graph.predecessors(n)), default=0)
    for n in reversed(order):
        below = [layer[s] for s in graph.successors(n)]
        if below:
            layer[n] = min(below) - 1
    return layer


def _repeat_sources(graph, layers: dict, band: dict):
    """Sources are leaves, so drawing one again costs nothing: a source feeding a merge more than
    MAX_SPAN layers below, or in another column (band), gets a copy just above that merge instead
    of a long edge. Returns the new graph, layers and bands."""
    import networkx as nx

    out = nx.DiGraph()
    out.add_nodes_from(graph)
    layers, band = dict(layers), dict(band)
    sources = [n for n in graph if graph.in_degree(n) == 0]
    is_source = set(sources)
    for src, dst in graph.edges:
        if src not in is_source:
            out.add_edge(src, dst)
    for src in sources:
        homes: list = []
        for dst in sorted(graph.successors(src), key=layers.get):
            home = next((h for h in homes if band[h] == band[dst] and 0 < layers[dst] - layers[h] <= MAX_SPAN), None)
            if home is None:
                home = src if not homes else ("copy", src, dst)
                homes.append(home)
                layers[home], band[home] = layers[dst] - 1, band[dst]
            out.add_edge(home, dst)
    return out, layers, band


def _origin(key):
    """The graph node a layout key stands for: a copy for its source, a connector for the node
    its edge comes from."""
    while isinstance(key, tuple) and key[0] in ("copy", "from"):
        key = key[1]
    return key


def _with_lanes(graph, layers: dict, inputs: dict | None = None):
    """The graph with every edge spanning layers cut by one lane per layer it crosses. Edges on a
    merge's main line (its first input, from `inputs`, else its first predecessor) are marked:
    placement follows them."""
    lined = graph.copy()
    chains = {}
    for src, dst in list(graph.edges):
        chain = [src] + [("lane", src, dst, k) for k in range(layers[src] + 1, layers[dst])] + [dst]
        if len(chain) > 2:
            lined.remove_edge(src, dst)
            for lane in chain[1:-1]:
                layers[lane] = lane[3]
            for a, b in zip(chain, chain[1:]):
                lined.add_edge(a, b)
        chains[(src, dst)] = chain
    for a, b in lined.edges:
        first = (inputs or {}).get(_origin(_end(b))) or list(graph.predecessors(_end(b)))
        lined.edges[a, b]["main"] = _origin(_start(a)) == _origin(first[0])
    return lined, chains


def _start(key):
    return key[1] if isinstance(key, tuple) and key[0] == "lane" else key


def _end(key):
    return key[2] if isinstance(key, tuple) and key[0] == "lane" else key


def _rows(graph, layers: dict) -> list[list]:
    if not len(graph):
        return []
    low = min(layers[n] for n in graph)
    rows: list[list] = [[] for _ in range(max(layers[n] for n in graph) - low + 1)]
    for n in graph:
        rows[layers[n] - low].append(n)
    return rows


def _order(graph, rows: list[list], sweeps: int = 8) -> list[list]:
    """Barycentre ordering: sweeps down (each node at the mean slot of its predecessors) and up (of
    its successors); the order with the fewest crossings wins."""
    rows = [row[:] for row in rows]
    best, fewest = [row[:] for row in rows], _crossings(graph, rows)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for i in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            rows[i] = _by_barycentre(graph, rows[i], rows[i - 1] if down else rows[i + 1], down)
        _transpose(graph, rows)
        crossings = _crossings(graph, rows)
        if crossings < fewest:
            best, fewest = [row[:] for row in rows], crossings
    return best


def _by_barycentre(graph, row: list, ref: list, down: bool) -> list:
    """`row` sorted by the mean slot of each node's neighbours in `ref`; a node without any keeps
    its own slot."""
    slot = {n: k for k, n in enumerate(ref)}

    def centre(k: int, n) -> tuple:
        near = [slot[m] for m in (graph.predecessors(n) if down else graph.successors(n)) if m in slot]
        return (sum(near) / len(near) if near else k, k)

    return [n for _, n in sorted(enumerate(row), key=lambda k_n: centre(*k_n))]


def _transpose(graph, rows: list[list]) -> None:
    """Swap neighbours in a row while that removes crossings: the barycentre rule leaves ties
    (a lane and a merge fed by the same node) on whichever side they started."""
    improved = True
    while improved:
        improved = False
        for i, row in enumerate(rows):
            above = {n: k for k, n in enumerate(rows[i - 1])} if i else {}
            below = {n: k for k, n in enumerate(rows[i + 1])} if i + 1 < len(rows) else {}
            for j in range(len(row) - 1):
                a, b = row[j], row[j + 1]
                if _pair_crossings(graph, b, a, above, below) < _pair_crossings(graph, a, b, above, below):
                    row[j], row[j + 1] = b, a
                    improved = True


def _pair_crossings(graph, left, right, above: dict, below: dict) -> int:
    """Crossings between the edges of two neighbours, `left` placed left of `right`."""
    count = 0
    for slot, ends in ((above, graph.predecessors), (below, graph.successors)):
        lefts = [slot[m] for m in ends(left) if m in slot]
        rights = [slot[m] for m in ends(right) if m in slot]
        count += sum(1 for p in lefts for q in rights if p > q)
    return count


def _crossings(graph, rows: list[list]) -> int:
    total = 0
    for upper, lower in zip(rows, rows[1:]):
        below = {n: k for k, n in enumerate(lower)}
        spans = [(k, below[s]) for k, n in enumerate(upper) for s in graph.successors(n) if s in below]
        total += sum(1 for (a, b), (c, d) in combinations(spans, 2) if (a - c) * (b - d) < 0)
    return total
