"""The merge DAG as text: an indented tree, Graphviz dot, or Mermaid."""

from __future__ import annotations

from mergebuild.mergefile.model import Mergefile


# node fill colours by state, shared by dot, mermaid and the PNG drawing
STATE_COLOURS = {"source": "#dddddd", "up to date": "#b7e1b0", "dirty": "#f6c48b", "pending": "#f7e59a"}
# what the legends call each state
STATE_LEGEND = {"source": "source model", "up to date": "up to date", "dirty": "dirty (recomputes)",
                "pending": "pending (an input is dirty, or to write)"}
TARGET_BORDER = "#1f3a93"  # a target (a merge that writes a file) has a thick border of this colour
LABEL_WIDTH = 32  # characters per label line in dot and the pictures


def state_class(state: str | None) -> str:
    """'up to date', 'dirty', 'pending' or 'source' from a dry run's state text."""
    if not state:
        return "source"
    if "dirty" in state and "depends" not in state:
        return "dirty"
    if "depends" in state or "write" in state:
        return "pending"
    return "up to date"


def to_dot(mf: Mergefile, states: dict[str, str] | None = None) -> str:
    """Top to bottom (sources first), boxes coloured by state, targets with a thick border, and a
    legend of every state's colour."""
    states = states or {}
    lines = ["digraph mergebuild {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];',
             '  edge [color="#555555"];']
    for name, model in mf.models.items():
        lines.append(f'  "{name}" [fillcolor="{STATE_COLOURS["source"]}", label="{_dot_label([name, model.path.name])}"];')
    for name, merge in mf.merges.items():
        state = states.get(name)
        colour = STATE_COLOURS[state_class(state) if state else "pending"]
        border = f', penwidth=3, color="{TARGET_BORDER}"' if merge.output else ""
        label = _dot_label([name, *merge_lines(merge, state)])
        lines.append(f'  "{name}" [fillcolor="{colour}"{border}, label="{label}"];')
        for i in merge.inputs:
            lines.append(f'  "{i}" -> "{name}";')
    return "\n".join(lines + _dot_legend() + ["}"]) + "\n"


def _dot_legend() -> list[str]:
    """A row of one box per state, and one for a target, in a cluster of its own."""
    lines = ['  subgraph cluster_legend {', '    label="legend"; fontsize=9; style=dashed; color="#999999";',
             '    node [fontsize=9, margin="0.08,0.03", width=0, height=0];', "    { rank=same;"]
    for state, colour in STATE_COLOURS.items():
        lines.append(f'      "legend {state}" [fillcolor="{colour}", label="{STATE_LEGEND[state]}"];')
    lines.append(f'      "legend target" [fillcolor="white", penwidth=3, color="{TARGET_BORDER}", '
                 f'label="target (writes a file)"];')
    return lines + ["    }", "  }"]


def _dot_label(lines: list[str]) -> str:
    return "\\n".join(_quote(part) for line in lines for part in wrap(line))


def to_mermaid(mf: Mergefile, states: dict[str, str] | None = None) -> str:
    states = states or {}
    lines = ["graph LR"]
    for name, model in mf.models.items():
        lines.append(f'  {_id(name)}["{name}<br/>{model.path.name}"]')
    for name, merge in mf.merges.items():
        label = "<br/>".join(_quote(line) for line in [name, *merge_lines(merge, states.get(name))])
        lines.append(f'  {_id(name)}(("{label}"))')
        for i in merge.inputs:
            lines.append(f"  {_id(i)} --> {_id(name)}")
    for name, merge in mf.merges.items():
        style = [f"fill:{STATE_COLOURS[state_class(states[name])]}"] if name in states else []
        style += [f"stroke:{TARGET_BORDER},stroke-width:3px"] if merge.output else []
        if style:
            lines.append(f"  style {_id(name)} {','.join(style)}")
    return "\n".join(lines) + "\n"


def to_text(mf: Mergefile, states: dict[str, str] | None = None) -> str:
    """Each target as an indented tree of what it is made from; a merge already shown is named
    again with "(see above)" instead of repeated (a shared input would otherwise repeat itself
    once per path). No recursion: chains can be long."""
    states = states or {}
    lines: list[str] = []
    shown: set[str] = set()
    for target in mf.targets or list(mf.merges)[-1:]:
        stack = [(target, "")]
        while stack:
            name, indent = stack.pop()
            if name in mf.models:
                lines.append(f"{indent}{name} <- {mf.models[name].path.name}")
                continue
            merge = mf.merges[name]
            if name in shown:
                lines.append(f"{indent}{name} (see above)")
                continue
            shown.add(name)
            out = f" -> {merge.output.name}" if merge.output else ""
            state = f"  [{states[name]}]" if name in states else ""
            extras = "".join(f", {extra}" for extra in _extras(merge))
            lines.append(f"{indent}{name} = {merge.method}{_params(merge)}{extras}{out}{state}")
            stack.extend((i, indent + "  ") for i in reversed(merge.inputs))
    return "\n".join(lines) + "\n"


def merge_lines(merge, state: str | None = None) -> list[str]:
    """A merge's label below its name: method and parameters; dtype and rules; the file a
    target writes; its state."""
    lines = [f"{merge.method}{_params(merge)}"]
    if _extras(merge):
        lines.append(", ".join(_extras(merge)))
    if merge.output:
        lines.append(f"→ {merge.output.name}")
    return lines + ([state] if state else [])


def _params(merge) -> str:
    return "(" + ", ".join(param_summary(merge, k, v) for k, v in merge.params.items()) + ")" if merge.params else ""


def param_summary(merge, key: str, value) -> str:
    """`alpha=0.4`; a block table or block list as `alpha: MBW 26 values`, a gradient as
    `alpha: gradient 3 points`; a list with one value per model (its parameter says so) in full."""
    if isinstance(value, dict):
        if "gradient" in value:
            return f"{key}: gradient {len(value['gradient'])} points"
        return f"{key}: MBW {len(value)} values"
    if isinstance(value, list) and not _per_model(merge.method, key):
        return f"{key}: MBW {len(value)} values"
    return f"{key}={value}"


def _per_model(method: str, key: str) -> bool:
    from mergebuild.methods.registry import get_method

    spec = get_method(method)
    param = spec.param(key) if spec else None
    return param is not None and param.kind is list  # list parameters are per model (Param's doc)


def _extras(merge) -> list[str]:
    """`dtype float16` and `N rules` where the merge sets them."""
    extras = [f"dtype {merge.dtype}"] if merge.dtype else []
    if merge.rules:
        extras.append(f"{len(merge.rules)} rule" + ("s" if len(merge.rules) > 1 else ""))
    return extras


def wrap(line: str, width: int = LABEL_WIDTH) -> list[str]:
    """A label line broken into lines of at most `width` characters: a long `method(params)`
    first after its parenthesis, then at spaces (longer words stay whole)."""
    import re
    import textwrap

    call = re.match(r"(\S+\()(.+)", line)
    if len(line) > width and call:
        return [call.group(1), *wrap(call.group(2), width)]
    return textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False) or [""]


def _id(name: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in name)


def lineage_to_dot(tree: dict) -> str:
    """A lineage tree (mergebuild lineage --json) as Graphviz dot: files as boxes, merges as ellipses."""
    lines = ["digraph lineage {", "  rankdir=LR;"]
    _walk(tree, lines, [0], dot=True)
    return "\n".join(lines + ["}"]) + "\n"


def lineage_to_mermaid(tree: dict) -> str:
    lines = ["graph LR"]
    _walk(tree, lines, [0], dot=False)
    return "\n".join(lines) + "\n"


def _walk(root: dict, lines: list[str], counter: list[int], dot: bool) -> str:
    """Emit a lineage tree's nodes and edges (children point at their parent); no recursion."""
    top = None
    stack = [(root, None)]
    while stack:
        node, parent = stack.pop()
        counter[0] += 1
        me = f"n{counter[0]}"
        top = top or me
        if node.get("kind") == "model":
            label = node.get("file") or node.get("name") or "?"
            if node.get("autov2"):
                label += f" {node['autov2']}"
            lines.append(f'  {me} [shape=box, label="{_quote(label)}"];' if dot else f'  {me}["{_quote(label)}"]')
            children = [node["made_by"]] if node.get("made_by") else []
        else:
            details = lineage_details(node)
            label = f"{node.get('name') or ''}: {node.get('method')}({details[0]})".lstrip(": ")
            if dot:
                text = "\\n".join(_quote(line) for line in [*wrap(label), *details[1:]])
                lines.append(f'  {me} [label="{text}"];')
            else:
                text = "<br>".join(_quote(line) for line in [label, *details[1:]])
                lines.append(f'  {me}(("{text}"))')
            children = node.get("inputs", [])
        if parent is not None:
            lines.append(f"  {me} -> {parent};" if dot else f"  {me} --> {parent}")
        stack.extend((child, me) for child in reversed(children))
    return top


def lineage_details(node: dict) -> list[str]:
    """A lineage merge node in words: its parameters first, then dtype, rules, discard, include
    and exclude where it sets them; the same text in the tree, dot and mermaid."""
    from mergebuild.planning.recipe import params_text, rule_text, value_text

    extra = [f"dtype {node['dtype']}"] if node.get("dtype") else []
    rules = node.get("rules") if isinstance(node.get("rules"), list) else []
    extra += [f"rule {rule_text(r)}" for r in rules if isinstance(r, dict)]
    extra += [f"{k} {value_text(node[k])}" for k in ("discard", "include", "exclude") if node.get(k)]
    tail = node.get("tail")
    if isinstance(tail, dict) and tail.get("rule") == "two-tailed":  # k = "auto" (tune/two_tailed.py)
        extra.append(f"k auto: two-tailed kept the last {tail.get('k')} of {tail.get('of')}")
    return [params_text(node.get("params") or {}), *extra]


def _quote(text: str) -> str:
    return text.replace('"', "'")


def to_nodes(mf: Mergefile, states: dict[str, str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Nodes and edges for the pure-Python drawing (plots.plot_graph): each node's label is its
    name, then its details (unwrapped: the drawing wraps them); `target` marks merges that write
    a file. Edges come in each merge's input order (A first)."""
    nodes = [{"name": n, "label": f"{n}\n{m.path.name}", "state": "source", "target": False}
             for n, m in mf.models.items()]
    edges = []
    for name, merge in mf.merges.items():
        label = "\n".join([name, *merge_lines(merge, states.get(name))])
        # no states at all (a source is missing): drawn in no state's colour rather than a guess
        state = state_class(states[name]) if name in states else ("pending" if states else "unknown")
        nodes.append({"name": name, "label": label, "state": state, "target": merge.output is not None})
        edges += [(i, name) for i in merge.inputs]
    return nodes, edges
