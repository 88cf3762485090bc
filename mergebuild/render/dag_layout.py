"""The merge DAG laid out for drawing: layers top to bottom, boxes sized by a text measurer,
crossings reduced, edges routed between layers, tall DAGs folded into columns. Pure geometry
in inches (y downwards); render/plots.py draws the result with matplotlib.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from itertools import combinations

from mergebuild.render.graph import wrap

DPI = 100  # the renderer text is measured with, and pictures are drawn at

TITLE_SIZE, TEXT_SIZE, SMALL_SIZE = 9.5, 8.0, 7.0  # points
PAD_X, PAD_Y, LINE_GAP = 0.1, 0.07, 0.03  # inside a box
MIN_BOX = 0.8  # the narrowest box's text width
ROW_GAP = 0.45  # between layers, where edges bend
NODE_GAP, LANE_GAP = 0.25, 0.1  # between boxes in a layer; beside an edge passing through one
COLUMN_GAP = 0.7  # between the columns of a folded picture
MARGIN = 0.3
ARROW = 0.09  # arrowhead length
MAX_SPAN = 3  # a source feeding a merge more layers below than this is drawn again beside it
MAX_FAN = 6  # a merge reading more sources than this, each read by it alone, shows them as one block
GRID_GAP = 0.1  # between the boxes of such a block
FOLD_HEIGHT, FOLD_ASPECT = 18.0, 2.5  # taller than this, and this many times taller than wide: fold
MAX_PIXELS = 16000  # per side; a bigger picture gets a lower dpi
EDGE_COLOUR = "#555555"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Item:
    """One thing in a layer: a merge ("node"), a model ("source"), a source drawn again near
    another use ("copy"), the point where an edge crosses a layer ("lane"), a note that an edge
    goes on in another column ("connector"), or a block of one merge's many sources ("group")."""

    kind: str
    node: dict = field(default_factory=dict)
    title: str = ""
    text: str = ""
    title_h: float = 0.0
    w: float = 0.0
    h: float = 0.0
    x: float = 0.0  # centre
    y: float = 0.0  # centre
    members: list = field(default_factory=list)  # a group's (item placed relative to its centre, letter)

    @property
    def top(self) -> float:
        return self.y - self.h / 2

    @property
    def bottom(self) -> float:
        return self.y + self.h / 2

    @property
    def weight(self) -> float:
        """How firmly it keeps its wanted place when a layer is packed: a merge all but fixes it
        (so a chain of merges stays one straight line), a lane nearly (long edges stay straight),
        sources and notes move aside."""
        return {"node": 100.0, "lane": 10.0}.get(self.kind, 1.0)


@dataclass
class Layout:
    items: dict  # key -> Item; keys are node names, tuples for copies, lanes and connectors
    edges: list  # (source key, destination key, input letter or "", matplotlib Path)
    width: float
    height: float
    columns: list = field(default_factory=list)  # folded: each column's (left, right)


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


def _items(graph, info: dict, measure, groups: dict, inputs: dict) -> dict:
    items = {}
    for key in graph:
        if key in groups:
            names = inputs[key[1]]
            members = [(_node_item(info[m], measure, "source"), _letter(names.index(m))) for m in groups[key]]
            items[key] = _group_item(key[1], members, measure)
        elif not isinstance(key, tuple):
            items[key] = _node_item(info[key], measure, "node" if graph.in_degree(key) else "source")
    _add_copies(graph, items)
    return items


def _group_item(dst: str, members: list, measure) -> Item:
    """A framed grid of boxes, about twice as wide as tall, each box placed relative to the centre."""
    columns = math.ceil(math.sqrt(2 * len(members)))
    rows = math.ceil(len(members) / columns)
    cell_w, cell_h = max(m.w for m, _ in members), max(m.h for m, _ in members)
    caption = f"{len(members)} inputs of {dst}"
    caption_h = measure(caption, SMALL_SIZE, "normal", "italic")[1]
    w = columns * cell_w + (columns - 1) * GRID_GAP + 2 * PAD_X
    h = caption_h + LINE_GAP + rows * cell_h + (rows - 1) * GRID_GAP + 2 * PAD_Y
    for k, (member, _) in enumerate(members):
        row, column = divmod(k, columns)
        member.x = -w / 2 + PAD_X + column * (cell_w + GRID_GAP) + cell_w / 2
        member.y = -h / 2 + PAD_Y + caption_h + LINE_GAP + row * (cell_h + GRID_GAP) + cell_h / 2
    return Item("group", {}, "", caption, caption_h, w, h, members=members)


def _add_copies(graph, items: dict) -> None:
    """A copy's item: its source's box, drawn dashed."""
    for key in graph:
        if key not in items:
            origin = items[_origin(key)]
            items[key] = Item("copy", origin.node, origin.title, origin.text, origin.title_h, origin.w, origin.h)


def _node_item(node: dict, measure, kind: str) -> Item:
    lines = str(node.get("label") or node["name"]).splitlines() or [str(node["name"])]
    text = "\n".join(part for line in lines[1:] for part in wrap(line))
    tw, th = measure(lines[0], TITLE_SIZE, "bold")
    dw, dh = measure(text, TEXT_SIZE)
    height = th + (LINE_GAP + dh if text else 0.0) + 2 * PAD_Y
    return Item(kind, node, lines[0], text, th, max(MIN_BOX, tw, dw) + 2 * PAD_X, height)


def _connector_item(text: str, measure) -> Item:
    w, h = measure(text, SMALL_SIZE, "normal", "italic")
    return Item("connector", {}, "", text, 0.0, w + 2 * PAD_X, h + 2 * PAD_Y)


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


def _place(graph, layers: dict, items: dict, inputs: dict) -> Layout:
    """One column: lanes, order, x by weighted sweeps, y by rows, then each edge's route."""
    layers = {n: layers[n] for n in graph}
    lined, chains = _with_lanes(graph, layers, inputs)
    items = {n: items[n] for n in graph} | {n: Item("lane") for n in lined if n not in graph}
    rows = _order(lined, _rows(lined, layers))
    _set_x(lined, rows, items)
    tops, bottoms = _set_y(rows, items)
    row_of = {n: i for i, row in enumerate(rows) for n in row}
    ports = _ports(lined, items)
    routes = []
    for (src, dst), chain in chains.items():
        names = inputs.get(_origin(dst), [])
        letter = _letter(names.index(_origin(src))) if len(names) > 1 and _origin(src) in names else ""
        routes.append((src, dst, letter, _route(chain, items, row_of, tops, bottoms, ports)))
    width = max((it.x + it.w / 2 for it in items.values()), default=0.0)
    return Layout(items, routes, width, bottoms[-1] if bottoms else 0.0)


def _letter(index: int) -> str:
    """A, B, C... as the methods name their inputs; past Z, the input's number."""
    return LETTERS[index] if index < len(LETTERS) else str(index + 1)


def _set_x(graph, rows: list[list], items: dict, sweeps: int = 9) -> None:
    """Each layer packed as near as its widths allow to where its neighbours in the layer just
    placed want it, sweeping down and up; the last sweep goes down, so main lines end straight."""
    for row in rows:
        _pack(row, {n: 0.0 for n in row}, items)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for i in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            want = {n: _wanted_x(graph, n, items, down) for n in rows[i]}
            _pack(rows[i], want, items)
    left = min((it.x - it.w / 2 for it in items.values()), default=0.0)
    for it in items.values():
        it.x -= left


def _wanted_x(graph, n, items: dict, down: bool) -> float:
    """Going down: straight under the main-line predecessor (else the predecessors' mean); going
    up: the successors' mean, main lines counting most; no neighbours: where it is."""
    if down:
        near = [m for m in graph.predecessors(n) if graph.edges[m, n]["main"]] or list(graph.predecessors(n))
        weights = [1.0] * len(near)
    else:
        near = list(graph.successors(n))
        weights = [1.0 if graph.edges[n, m]["main"] else 0.3 for m in near]
    if not near:
        return items[n].x
    return sum(items[m].x * w for m, w in zip(near, weights)) / sum(weights)


def _pack(row: list, want: dict, items: dict) -> None:
    """Set x in row order as close to `want` as the gaps allow: least squares, weighted by
    items' weights, under x[i+1] - x[i] >= the gap they need (pool adjacent violators)."""
    offsets = [0.0]
    for a, b in zip(row, row[1:]):
        gap = LANE_GAP if "lane" in (items[a].kind, items[b].kind) else NODE_GAP
        offsets.append(offsets[-1] + (items[a].w + items[b].w) / 2 + gap)
    fitted = _isotonic([want[n] - o for n, o in zip(row, offsets)], [items[n].weight for n in row])
    for n, f, o in zip(row, fitted, offsets):
        items[n].x = f + o


def _isotonic(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence nearest `values` in weighted least squares."""
    blocks: list[list] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [m for m, _, c in blocks for _ in range(c)]


def _set_y(rows: list[list], items: dict) -> tuple[list[float], list[float]]:
    """Rows as tall as their tallest box, boxes centred in them; (tops, bottoms) of the rows."""
    tops, bottoms, y = [], [], 0.0
    for row in rows:
        height = max((items[n].h for n in row), default=0.0) or 0.1  # only lanes: a short pass
        for n in row:
            items[n].y = y + height / 2
        tops.append(y)
        bottoms.append(y + height)
        y += height + ROW_GAP
    return tops, bottoms


def _ports(graph, items: dict) -> dict:
    """Where each edge leaves the bottom of its box and enters the top of the next, spread
    along the box's width in the order of the other ends (fewer crossings at the box)."""
    ports = {}
    for n, item in items.items():
        for out, ends in ((True, list(graph.successors(n))), (False, list(graph.predecessors(n)))):
            ends.sort(key=lambda m: items[m].x)
            step = min(0.16, max(0.0, item.w - 0.3) / max(len(ends) - 1, 1))
            for k, m in enumerate(ends):
                ports[(n, m) if out else (m, n), out] = item.x + (k - (len(ends) - 1) / 2) * step
    return ports


def _route(chain: list, items: dict, row_of: dict, tops: list, bottoms: list, ports: dict):
    """An edge's path: straight down out of its box to the bottom of its row, an S-bend in the
    gap to the next row (the gap holds no box), straight through a row at a lane, and so on,
    ending an arrow's length above the destination's box."""
    from matplotlib.path import Path as MPath

    x = ports[(chain[0], chain[1]), True]
    verts, codes = [(x, items[chain[0]].bottom)], [MPath.MOVETO]
    for prev, here in zip(chain, chain[1:]):
        y0, y1 = bottoms[row_of[prev]], tops[row_of[here]]
        if verts[-1][1] < y0:
            verts.append((x, y0))
            codes.append(MPath.LINETO)
        target = ports[(prev, here), False]
        stop = items[here].top - ARROW if here == chain[-1] else y1
        end = min(y1, stop)
        middle = (y0 + end) / 2
        verts += [(x, middle), (target, middle), (target, end)]
        codes += [MPath.CURVE4] * 3
        if end < stop:
            verts.append((target, stop))
            codes.append(MPath.LINETO)
        x = target
    return MPath(verts, codes)


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


def measurer(fig):
    """measure(text, points, weight, style) -> (width, height) in inches, by fig's renderer."""
    renderer = fig.canvas.get_renderer()

    def measure(text: str, size: float, weight: str = "normal", style: str = "normal") -> tuple[float, float]:
        if not text:
            return 0.0, 0.0
        probe = fig.text(0, 0, text, fontsize=size, fontweight=weight, fontstyle=style)
        box = probe.get_window_extent(renderer)
        probe.remove()
        return box.width / fig.dpi, box.height / fig.dpi

    return measure
