"""Everything the user sees: rich progress and tables on stderr, JSON on stdout. No logic."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table
    from rich.tree import Tree

# rich (~35 ms to import) is imported where something is drawn: a quiet or --json build that
# prints nothing never pays it. The consoles `err` and `out` and FullWidthConsole are made on
# first use (the module's __getattr__ below; in this module, _err() and _out()).

UNBOUNDED = 100_000  # columns when not writing to a terminal: nothing is cropped or wrapped


def _full_width_console_class():
    from rich.console import Console, ConsoleDimensions

    class FullWidthConsole(Console):
        """A console that never loses information: on a terminal it wraps to the terminal's width;
        written to a file or a pipe (`mergebuild lineage FILE > lineage.txt`) it neither crops nor
        wraps, whatever terminal the process itself runs in (rich alone would use that terminal's
        width, found through stdin)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("width") is None:
                self._width = None  # rich took COLUMNS as a fixed width: it may only size a terminal

        @property
        def size(self) -> ConsoleDimensions:
            if self._width is None and not self.is_terminal:
                return ConsoleDimensions(UNBOUNDED, super().size.height)
            return super().size

        @size.setter
        def size(self, new_size) -> None:
            Console.size.fset(self, new_size)

    FullWidthConsole.__module__, FullWidthConsole.__qualname__ = __name__, "FullWidthConsole"
    return FullWidthConsole


def __getattr__(name: str):
    makers = {"FullWidthConsole": _full_width_console_class,
              "err": lambda: _made("FullWidthConsole")(stderr=True, highlight=False),
              "out": lambda: _made("FullWidthConsole")(highlight=False, soft_wrap=True)}
    if name not in makers:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals().setdefault(name, makers[name]())


def _made(name: str):
    """A module global made on first use (a test may have replaced it: that one is used)."""
    made = globals().get(name)
    return made if made is not None else __getattr__(name)


def _err():
    """The stderr console (progress, tables, warnings)."""
    return _made("err")


def _out():
    """The stdout console (what a command answers)."""
    return _made("out")


def escape(text: str) -> str:
    """rich's markup escape (rich imported on first use)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


class RichProgress:
    """Per merge with work: "[k/n] name", a bar of bytes, tensors done, bytes written and read,
    throughput and ETA, on stderr. Drawn on a terminal (or where `force` asks), never with -q."""

    def __init__(self, enabled: bool, force: bool = False):
        self.enabled = enabled and (force or (_err().is_terminal and not _err().is_dumb_terminal))
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self._progress = Progress(  # fits 80 columns: tensors, bytes written of all, bytes read, speed, ETA
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=12),
                TextColumn("{task.fields[tensors]}/{task.fields[of]}"),
                TextColumn("{task.fields[wrote]}/{task.fields[size]} read {task.fields[read]}"),
                TransferSpeedColumn(), TimeRemainingColumn(compact=True), console=_err(), transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, name: str, tensors: int, nbytes: int, step: int = 1, steps: int = 1) -> None:
        if self._progress is not None:
            task = self._progress.add_task(f"[{step}/{steps}] {escape(name)}", total=max(nbytes, 1), tensors=0,
                                           of=tensors, read=human_bytes(0), wrote=human_bytes(0),
                                           size=human_bytes(nbytes))
            self._tasks[name] = [task, 0, 0, max(nbytes, 1), 0]  # id, tensors done, read, total, written

    def advance(self, name: str, tensors: int, written: int, read: int = 0) -> None:
        if self._progress is not None and name in self._tasks:
            state = self._tasks[name]
            state[1] += tensors
            state[2] += read
            state[4] += written
            self._progress.update(state[0], advance=written, tensors=state[1], read=human_bytes(state[2]),
                                  wrote=human_bytes(state[4]))

    def finish(self, name: str) -> None:
        if self._progress is not None and name in self._tasks:
            task, _, _, total, _ = self._tasks.pop(name)
            self._progress.update(task, completed=total)


def summary_table(results) -> Table:
    from rich.table import Table

    table = Table(title="mergebuild", title_justify="left")
    for col in ("merge", "arch", "status", "tensors", "computed", "reused", "seconds", "output"):
        # fold: a long value goes on more lines in a narrow terminal rather than losing its end
        table.add_column(col, justify="right" if col in ("tensors", "computed", "reused", "seconds") else "left",
                         overflow="fold")
    for r in results.values():
        output = "" if r.output is None else _shown_path(r.output) + ("" if r.written else " (up to date)")
        status = r.status if r.ran else "up to date"
        table.add_row(escape(r.name), r.architecture, status, str(r.tensors), str(r.computed), str(r.reused),
                      f"{r.seconds:.2f}", escape(output))
    return table


def cache_line(size: int, limit: int) -> str:
    return f"cache: {human_bytes(size)} of {human_bytes(limit)}"


def ray_line(ray: dict) -> str:
    """What --ray did, in a line: tasks, worker processes, nodes, bytes sent back."""
    local = f", {ray['computed_on_driver']} on the driver" if ray["computed_on_driver"] else ""
    workers = len(ray["worker_pids"])
    return (f"ray: {ray['tasks']} tasks ({ray['tensors']} tensors) on {workers} worker process{'es' if workers != 1 else ''}, "
            f"{ray['nodes']} node{'s' if ray['nodes'] != 1 else ''}{local}; "
            f"{human_bytes(ray['bytes_to_driver'])} sent to the driver")


def cache_stats_text(doc: dict) -> str:
    kinds = ", ".join(f"{k} {human_bytes(v)}" for k, v in doc["by_kind"].items() if v)
    return (f"{doc['path']}: {human_bytes(doc['bytes'])} on disk of a {human_bytes(doc['limit'])} limit"
            f" ({kinds or 'empty'}); {doc['blobs']} blobs, {doc['entries']} entries, {doc['output_tensors']} "
            f"tensors located in outputs (not counted), {doc['builds']} builds, {doc['mergefiles']} Mergefiles"
            + (tiers_text(doc["tiers"]) if "tiers" in doc else ""))


def tiers_text(tiers: dict) -> str:
    """The lines of `cache stats` on the tiers: what each served and moved, over every build."""
    local, remote = tiers["local"], tiers["remote"]
    text = f"\nlocal tier: {local['hits']} hits, {human_bytes(local['bytes_read'])} read back"
    if remote.get("url") or remote["hits"] or remote["blobs_up"]:
        text += (f"\nremote tier (set now: {remote.get('url') or 'none'}): {remote['hits']} hits, {remote['misses']} "
                 f"misses; {human_bytes(remote['bytes_down'])} down ({remote['blobs_down']} tensors), "
                 f"{human_bytes(remote['bytes_up'])} up ({remote['blobs_up']} tensors, {remote['entries_up']} "
                 f"entries); {remote['bad_blobs']} bad tensors not used, {remote['errors']} failures")
    return text


def verify_text(doc: dict) -> str:
    text = (f"checked {doc['checked']} tensors: {doc['bad_removed']} bad (removed, will be recomputed), "
            f"{doc['missing']} missing")
    if doc.get("outputs_changed"):
        text += (f"; {doc['outputs_changed']} outputs were moved, edited or deleted since they were written "
                 f"(their {doc['output_tensors_dropped']} tensors are recomputed when needed)")
    return text


def _shown_path(path) -> str:
    """A path relative to the working folder when it is below it (shorter in tables)."""
    import os

    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def build_json(results, built=None) -> dict:
    doc = {
        "merges": {
            r.name: {"status": r.status, "tensors": r.tensors, "computed": r.computed,
                     "reused": r.reused, "seconds": round(r.seconds, 3), "architecture": r.architecture,
                     "ran": r.ran, "written": r.written}
            for r in results.values()
        },
        "outputs": {r.name: str(r.output) for r in results.values() if r.output is not None},
    }
    if built is not None:
        doc["cache"] = {"bytes": built.cache_bytes, "limit": built.cache_limit}
        doc["warnings"] = built.warnings + built.late_warnings
        if getattr(built, "ray", None) is not None:
            doc["ray"] = built.ray
        if getattr(built, "tiers", None) is not None:
            doc["tiers"] = built.tiers
    return doc


def print_dry_run(statuses, verbose: bool) -> None:
    from mergebuild.planning.computed import computed_line

    for s in statuses:
        _out().print(escape(f"{s.name}: {s.state}"))
        if verbose:
            for reason in s.reasons:
                _out().print(escape(f"  because {reason}"))
            if s.statistic is not None:
                _out().print(escape(f"  {statistic_line(s.statistic)}"))
            for doc in getattr(s, "computed", ()):
                _out().print(escape(f"  reads {computed_line(doc)}"))


def statistic_line(stat: dict) -> str:
    """A whole-model statistic as -n -v and explain show it: its state and what it reads."""
    data = "".join(f", {label} {digest[:12]}" for label, digest in stat["data"].items())
    return (f"statistic {stat['name']}: {stat['state']} (reads {stat['reads']} tensors of "
            f"{', '.join(stat['inputs'])}{data})")


def dry_run_json(statuses) -> dict:
    return {
        "merges": {
            s.name: {"status": s.state, "tensors": s.tensors, "dirty": s.dirty, "pending": s.pending,
                     "output": str(s.output) if s.output else None, "reasons": s.reasons,
                     **({"statistic": s.statistic} if s.statistic is not None else {}),
                     **({"computed": s.computed} if getattr(s, "computed", None) else {})}
            for s in statuses
        }
    }


def print_warnings(plan, warnings: list[str] = ()) -> None:
    """Warnings, one line each: the merges' own (an edit that reached no tensor...), then others."""
    lines = [f"{name}: {w}" for name, merge in (plan.merges.items() if plan is not None else ()) for w in merge.warnings]
    for line in lines + list(warnings):
        _err().print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


def print_plan_notes(plan) -> None:
    """What planning found worth a line: the sources' notes, then each merge's."""
    for name, source in plan.sources.items():
        for note in getattr(source, "notes", None) or ():
            _err().print(f"{escape(name)}: {escape(note)}")
    for name, merge in plan.merges.items():
        for note in merge.notes:
            _err().print(f"{escape(name)}: {escape(note)}")


def print_plan(plan, reasons: dict[str, list[str]], verbose: bool) -> None:
    """Before a build: notes (sources' own, then merges'); with -v the detected architectures
    and why merges rebuild."""
    print_plan_notes(plan)
    for name, merge in plan.merges.items():
        if verbose and merge.arch is not None:
            _err().print(escape(f"{name}: architecture {merge.arch.name} ({merge.arch_how})"))
    if verbose:
        for name, items in reasons.items():
            _err().print(f"[bold]{escape(name)}[/]: " + escape("; ".join(items)))


def lineage_tree(node: dict) -> Tree:
    """A lineage tree (lineage_read.as_tree) for rich, built without recursion (chains can be long)."""
    from rich.tree import Tree

    tree = Tree(_label(node))
    stack = [(tree, node)]
    while stack:
        branch, at = stack.pop()
        children = []
        if at.get("kind") == "model" and at.get("made_by"):
            children.append(at["made_by"])
        children += at.get("inputs", [])
        for child in children:
            stack.append((branch.add(_label(child)), child))
    return tree


def _label(node: dict) -> str:
    from mergebuild.render.graph import lineage_details

    again = " [dim](shown above)[/]" if node.get("same_as") else ""
    if node.get("kind") == "model":
        h = f" [dim]{escape(str(node['autov2']))}[/]" if node.get("autov2") else ""
        return f"[bold cyan]{escape(str(node.get('file') or node.get('name')))}[/]{h}{again}"
    if again:
        return f"{escape(str(node.get('name')))}: [green]{escape(str(node.get('method')))}[/]{again}"
    params, *extra = lineage_details(node)
    tail = escape(f" [{', '.join(extra)}]") if extra else ""
    tool = escape(str(node.get("tool", "")))
    name = f"{escape(str(node.get('name')))}: " if node.get("name") else ""
    via = f" [dim]({tool})[/]" if tool and tool != "mergebuild" else ""
    return f"{name}[green]{escape(str(node.get('method')))}[/]({escape(params)}){tail}{via}"


def print_methods(methods) -> None:
    for m in methods:
        params = ", ".join(p.name if p.required else f"{p.name}={p.default}" for p in m.params)
        inputs = ", ".join(m.inputs) + (", ..." if m.variadic else "")
        summary = (m.doc or "").strip().splitlines()[0] if m.doc else ""
        _out().print(f"[bold]{escape(m.name)}[/] v{m.version} " + escape(f"[{inputs}] {params}: {summary}"))


def method_doc(method) -> dict:
    """One method in full: what `mergebuild methods NAME` shows, as JSON."""
    return {"name": method.name, "version": method.version, "inputs": list(method.inputs),
            "variadic": method.variadic, "follows": method.follows, "doc": (method.doc or "").strip(),
            "elementwise": method.elementwise, "params": {p.name: p.as_dict() for p in method.params}}


def print_method(method) -> None:
    from rich.table import Table

    doc = method_doc(method)
    inputs = ", ".join(doc["inputs"]) + (", ... (any number more)" if doc["variadic"] else "")
    _out().print(f"[bold]{escape(method.name)}[/] (version {method.version})")
    _out().print(escape(f"inputs: {inputs}"))
    if doc["follows"]:
        _out().print(escape(f"follows: {doc['follows']}"))
    if doc["doc"]:
        _out().print()
        for line in doc["doc"].splitlines():
            _out().print(escape(line.strip()))
    if not method.params:
        _out().print("\nparameters: none")
        return
    table = Table(title="parameters", title_justify="left", box=None, show_header=True, pad_edge=False)
    for col in ("name", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for name, p in doc["params"].items():
        kind = " | ".join(repr(c) for c in p["choices"]) if p["choices"] else p["type"]
        if p["varies_by_block"]:
            kind += ", by block"
        default = "required" if p["required"] else repr(p["default"])
        table.add_row(escape(name), escape(kind), escape(default), escape(p["doc"]))
    _out().print()
    _out().print(table)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def print_status(reasons: dict[str, list[str]]) -> None:
    for target, items in reasons.items():
        if not items:
            _out().print(f"{escape(target)}: up to date")
            continue
        _out().print(f"{escape(target)}: out of date")
        for reason in items:
            _out().print(escape(f"  {reason}"))


def print_explain(doc: dict) -> None:
    from mergebuild.planning.computed import computed_line

    for name, info in doc.items():
        _out().print(f"[bold]{escape(name)}[/]: {escape(info['state'])}")
        for reason in info["reasons"]:
            _out().print(escape(f"  because {reason}"))
        if "statistic" in info:
            _out().print(escape(f"  {statistic_line(info['statistic'])}"))
        for doc in info.get("computed", ()):
            _out().print(escape(f"  reads {computed_line(doc)}"))
        if info["by_block"]:
            groups = ", ".join(f"{b} {n}" for b, n in info["by_block"].items())  # in the model's block order
            _out().print(escape(f"  tensors to recompute by block: {groups}"))
