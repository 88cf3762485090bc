"""Pictures: a diff's heatmap, and the merge DAG, drawn with matplotlib (no display needed).

matplotlib is imported inside the functions, and only its object API is used (Figure, never
pyplot), so there is no global backend state: PNG goes through Agg, SVG through its own backend.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

STATE_COLOURS = {
    "cached": "#7fc97f",   # green
    "dirty": "#fdae61",    # orange
    "pending": "#ffe066",  # yellow
    "source": "#bdbdbd",   # grey
}
UNKNOWN_COLOUR = "#ffffff"
FORMATS = ("png", "svg")
DOT_FORMATS = ("png", "svg", "pdf")

_COLUMNS = (("cosine", "cosine"), ("rel_l2", "relative L2"), ("changed", "changed"))


def plot_diff(diff: dict, path, title: str | None = None) -> Path:
    """Write a heatmap of a diff_files() result to a PNG (or SVG, by suffix): one row per block
    or layer, then one per component below a line; columns cosine, relative L2 and the share of
    changed elements. Each column has its own colour scale (darker = more different) and every
    cell carries its value."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = _format(path, FORMATS)
    rows = list(diff.get("blocks", [])) + [{**c, "name": f"[{c['name']}]"} for c in diff.get("components", [])]
    if not rows:
        rows = [diff["total"]]
    n_blocks = len(diff.get("blocks", []))
    values = [[_distance(key, row.get(key)) for key, _ in _COLUMNS] for row in rows]
    # normalise each column on its own: cosine shows 1 - cosine, the others as they are
    scaled = []
    for j in range(len(_COLUMNS)):
        column = [v[j] for v in values if v[j] is not None and math.isfinite(v[j])]
        top = max(column, default=0.0) or 1.0
        scaled.append([None if v[j] is None or not math.isfinite(v[j]) else v[j] / top for v in values])
    grid = [[math.nan if scaled[j][i] is None else scaled[j][i] for j in range(len(_COLUMNS))] for i in range(len(rows))]

    height = 1.6 + 0.28 * len(rows)
    fig = Figure(figsize=(6.4, max(3.0, height)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = _cmap("YlOrRd")
    image = ax.imshow(grid, cmap=cmap, norm=Normalize(0.0, 1.0), aspect="auto", interpolation="nearest")
    for i, row in enumerate(rows):
        for j, (key, _) in enumerate(_COLUMNS):
            text = _cell(key, row.get(key))
            s = scaled[j][i]
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                    color="white" if s is not None and s > 0.6 else "black")
    ax.set_xticks(range(len(_COLUMNS)), [label for _, label in _COLUMNS])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), [str(r["name"]) for r in rows], fontsize=8)
    if 0 < n_blocks < len(rows):
        ax.axhline(n_blocks - 0.5, color="black", linewidth=1.5)
    ax.set_ylabel("blocks" if diff.get("grouping") == "block" else "layers")
    fig.colorbar(image, ax=ax, shrink=0.6, label="difference, relative to the column's largest")
    if title is None:
        title = f"{Path(str(diff.get('a', 'A'))).name}  vs  {Path(str(diff.get('b', 'B'))).name}"
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


def plot_graph(nodes: list[dict], edges, path, title: str | None = None) -> Path:
    """Draw a DAG left to right, one column per topological generation, to PNG or SVG (by suffix).

    nodes: [{"name", "label" (optional, may hold newlines), "state"}], where state is one of
    cached (green), dirty (orange), pending (yellow), source (grey); edges: [(src, dst)].
    Raises ValueError if the edges make a cycle or name an unknown node."""
    import networkx as nx
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    fmt = _format(path, FORMATS)
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
    pos = layered_layout(graph)
    columns = max((x for x, _ in pos.values()), default=0) + 1
    rows = max((sum(1 for x2, _ in pos.values() if x2 == x) for x, _ in pos.values()), default=1)
    info = {n["name"]: n for n in nodes}
    longest = max((max(map(len, str(n.get("label") or n["name"]).splitlines() or [""])) for n in nodes), default=8)
    col_width = max(2.2, 0.085 * longest + 0.8)
    fig = Figure(figsize=(max(4.0, col_width * columns + 0.5), max(2.5, 1.1 * rows + 1.3)), dpi=100)
    ax = fig.add_axes((0.02, 0.1, 0.96, 0.8))
    ax.set_axis_off()
    ax.set_xlim(-0.6, columns - 0.4)
    ax.set_ylim(-(rows - 1) / 2 - 0.6, (rows - 1) / 2 + 0.6)
    boxes = {}
    for name, (x, y) in pos.items():
        node = info[name]
        colour = STATE_COLOURS.get(node.get("state"), UNKNOWN_COLOUR)
        boxes[name] = ax.text(x, y, str(node.get("label") or name), ha="center", va="center", fontsize=8,
                              zorder=3, bbox={"boxstyle": "round,pad=0.4", "facecolor": colour, "edgecolor": "#444444"})
    for src, dst in graph.edges:
        ax.annotate("", xy=pos[dst], xytext=pos[src], zorder=4,  # after the boxes: clipped to their drawn size
                    arrowprops={"arrowstyle": "-|>", "color": "#555555", "shrinkA": 2, "shrinkB": 2,
                                "patchA": boxes[src].get_bbox_patch(), "patchB": boxes[dst].get_bbox_patch(),
                                "connectionstyle": "arc3,rad=0.0"})
    used = [s for s in STATE_COLOURS if any(n.get("state") == s for n in nodes)]
    if used:
        fig.legend(handles=[Patch(facecolor=STATE_COLOURS[s], edgecolor="#444444", label=s) for s in used],
                   loc="lower center", ncol=len(used), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


def layered_layout(graph) -> dict:
    """{node: (x, y)}: x is the node's topological generation, y spreads each generation around
    0, ordered by the mean y of its predecessors (the barycentre rule: fewer crossings)."""
    import networkx as nx

    pos: dict = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for x, generation in enumerate(nx.topological_generations(graph)):
        def barycentre(n):
            ys = [pos[p][1] for p in graph.predecessors(n)]
            return (-sum(ys) / len(ys) if ys else 0.0, order[n])
        generation = sorted(generation, key=barycentre if x else order.get)
        middle = (len(generation) - 1) / 2
        for i, n in enumerate(generation):
            pos[n] = (x, middle - i)
    return pos


def render_dot(dot_text: str, path) -> bool:
    """Render Graphviz dot text to `path` (format by suffix: png, svg, pdf) with the `dot`
    binary. False when `dot` is not installed; RuntimeError when it fails."""
    path = Path(path)
    fmt = _format(path, DOT_FORMATS)
    dot = shutil.which("dot")
    if dot is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=dot_text.encode(), capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"dot failed: {e}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"dot exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    return True


def _format(path: Path, allowed) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in allowed:
        raise ValueError(f"{path}: unsupported picture format {path.suffix or '(none)'!r}; use {', '.join('.' + f for f in allowed)}")
    return fmt


def _distance(key: str, value):
    if value is None:
        return None
    return 1.0 - value if key == "cosine" else value


def _cell(key: str, value) -> str:
    if value is None:
        return "n/a"
    if key == "cosine":
        return "1" if value == 1.0 else f"{value:.6f}"
    if key == "changed":
        return f"{100 * value:.1f}%"
    return f"{value:.3g}"


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#dddddd")
