"""The merge DAG as text: an indented tree, Graphviz dot, or Mermaid."""

from __future__ import annotations

from mergebuild.mergefile.model import Mergefile


# node fill colours by state, shared by dot, mermaid and the PNG drawing
STATE_COLOURS = {"up to date": "#b7e1b0", "dirty": "#f6c48b", "pending": "#f7e59a", "source": "#dddddd"}


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
    states = states or {}
    lines = ["digraph mergebuild {", "  rankdir=LR;", "  node [style=filled];"]
    for name, model in mf.models.items():
        lines.append(f'  "{name}" [shape=box, fillcolor="{STATE_COLOURS["source"]}", label="{name}\\n{model.path.name}"];')
    for name, merge in mf.merges.items():
        shape = "doubleoctagon" if merge.output else "ellipse"
        state = states.get(name)
        colour = STATE_COLOURS[state_class(state)] if state else "white"
        label = f"{name}\\n{merge.method}{_params(merge)}" + (f"\\n{state}" if state else "")
        lines.append(f'  "{name}" [shape={shape}, fillcolor="{colour}", label="{_quote(label)}"];')
        for i in merge.inputs:
            lines.append(f'  "{i}" -> "{name}";')
    return "\n".join(lines + ["}"]) + "\n"


def to_mermaid(mf: Mergefile, states: dict[str, str] | None = None) -> str:
    states = states or {}
    lines = ["graph LR"]
    for name, model in mf.models.items():
        lines.append(f'  {_id(name)}["{name}<br/>{model.path.name}"]')
    for name, merge in mf.merges.items():
        state = f"<br/>{states[name]}" if name in states else ""
        lines.append(f'  {_id(name)}(("{name}<br/>{merge.method}{_params(merge)}{state}"))')
        for i in merge.inputs:
            lines.append(f"  {_id(i)} --> {_id(name)}")
    for name, state in states.items():
        colour = STATE_COLOURS[state_class(state)]
        lines.append(f"  style {_id(name)} fill:{colour}")
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
            lines.append(f"{indent}{name} = {merge.method}{_params(merge)}{out}{state}")
            stack.extend((i, indent + "  ") for i in reversed(merge.inputs))
    return "\n".join(lines) + "\n"


def _params(merge) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in merge.params.items()) + ")" if merge.params else ""


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
            params = ", ".join(f"{k}={v}" for k, v in (node.get("params") or {}).items())
            label = f"{node.get('name') or ''}: {node.get('method')}({params})".lstrip(": ")
            lines.append(f'  {me} [label="{_quote(label)}"];' if dot else f'  {me}(("{_quote(label)}"))')
            children = node.get("inputs", [])
        if parent is not None:
            lines.append(f"  {me} -> {parent};" if dot else f"  {me} --> {parent}")
        stack.extend((child, me) for child in reversed(children))
    return top


def _quote(text: str) -> str:
    return text.replace('"', "'")


def to_nodes(mf: Mergefile, states: dict[str, str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Nodes and edges for the pure-Python drawing (plotting.plot_graph)."""
    nodes = [{"name": n, "label": f"{n}\n{m.path.name}", "state": "source"} for n, m in mf.models.items()]
    edges = []
    for name, merge in mf.merges.items():
        label = f"{name}\n{merge.method}{_params(merge)}" + (f"\n{states[name]}" if name in states else "")
        nodes.append({"name": name, "label": label, "state": state_class(states.get(name)) if name in states else "pending"})
        edges += [(i, name) for i in merge.inputs]
    return nodes, edges
