"""One column of the merge DAG in inches (y downwards): the boxes sized by a text measurer (a
merge, a model, a block of one merge's many sources, a note), each layer packed left to right
near where its neighbours want it, rows stacked, and every edge routed between the rows. Also
the sizes and colours render/plots.py draws with. The order comes from render/dag_layers.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mergebuild.render.dag_layers import _order, _origin, _rows, _with_lanes
from mergebuild.render.graph import wrap

DPI = 100  # the renderer text is measured with, and pictures are drawn at
TITLE_SIZE, TEXT_SIZE, SMALL_SIZE = 9.5, 8.0, 7.0  # points
PAD_X, PAD_Y, LINE_GAP = 0.1, 0.07, 0.03  # inside a box
MIN_BOX = 0.8  # the narrowest box's text width
ROW_GAP = 0.45  # between layers, where edges bend
NODE_GAP, LANE_GAP = 0.25, 0.1  # between boxes in a layer; beside an edge passing through one
MARGIN = 0.3
ARROW = 0.09  # arrowhead length
GRID_GAP = 0.1  # between the boxes of a block of one merge's many sources
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


def _letter(index: int) -> str:
    """A, B, C... as the methods name their inputs; past Z, the input's number."""
    return LETTERS[index] if index < len(LETTERS) else str(index + 1)


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
