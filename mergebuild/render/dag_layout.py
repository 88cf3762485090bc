"""The merge DAG laid out for drawing: each connected part laid out as one column
(render/dag_geometry.py), a tall one folded into side-by-side columns joined by notes, unconnected
parts shelved in rows, a merge's many sources contracted into one block. Pure geometry in
inches (y downwards); render/plots.py draws the result with matplotlib.
"""

from __future__ import annotations

import bisect
import math

from mergebuild.render.dag_geometry import DPI, ROW_GAP, Layout, _add_copies, _connector_item, _items, _place, measurer
from mergebuild.render.dag_layers import _components, _dag, _layers, _repeat_sources, _subgraph

COLUMN_GAP = 0.7  # between the columns of a folded picture
MAX_FAN = 6  # a merge reading more sources than this, each read by it alone, shows them as one block
FOLD_HEIGHT, FOLD_ASPECT = 18.0, 2.5  # taller than this, and this many times taller than wide: fold


def graph_layout(nodes: list[dict], edges, measure=None) -> Layout:
    """Where plot_graph puts every box and edge. measure(text, points, weight, style) -> (w, h)
    in inches; by default matplotlib's Agg renderer measures."""
    graph = _dag(nodes, edges)
    if measure is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(dpi=DPI)
        FigureCanvasAgg(fig)
        measure = measurer(fig)
    inputs: dict[str, list] = {}
    for src, dst in edges:
        inputs.setdefault(dst, []).append(src)
    info = {n["name"]: n for n in nodes}
    components = _components(graph)
    # one DAG may fold into columns; unconnected ones stand side by side instead
    parts = [_component_layout(_subgraph(graph, c), info, inputs, measure, fold=len(components) == 1)
             for c in components]
    return parts[0] if len(parts) == 1 else _shelves(parts)


def _component_layout(graph, info: dict, inputs: dict, measure, fold: bool) -> Layout:
    groups = _group_fan_ins(graph, inputs)
    layers = _layers(graph)
    graph, layers, _ = _repeat_sources(graph, layers, dict.fromkeys(graph, 0))
    items = _items(graph, info, measure, groups, inputs)
    layout = _place(graph, layers, items, inputs)
    columns = _columns(layout, max(layers.values(), default=0) + 1)
    if fold and columns > 1:
        layout = _fold(graph, layers, items, inputs, columns, measure)
    return layout


def _group_fan_ins(graph, inputs: dict) -> dict:
    """Contract the many sources of a wide merge (a soup of 30 models), each read by it alone,
    into one block node: a row of 30 boxes would be a strip. {block key: its sources}."""
    groups = {}
    for dst in list(graph):
        leaves = [u for u in dict.fromkeys(inputs.get(dst, []))
                  if u in graph and graph.in_degree(u) == 0 and graph.out_degree(u) == 1]
        if len(leaves) > MAX_FAN:
            graph.remove_nodes_from(leaves)
            graph.add_edge(("group", dst), dst)
            groups[("group", dst)] = leaves
    return groups


def _columns(layout: Layout, depth: int) -> int:
    """How many columns to fold a layout into: 1 unless it is tall and narrow; then enough to
    come near a portrait page."""
    if layout.height <= FOLD_HEIGHT or layout.height <= FOLD_ASPECT * layout.width:
        return 1
    return max(1, min(depth // 3, math.ceil(math.sqrt(layout.height / (1.4 * layout.width)))))


def _fold(graph, layers: dict, items: dict, inputs: dict, columns: int, measure) -> Layout:
    """The layers cut into `columns` runs laid side by side: an edge to a later column ends at a
    "to X (column n)" note and comes back as "from Y (column m)" above its merge; sources are
    drawn again in the column that reads them."""
    depth = max(layers.values()) + 1
    cuts = [round(depth * k / columns) for k in range(1, columns)]
    band = {n: bisect.bisect_right(cuts, layers[n]) for n in graph}
    graph, layers, band = _repeat_sources(graph, layers, band)
    items = dict(items)
    _add_copies(graph, items)
    parts = []
    for b in range(columns):
        sub = _subgraph(graph, [n for n in graph if band[n] == b])
        sub_layers = {n: layers[n] for n in sub}
        _connect(graph, sub, sub_layers, band, b, items, measure)
        parts.append(_place(sub, sub_layers, items, inputs))
    return _side_by_side(parts)


def _connect(graph, sub, layers: dict, band: dict, b: int, items: dict, measure) -> None:
    """Add column b's notes for edges that cross columns: one "to" note per node and later
    column, one "from" note per edge coming in."""
    going: dict = {}
    for src, dst in graph.edges:
        if band[src] == b < band[dst]:
            going.setdefault(("to", src, band[dst]), []).append(dst)
        elif band[dst] == b > band[src]:
            key = ("from", src, dst)
            items[key] = _connector_item(f"from {src} (column {band[src] + 1})", measure)
            sub.add_edge(key, dst)
            layers[key] = layers[dst] - 1
    for key, dsts in going.items():
        items[key] = _connector_item(f"to {', '.join(map(str, dsts))} (column {key[2] + 1})", measure)
        sub.add_edge(key[1], key)
        layers[key] = layers[key[1]] + 1


def _side_by_side(parts: list[Layout]) -> Layout:
    items, routes, columns, left = {}, [], [], 0.0
    for part in parts:
        _shift(part, left, 0.0)
        routes += part.edges
        items.update(part.items)
        columns.append((left, left + part.width))
        left += part.width + COLUMN_GAP
    return Layout(items, routes, left - COLUMN_GAP, max(p.height for p in parts), columns)


def _shelves(parts: list[Layout]) -> Layout:
    """Unconnected layouts left to right, wrapped into rows about as wide as a 4:3 page of their
    area, gaps included (the widest one sets the least)."""
    area = sum((p.width + COLUMN_GAP) * (p.height + 2 * ROW_GAP) for p in parts)
    limit = max(max(p.width for p in parts), math.sqrt(area * 4 / 3))
    items, routes, x, y, shelf = {}, [], 0.0, 0.0, 0.0
    width = 0.0
    for part in parts:
        if x and x + part.width > limit:
            x, y, shelf = 0.0, y + shelf + 2 * ROW_GAP, 0.0
        _shift(part, x, y)
        items.update(part.items)
        routes += part.edges
        width, shelf = max(width, x + part.width), max(shelf, part.height)
        x += part.width + COLUMN_GAP
    return Layout(items, routes, width, y + shelf)


def _shift(part: Layout, dx: float, dy: float) -> None:
    from matplotlib.path import Path as MPath

    for item in part.items.values():
        item.x += dx
        item.y += dy
    part.edges = [(s, d, letter, MPath(path.vertices + (dx, dy), path.codes)) for s, d, letter, path in part.edges]
