"""Pictures: a diff's heatmap, and the merge DAG (laid out by render/dag_layout.py), drawn with
matplotlib (no display needed).

matplotlib is imported inside the functions, and only its object API is used (Figure, never
pyplot), so there is no global backend state: PNG goes through Agg, SVG through its own backend.
The DAG is laid out in inches (y downwards) from text sizes the Agg renderer measures, then
drawn 1:1, so boxes fit their labels at any size.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

from mergebuild.render.dag_geometry import (
    DPI, EDGE_COLOUR, LINE_GAP, MARGIN, MAX_PIXELS, PAD_Y, SMALL_SIZE, TEXT_SIZE, TITLE_SIZE, Item, Layout, measurer,
)
from mergebuild.render.dag_layout import COLUMN_GAP, graph_layout
from mergebuild.render.graph import STATE_COLOURS, STATE_LEGEND, TARGET_BORDER

UNKNOWN_COLOUR = "#ffffff"
FORMATS = ("png", "svg")
DOT_FORMATS = ("png", "svg", "pdf")


def plot_diff(diff: dict, path, title: str | None = None) -> Path:
    """Write a heatmap of a diff_files() result to a PNG (or SVG, by suffix): one row per block
    or layer, then one per component below a line; a column each for cosine similarity, relative
    L2 and the share of changed elements. Each column has a fixed scale (DIFF_SCALES: green is
    similar, red different, whatever the other blocks do), its colour bar names the range this
    diff spans, and every cell carries its value where it fits. When the diff says the models
    cannot be compared (its `mismatch`), the picture says that instead."""
    path = Path(path)
    fmt = _format(path, FORMATS)
    rows = list(diff.get("blocks", [])) + [{**c, "name": f"[{c['name']}]"} for c in diff.get("components", [])]
    if diff.get("mismatch"):
        why = "no heatmap: per-block numbers would compare unlike tensors"
        return _plot_message(path, fmt, diff["mismatch"], [*_mismatch_details(diff), why])
    if not rows and diff.get("total", {}).get("cosine") is not None:
        rows = [diff["total"]]
    if not rows:
        return _plot_message(path, fmt, "nothing to compare", _mismatch_details(diff))
    return _plot_heatmap(diff, rows, path, fmt, title)


# --- the diff heatmap ----------------------------------------------------------------------------

# per metric: (key, column title, the scale's (similar, different) ends, colour map); values past
# the different end take its colour
DIFF_SCALES = (
    ("cosine", "cosine similarity", (1.0, 0.9), "similarity"),
    ("rel_l2", "relative L2", (0.0, 0.5), "similarity"),
    ("changed", "changed elements", (0.0, 1.0), "share"),
)
SIMILAR_COLOURS = ("#1a9850", "#91cf60", "#d9ef8b", "#fee08b", "#fc8d59", "#d73027")  # similar .. different
SHARE_COLOURS = ("#f7fbff", "#c6dbef", "#6baed6")  # none .. all changed: light, as 100 % is usual for fine-tunes
MISSING_COLOUR = "#dddddd"
ROW_HEIGHT, MAX_MAP_HEIGHT = 0.24, 16.0  # inches per row; the tallest map (more rows get thinner)


def _plot_heatmap(diff: dict, rows: list[dict], path: Path, fmt: str, title: str | None) -> Path:
    from matplotlib.figure import Figure

    row_h = min(ROW_HEIGHT, MAX_MAP_HEIGHT / len(rows))
    fig = Figure(figsize=(7.2, 2.3 + row_h * len(rows)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(DIFF_SCALES), sharey=True)
    for ax, scale in zip(axes, DIFF_SCALES):
        _heat_column(fig, ax, scale, rows, cells=row_h >= 0.15)
    axes[0].set_yticks(range(len(rows)), [str(r["name"]) for r in rows], fontsize=8 if row_h >= 0.15 else 6)
    axes[0].set_ylabel("blocks" if diff.get("grouping") == "block" else "layers")
    n_blocks = len(diff.get("blocks", []))
    if 0 < n_blocks < len(rows):
        for ax in axes:
            ax.axhline(n_blocks - 0.5, color="black", linewidth=1.5)
    fig.suptitle(title if title is not None else _diff_title(diff), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


def _heat_column(fig, ax, scale: tuple, rows: list[dict], cells: bool) -> None:
    """One metric's column on its absolute scale, with a colour bar below naming this diff's range."""
    from matplotlib.colors import Normalize
    from matplotlib.ticker import PercentFormatter

    key, label, (similar, different), kind = scale
    cmap = _scale_cmap(kind, similar > different)
    norm = Normalize(min(similar, different), max(similar, different))
    values = [row.get(key) for row in rows]
    grid = [[math.nan if v is None or not math.isfinite(v) else v] for v in values]
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if cells:
        for i, value in enumerate(values):
            ax.text(0, i, _cell(key, value), ha="center", va="center", fontsize=7.5, color=_ink(cmap, norm, value))
    ax.set_xticks([])
    ax.set_title(label, fontsize=9)
    extend = "neither" if kind == "share" else "min" if similar > different else "max"
    bar = fig.colorbar(image, ax=ax, location="bottom", extend=extend, shrink=0.9, aspect=12)
    bar.set_label(_range_text(key, values), fontsize=7.5)
    bar.ax.tick_params(labelsize=7)
    if key == "changed":
        bar.ax.xaxis.set_major_formatter(PercentFormatter(1.0))


def _scale_cmap(kind: str, reverse: bool):
    from matplotlib.colors import LinearSegmentedColormap

    if kind == "share":  # how much was touched, not how far: a neutral map
        cmap = LinearSegmentedColormap.from_list("share", SHARE_COLOURS)
    else:
        cmap = LinearSegmentedColormap.from_list("similarity", SIMILAR_COLOURS)
        cmap = cmap.reversed() if reverse else cmap
    return cmap.with_extremes(bad=MISSING_COLOUR)


def _ink(cmap, norm, value) -> str:
    """Black on light cells, white on dark ones."""
    if value is None or not math.isfinite(value):
        return "black"
    r, g, b, _ = cmap(norm(value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _range_text(key: str, values: list) -> str:
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return "this diff: n/a"
    low, high = min(known), max(known)
    return f"this diff: {_cell(key, low)}" + ("" if low == high else f" to {_cell(key, high)}")


def _diff_title(diff: dict) -> str:
    a, b = (Path(str(diff.get(key, key.upper()))).name for key in ("a", "b"))
    arch = (diff.get("architecture") or {}).get("name")
    total = diff.get("total") or {}
    extra = f", total cosine {_cell('cosine', total['cosine'])}" if total.get("cosine") is not None else ""
    return f"{a}  vs  {b}" + (f"  ({arch}{extra})" if arch else "")


def _mismatch_details(diff: dict) -> list[str]:
    lines = []
    for side, key in (("A", "architecture"), ("B", "architecture_b")):
        arch = (diff.get(key) or {}).get("name")
        lines.append(f"{side}: {Path(str(diff.get(side.lower(), '?'))).name}" + (f" ({arch})" if arch else ""))
    counts = [(len(diff.get("only_in_a", [])), "keys only in A"), (len(diff.get("only_in_b", [])), "only in B"),
              (len(diff.get("shape_mismatch", [])), "with other shapes"),
              ((diff.get("total") or {}).get("tensors", 0), "compared")]
    lines.append(", ".join(f"{n} {what}" for n, what in counts))
    return lines


def _plot_message(path: Path, fmt: str, headline: str, details: list[str]) -> Path:
    """A picture that says why there is no heatmap."""
    from matplotlib.figure import Figure

    height = 1.2 + 0.25 * len(details)
    fig = Figure(figsize=(7.2, height), dpi=DPI)
    fig.text(0.5, 1 - 0.35 / height, headline, ha="center", va="top", fontsize=14, fontweight="bold", color="#b2182b")
    for i, line in enumerate(details):
        fig.text(0.5, 1 - (0.95 + 0.25 * i) / height, line, ha="center", va="top", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


def plot_graph(nodes: list[dict], edges, path, title: str | None = None) -> Path:
    """Draw a DAG top to bottom, to PNG or SVG (by suffix): sources above the merges that read
    them, boxes sized to their wrapped labels, edges bending only between layers, a legend of
    every state's colour. A tall DAG is folded into side-by-side columns, unconnected ones stand
    in rows, and a merge's many sources form one block, so no picture is a strip.

    nodes: [{"name", "label" (optional: its first line is the title, the rest details), "state",
    "target" (optional)}], where state is source, up to date, dirty or pending (graph.STATE_COLOURS);
    edges: [(src, dst)], into each node in input order (the first is drawn as its main line).
    Raises ValueError if the edges make a cycle or name an unknown node."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = _format(path, FORMATS)
    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)  # a renderer to measure text with
    measure = measurer(fig)
    layout = graph_layout(nodes, edges, measure)
    legend = _legend_entries(layout)
    legend_w, legend_h, legend_rows = _legend_size(legend, measure, max(layout.width, 3.2))
    head = measure(title, TITLE_SIZE + 1, "bold")[1] + 0.15 if title else 0.0
    head += 0.25 if len(layout.columns) > 1 else 0.0  # the columns' captions
    width = max(layout.width, legend_w) + 2 * MARGIN
    height = MARGIN + head + layout.height + 0.3 + legend_h + MARGIN
    fig.set_size_inches(width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    left = MARGIN + (width - 2 * MARGIN - layout.width) / 2
    ax.set_xlim(-left, width - left)
    ax.set_ylim(height - MARGIN - head, -MARGIN - head)  # y grows downwards, as the layout's
    _draw_layout(ax, layout)
    _draw_legend(ax, legend_rows, -left + MARGIN, layout.height + 0.3)
    if len(layout.columns) > 1:
        _draw_column_captions(ax, layout)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE + 1, fontweight="bold", y=1 - MARGIN / height, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=min(DPI, MAX_PIXELS / max(width, height)))
    return path


# --- drawing it ------------------------------------------------------------------------------------

def _draw_layout(ax, layout: Layout) -> None:
    from matplotlib.patches import PathPatch, Polygon

    for src, dst, letter, path in layout.edges:
        ax.add_patch(PathPatch(path, facecolor="none", edgecolor=EDGE_COLOUR, linewidth=1.1, zorder=1))
        (x, y), top = path.vertices[-1], layout.items[dst].top
        ax.add_patch(Polygon([(x - 0.045, y), (x + 0.045, y), (x, top)], closed=True, color=EDGE_COLOUR, zorder=1))
        if letter:
            ax.text(x + 0.05, top - 0.02, letter, fontsize=6.5, color="#333333", ha="left", va="bottom", zorder=3)
    for item in layout.items.values():
        if item.kind != "lane":
            _draw_item(ax, item)


def _draw_item(ax, item: Item, letter: str = "") -> None:
    from dataclasses import replace

    from matplotlib.patches import FancyBboxPatch

    target = bool(item.node.get("target"))
    note = item.kind in ("connector", "group")
    face = "white" if note else STATE_COLOURS.get(item.node.get("state"), UNKNOWN_COLOUR)
    edge = TARGET_BORDER if target else "#777777" if note else "#444444"
    style = "--" if item.kind in ("copy", "connector", "group") else "-"  # not the thing itself
    ax.add_patch(FancyBboxPatch((item.x - item.w / 2, item.top), item.w, item.h, zorder=2,
                                boxstyle="round,pad=0,rounding_size=0.06", facecolor=face, edgecolor=edge,
                                linewidth=2.6 if target else 0.9, linestyle=style))
    if item.kind == "connector":
        ax.text(item.x, item.y, item.text, fontsize=SMALL_SIZE, style="italic", ha="center", va="center", zorder=3)
        return
    if item.kind == "group":
        ax.text(item.x, item.top + PAD_Y, item.text, fontsize=SMALL_SIZE, style="italic", ha="center", va="top",
                zorder=3)
        for member, name in item.members:
            _draw_item(ax, replace(member, x=item.x + member.x, y=item.y + member.y), name)
        return
    if letter:  # which input of the merge it is, at the box's corner
        ax.text(item.x - item.w / 2 + 0.05, item.top + 0.04, letter, fontsize=6.5, color="#333333", ha="left",
                va="top", zorder=3)
    ax.text(item.x, item.top + PAD_Y, item.title, fontsize=TITLE_SIZE, fontweight="bold", ha="center", va="top", zorder=3)
    if item.text:
        ax.text(item.x, item.top + PAD_Y + item.title_h + LINE_GAP, item.text, fontsize=TEXT_SIZE, ha="center",
                va="top", multialignment="center", linespacing=1.25, zorder=3)


def _draw_column_captions(ax, layout: Layout) -> None:
    for k, (left, right) in enumerate(layout.columns):
        ax.text((left + right) / 2, -0.12, f"column {k + 1}", fontsize=SMALL_SIZE, color="#666666", ha="center",
                va="bottom")
        if k:
            x = left - COLUMN_GAP / 2
            ax.plot([x, x], [-0.1, layout.height], color="#cccccc", linewidth=0.8, linestyle=":")


def _legend_entries(layout: Layout) -> list[tuple]:
    """(label, face colour, edge colour, line width, line style): every state, a target, and a
    repeated source or a column note when the picture has one."""
    entries = [(STATE_LEGEND[s], c, "#444444", 0.9, "-") for s, c in STATE_COLOURS.items()]
    entries.append(("target (writes a file)", "white", TARGET_BORDER, 2.6, "-"))
    kinds = {item.kind for item in layout.items.values()}
    if "copy" in kinds:
        entries.append(("source drawn again", STATE_COLOURS["source"], "#444444", 0.9, "--"))
    return entries


def _legend_size(entries: list[tuple], measure, width: float) -> tuple[float, float, list]:
    """Entries in rows no wider than `width`: (widest row, height, rows of (x, entry))."""
    rows: list[list] = [[]]
    x = widest = 0.0
    for entry in entries:
        w = 0.32 + measure(entry[0], TEXT_SIZE)[0]
        if x and x + w > width:
            rows.append([])
            x = 0.0
        rows[-1].append((x, entry))
        x += w + 0.25
        widest = max(widest, x - 0.25)
    return widest, 0.26 * len(rows), rows


def _draw_legend(ax, rows: list, left: float, top: float) -> None:
    from matplotlib.patches import FancyBboxPatch

    for r, row in enumerate(rows):
        y = top + 0.26 * r + 0.13
        for x, (label, face, edge, width, style) in row:
            ax.add_patch(FancyBboxPatch((left + x, y - 0.08), 0.24, 0.16, boxstyle="round,pad=0,rounding_size=0.03",
                                        facecolor=face, edgecolor=edge, linewidth=width, linestyle=style))
            ax.text(left + x + 0.32, y, label, fontsize=TEXT_SIZE, ha="left", va="center")


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


def _cell(key: str, value) -> str:
    if value is None:
        return "n/a"
    if key == "cosine":
        return "1" if value == 1.0 else f"{value:.6f}"
    if key == "changed":
        return f"{100 * value:.1f}%"
    return f"{value:.3g}"
