"""`mergebuild report`: one self-contained HTML page for a project, from what builds recorded.

It reads the Mergefile, the cache's index (each merge's last run, with the statistics the build
recorded by block) and the headers of the outputs (their lineage): never a model's tensors, so
it is fast whatever their size. No script, no network: inline CSS and SVG only.
"""

from __future__ import annotations

import datetime
import html
import math
from pathlib import Path

from mergebuild import __version__
from mergebuild.layouts.blocks import PRESETS, architectures, block_values
from mergebuild.mergefile.model import Mergefile
from mergebuild.planning.recipe import params_text, rule_text
from mergebuild.render.graph import lineage_details

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin: 1.4em 0 .3em; } code, .mono { font-family: ui-monospace, monospace; font-size: 12.5px; }
.meta { color: #666; } .card { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; margin: 1em 0; }
.target { border-color: #4a7ebb; box-shadow: 0 0 0 1px #4a7ebb inset; }
.scroll { overflow-x: auto; } table.heat { border-collapse: collapse; margin: .4em 0; }
table.heat td, table.heat th { border: 1px solid #fff; padding: 2px 3px; font-size: 10.5px; text-align: center;
  min-width: 2.4em; } table.heat th { background: #f3f3f3; }
table.kv td { padding: 1px 10px 1px 0; vertical-align: top; } ul.tree { list-style: none; padding-left: 1.2em; }
ul.tree li::before { content: "\\2514\\2500 "; color: #aaa; } .dag svg { max-width: 100%; height: auto; }
.legend span { display: inline-block; width: 1.1em; height: .9em; vertical-align: middle; margin: 0 .2em 0 .8em; }
"""
HEAT_MAX = 0.5  # relative L2 at which a cell is fully red: an absolute scale, the same for every table


def write_report(mf: Mergefile, runs: dict[str, dict], usage: dict[str, int], limit: int, path: Path,
                 dag_svg: str | None = None) -> Path:
    """Write the report to `path`; runs: per merge, its last run as the index records it."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(mf.path.name)} - mergebuild"
             f"</title><style>{CSS}</style></head><body>", _header(mf, runs, usage, limit)]
    if dag_svg:
        parts.append(f"<h2>The lineage</h2><div class=dag>{dag_svg}</div>")
    parts.append("<h2>Merges</h2>")
    parts += [_merge(mf, name, runs.get(name)) for name in mf.merges]
    outputs = [(n, m.output) for n, m in mf.merges.items() if m.output is not None]
    if outputs:
        parts.append("<h2>Outputs and how they were made</h2>")
        parts += [_output(name, out) for name, out in outputs]
    parts.append(f"<p class=meta>mergebuild {__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}</p></body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _e(text) -> str:
    return html.escape(str(text))


def _header(mf: Mergefile, runs: dict, usage: dict, limit: int) -> str:
    total = sum(usage.values())
    built = [r["finished"] for r in runs.values() if r.get("finished")]
    last = datetime.datetime.fromtimestamp(max(built)).strftime("%Y-%m-%d %H:%M") if built else "never"
    kinds = ", ".join(f"{k} {_bytes(v)}" for k, v in usage.items() if v)
    return (f"<h1>{_e(mf.path.name)}</h1><p class=meta>{_e(mf.path)}</p>"
            f"<table class=kv><tr><td>models</td><td>{len(mf.models)}</td></tr>"
            f"<tr><td>merges</td><td>{len(mf.merges)} ({len(mf.targets)} with an output)</td></tr>"
            f"<tr><td>last build</td><td>{last}</td></tr>"
            f"<tr><td>cache</td><td>{_bytes(total)} of {_bytes(limit)} ({_e(kinds) or 'empty'})</td></tr></table>")


def _merge(mf: Mergefile, name: str, run: dict | None) -> str:
    spec = mf.merges[name]
    target = spec.output is not None
    rows = [("method", f"<code>{_e(spec.method)}</code>"), ("inputs", _e(", ".join(spec.inputs)))]
    if spec.params:
        rows.append(("parameters", f"<code>{_e(params_text(spec.params))}</code>"))
    if spec.rules:
        rows.append(("rules", "<br>".join(f"<code>{_e(_rule_text(r))}</code>" for r in spec.rules)))
    for field in ("dtype", "discard"):
        if getattr(spec, field):
            rows.append((field, f"<code>{_e(getattr(spec, field))}</code>"))
    if target:
        rows.append(("output", f"<code>{_e(_relative(spec.output, mf.path.parent))}</code>"))
    rows.append(("last build", _e(_run_text(run))))
    body = "<table class=kv>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"
    arch = architectures().get((run or {}).get("architecture", ""))
    curves = [_curve(p, v, arch) for p, v in spec.params.items() if _varies(v) and arch is not None and arch.blocks]
    body += "".join(c for c in curves if c)
    if run and run.get("blocks"):
        body += _heatmap(run["blocks"], arch, list(spec.inputs))
    return f"<div class='card{' target' if target else ''}' id='merge-{_e(name)}'><h3>{_e(name)}</h3>{body}</div>"


def _rule_text(rule) -> str:
    return rule_text({"blocks": rule.blocks, "match": rule.match, "regex": rule.regex, "not": rule.negate,
                      **rule.params})


def _run_text(run: dict | None) -> str:
    if not run:
        return "not built yet"
    when = datetime.datetime.fromtimestamp(run["finished"]).strftime("%Y-%m-%d %H:%M") if run.get("finished") else ""
    return (f"{when}: {run['computed']} of {run['tensors']} tensors computed, {run['reused']} reused, "
            f"{run['seconds']:.2f} s" + (", output written" if run.get("written") else ""))


def _varies(value) -> bool:
    return isinstance(value, (list, dict, str)) and not (isinstance(value, dict) and "gradient" in value)


def _curve(param: str, value, arch) -> str:
    """A parameter's value per block as a line over the blocks: what supermerger users see as
    sliders."""
    by_block = _per_block(value, arch)
    if not by_block:
        return ""
    blocks = list(arch.blocks)
    values = [by_block.get(b) for b in blocks]
    known = [v for v in values if isinstance(v, (int, float))]
    if not known:
        return ""
    lo, hi = min(min(known), 0.0), max(max(known), 1.0)
    w, h, pad = max(360, 22 * len(blocks)), 150, 28
    x = lambda i: pad + i * (w - 2 * pad) / max(len(blocks) - 1, 1)  # noqa: E731
    y = lambda v: h - pad - (v - lo) / (hi - lo or 1) * (h - 2 * pad)  # noqa: E731
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if isinstance(v, (int, float)))
    dots = "".join(f"<circle cx={x(i):.1f} cy={y(v):.1f} r=3><title>{_e(b)}: {v:g}</title></circle>"
                   for i, (b, v) in enumerate(zip(blocks, values)) if isinstance(v, (int, float)))
    every = max(1, math.ceil(len(blocks) / 13))
    labels = "".join(f"<text x={x(i):.1f} y={h - 6} font-size=9 text-anchor=middle>{_e(b)}</text>"
                     for i, b in enumerate(blocks) if i % every == 0)
    axis = (f"<text x=2 y={y(hi) + 4:.1f} font-size=9>{hi:g}</text><text x=2 y={y(lo) + 4:.1f} font-size=9>{lo:g}</text>"
            f"<line x1={pad} x2={w - pad} y1={y(lo):.1f} y2={y(lo):.1f} stroke=#ccc />")
    return (f"<div class=curve><b>{_e(param)}</b> by block<br><svg width={w} height={h} viewBox='0 0 {w} {h}' "
            f"role=img aria-label='{_e(param)} by block'>{axis}<polyline points='{points}' fill=none stroke=#4a7ebb "
            f"stroke-width=2 />{dots}{labels}</svg></div>")


def _per_block(value, arch) -> dict:
    if isinstance(value, str):
        value = PRESETS.get(value)
    if isinstance(value, list):
        try:
            return block_values(value, arch)
        except ValueError:
            return {}
    if isinstance(value, dict):
        default = value.get("default")
        return {b: value.get(b, default) for b in arch.blocks}
    return {}


def _heatmap(blocks: dict[str, dict], arch, input_order: list[str]) -> str:
    """Per block and input: how far the result moved from it (relative L2, colour on one
    absolute scale; cosine in the tooltip)."""
    order = list(arch.blocks) if arch is not None and arch.blocks else []
    names = sorted(blocks, key=lambda b: (order.index(b) if b in order else len(order), _layer(b), b))
    present = {i for m in blocks.values() for i in m}
    inputs = [i for i in input_order if i in present] + sorted(present - set(input_order))
    head = "".join(f"<th>{_e(b)}</th>" for b in names)
    rows = []
    for node in inputs:
        cells = []
        for b in names:
            m = blocks[b].get(node)
            if m is None:
                cells.append("<td></td>")
                continue
            cells.append(f"<td style='background:{_heat(m['rel_l2'])}' title='{_e(node)} {_e(b)}: relative L2 "
                         f"{m['rel_l2']:.4f}, cosine {m['cosine']:.5f}'>{m['rel_l2']:.2f}</td>")
        rows.append(f"<tr><th>{_e(node)}</th>{''.join(cells)}</tr>")
    legend = (f"<div class='legend meta'>relative L2 distance of the result from each input, by block:"
              f"<span style='background:{_heat(0)}'></span>0<span style='background:{_heat(HEAT_MAX / 2)}'>"
              f"</span>{HEAT_MAX / 2:g}<span style='background:{_heat(HEAT_MAX)}'></span>{HEAT_MAX:g} or more</div>")
    return f"{legend}<div class=scroll><table class=heat><tr><th></th>{head}</tr>{''.join(rows)}</table></div>"


def _layer(group: str) -> int:
    """"layer 12" -> 12, so layers sort by number."""
    tail = group.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _heat(value: float) -> str:
    t = max(0.0, min(1.0, value / HEAT_MAX)) if math.isfinite(value) else 1.0
    r, g, b = 255, int(255 - 180 * t), int(255 - 200 * t)
    return f"rgb({r},{g},{b})"


def _output(name: str, path: Path) -> str:
    from mergebuild.record.lineage_read import read_lineage

    try:
        tree = read_lineage(path) if Path(path).exists() else None
    except Exception as e:  # a broken output: say so, the rest of the report stands
        return f"<div class=card><h3>{_e(name)}</h3><p>{_e(path)}: cannot read its lineage ({_e(e)})</p></div>"
    if tree is None:
        return f"<div class=card><h3>{_e(name)}</h3><p><code>{_e(path)}</code> is not built yet</p></div>"
    return f"<div class=card><h3>{_e(name)}: <code>{_e(Path(path).name)}</code></h3>{_tree(tree)}</div>"


def _tree(root: dict) -> str:
    """A lineage tree as nested lists, built without recursion (chains can be long)."""
    out = []
    stack: list = [("node", root)]
    while stack:
        kind, item = stack.pop()
        if kind != "node":
            out.append(item)
            continue
        out.append(f"<li>{_label(item)}")
        children = ([item["made_by"]] if item.get("kind") == "model" and item.get("made_by") else []) + \
            list(item.get("inputs", []))
        if children:
            stack.append(("text", "</ul></li>"))
            stack += [("node", c) for c in reversed(children)]
            stack.append(("text", "<ul class=tree>"))
        else:
            out.append("</li>")
    return "<ul class=tree>" + "".join(out) + "</ul>"


def _label(node: dict) -> str:
    if node.get("kind") == "model":
        h = f" <span class=meta>{_e(node['autov2'])}</span>" if node.get("autov2") else ""
        return f"<b>{_e(node.get('file') or node.get('name'))}</b>{h}"
    params, *details = lineage_details(node)
    extra = ", ".join(details)
    again = " <span class=meta>(shown above)</span>" if node.get("same_as") else ""
    return (f"{_e(node.get('name') or '')}: <code>{_e(node.get('method'))}({_e(params)})</code>"
            + (f" <span class=meta>[{_e(extra)}]</span>" if extra else "") + again)


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
