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
