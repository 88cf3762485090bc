"""The merge DAG as text: an indented tree, Graphviz dot, or Mermaid."""

from __future__ import annotations

from mergebuild.spec.model import Mergefile


def to_dot(mf: Mergefile) -> str:
    lines = ["digraph mergebuild {", "  rankdir=LR;"]
    for name, model in mf.models.items():
        lines.append(f'  "{name}" [shape=box, label="{name}\\n{model.path.name}"];')
    for name, merge in mf.merges.items():
        shape = "doubleoctagon" if merge.output else "ellipse"
        lines.append(f'  "{name}" [shape={shape}, label="{name}\\n{merge.method}{_params(merge)}"];')
        for i in merge.inputs:
            lines.append(f'  "{i}" -> "{name}";')
    return "\n".join(lines + ["}"]) + "\n"


def to_mermaid(mf: Mergefile) -> str:
    lines = ["graph LR"]
    for name, model in mf.models.items():
        lines.append(f'  {_id(name)}["{name}<br/>{model.path.name}"]')
    for name, merge in mf.merges.items():
        lines.append(f'  {_id(name)}(("{name}<br/>{merge.method}{_params(merge)}"))')
        for i in merge.inputs:
            lines.append(f"  {_id(i)} --> {_id(name)}")
    return "\n".join(lines) + "\n"


def to_text(mf: Mergefile) -> str:
    lines: list[str] = []
    for target in mf.targets or list(mf.merges)[-1:]:
        _text(mf, target, "", lines)
    return "\n".join(lines) + "\n"


def _text(mf: Mergefile, name: str, indent: str, lines: list[str]) -> None:
    if name in mf.models:
        lines.append(f"{indent}{name} <- {mf.models[name].path.name}")
        return
    merge = mf.merges[name]
    out = f" -> {merge.output.name}" if merge.output else ""
    lines.append(f"{indent}{name} = {merge.method}{_params(merge)}{out}")
    for i in merge.inputs:
        _text(mf, i, indent + "  ", lines)


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


def _walk(node: dict, lines: list[str], counter: list[int], dot: bool) -> str:
    counter[0] += 1
    me = f"n{counter[0]}"
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
    for child in children:
        other = _walk(child, lines, counter, dot)
        lines.append(f"  {other} -> {me};" if dot else f"  {other} --> {me}")
    return me


def _quote(text: str) -> str:
    return text.replace('"', "'")
