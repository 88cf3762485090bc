"""Everything the user sees: rich progress and tables on stderr, JSON on stdout. No logic."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


class RichProgress:
    """Per merge: a bar of tensors and bytes. Only drawn on an interactive terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and err.is_terminal and not err.is_dumb_terminal
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                DownloadColumn(), TimeElapsedColumn(), console=err, transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, name: str, total: int, nbytes: int) -> None:
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task(name, total=total)

    def advance(self, name: str, tensors: int, nbytes: int) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.advance(self._tasks[name], tensors)

    def finish(self, name: str) -> None:
        pass


def summary_table(results) -> Table:
    table = Table(title="mergebuild", title_justify="left")
    for col in ("merge", "arch", "status", "tensors", "computed", "reused", "size", "seconds", "output"):
        table.add_column(col, justify="right" if col in ("tensors", "computed", "reused", "size", "seconds") else "left")
    for r in results.values():
        output = "" if r.output is None else f"{r.output}" + ("" if r.written else " (up to date)")
        table.add_row(r.name, r.architecture, r.status, str(r.tensors), str(r.computed), str(r.reused),
                      human_bytes(r.bytes), f"{r.seconds:.2f}", output)
    return table


def build_json(results) -> dict:
    return {
        "merges": {
            r.name: {"status": r.status, "tensors": r.tensors, "computed": r.computed,
                     "reused": r.reused, "seconds": round(r.seconds, 3), "architecture": r.architecture}
            for r in results.values()
        },
        "outputs": {r.name: str(r.output) for r in results.values() if r.output is not None},
    }


def print_dry_run(statuses, verbose: bool) -> None:
    for s in statuses:
        out.print(escape(f"{s.name}: {s.state}"))
        if verbose:
            for reason in s.reasons:
                out.print(escape(f"  because {reason}"))


def dry_run_json(statuses) -> dict:
    return {
        "merges": {
            s.name: {"status": s.state, "tensors": s.tensors, "dirty": s.dirty, "pending": s.pending,
                     "output": str(s.output) if s.output else None, "reasons": s.reasons}
            for s in statuses
        }
    }


def print_plan(plan, reasons: dict[str, list[str]], verbose: bool) -> None:
    """Before a build: warnings always; with -v the detected architectures and why merges rebuild."""
    for name, merge in plan.merges.items():
        for warning in merge.warnings:
            err.print(f"[yellow]warning:[/] {escape(name)}: {escape(warning)}")
        for note in merge.notes:
            err.print(f"{escape(name)}: {escape(note)}")
        if verbose and merge.arch is not None:
            err.print(escape(f"{name}: architecture {merge.arch.name} ({merge.arch_how})"))
    if verbose:
        for name, items in reasons.items():
            err.print(f"[bold]{escape(name)}[/]: " + escape("; ".join(items)))


def lineage_tree(node: dict) -> Tree:
    tree = Tree(_label(node))
    _add_children(tree, node)
    return tree


def _add_children(tree: Tree, node: dict) -> None:
    made_by = node.get("made_by")
    if node.get("kind") == "model" and made_by:
        branch = tree.add(_label(made_by))
        _add_children(branch, made_by)
    for child in node.get("inputs", []):
        branch = tree.add(_label(child))
        _add_children(branch, child)


def _label(node: dict) -> str:
    if node.get("kind") == "model":
        h = f" [dim]{node['autov2']}[/]" if node.get("autov2") else ""
        return f"[bold cyan]{escape(str(node.get('file') or node.get('name')))}[/]{h}"
    params = escape(", ".join(f"{k}={v}" for k, v in (node.get("params") or {}).items()))
    tool = escape(str(node.get("tool", "")))
    name = f"{escape(str(node.get('name')))}: " if node.get("name") else ""
    via = f" [dim]({tool})[/]" if tool and tool != "mergebuild" else ""
    return f"{name}[green]{escape(str(node.get('method')))}[/]({params}){via}"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def print_status(reasons: dict[str, list[str]]) -> None:
    for target, items in reasons.items():
        if not items:
            out.print(f"{escape(target)}: up to date")
            continue
        out.print(f"{escape(target)}: out of date")
        for reason in items:
            out.print(escape(f"  {reason}"))


def print_explain(doc: dict) -> None:
    for name, info in doc.items():
        out.print(f"[bold]{escape(name)}[/]: {escape(info['state'])}")
        for reason in info["reasons"]:
            out.print(escape(f"  because {reason}"))
        if info["by_block"]:
            groups = ", ".join(f"{b} {n}" for b, n in sorted(info["by_block"].items()))
            out.print(escape(f"  tensors to recompute by block: {groups}"))
