"""Everything the user sees: rich progress and tables on stderr, JSON on stdout. No logic."""

from __future__ import annotations

import json
import sys

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from mergebuild.planning.computed import computed_line

UNBOUNDED = 100_000  # columns when not writing to a terminal: nothing is cropped or wrapped


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


err = FullWidthConsole(stderr=True, highlight=False)
out = FullWidthConsole(highlight=False, soft_wrap=True)


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


class RichProgress:
    """Per merge with work: "[k/n] name", a bar of bytes, tensors done, bytes written and read,
    throughput and ETA, on stderr. Drawn on a terminal (or where `force` asks), never with -q."""

    def __init__(self, enabled: bool, force: bool = False):
        self.enabled = enabled and (force or (err.is_terminal and not err.is_dumb_terminal))
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self._progress = Progress(  # fits 80 columns: tensors, bytes written of all, bytes read, speed, ETA
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=12),
                TextColumn("{task.fields[tensors]}/{task.fields[of]}"),
                TextColumn("{task.fields[wrote]}/{task.fields[size]} read {task.fields[read]}"),
                TransferSpeedColumn(), TimeRemainingColumn(compact=True), console=err, transient=False)
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
    for s in statuses:
        out.print(escape(f"{s.name}: {s.state}"))
        if verbose:
            for reason in s.reasons:
                out.print(escape(f"  because {reason}"))
            if s.statistic is not None:
                out.print(escape(f"  {statistic_line(s.statistic)}"))
            for doc in getattr(s, "computed", ()):
                out.print(escape(f"  reads {computed_line(doc)}"))


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
        err.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


def print_plan_notes(plan) -> None:
    """What planning found worth a line: the sources' notes, then each merge's."""
    for name, source in plan.sources.items():
        for note in getattr(source, "notes", None) or ():
            err.print(f"{escape(name)}: {escape(note)}")
    for name, merge in plan.merges.items():
        for note in merge.notes:
            err.print(f"{escape(name)}: {escape(note)}")


def print_plan(plan, reasons: dict[str, list[str]], verbose: bool) -> None:
    """Before a build: notes (sources' own, then merges'); with -v the detected architectures
    and why merges rebuild."""
    print_plan_notes(plan)
    for name, merge in plan.merges.items():
        if verbose and merge.arch is not None:
            err.print(escape(f"{name}: architecture {merge.arch.name} ({merge.arch_how})"))
    if verbose:
        for name, items in reasons.items():
            err.print(f"[bold]{escape(name)}[/]: " + escape("; ".join(items)))


def lineage_tree(node: dict) -> Tree:
    """A lineage tree (lineage_read.as_tree) for rich, built without recursion (chains can be long)."""
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
        out.print(f"[bold]{escape(m.name)}[/] v{m.version} " + escape(f"[{inputs}] {params}: {summary}"))


def method_doc(method) -> dict:
    """One method in full: what `mergebuild methods NAME` shows, as JSON."""
    return {"name": method.name, "version": method.version, "inputs": list(method.inputs),
            "variadic": method.variadic, "follows": method.follows, "doc": (method.doc or "").strip(),
            "elementwise": method.elementwise, "params": {p.name: p.as_dict() for p in method.params}}


def print_method(method) -> None:
    doc = method_doc(method)
    inputs = ", ".join(doc["inputs"]) + (", ... (any number more)" if doc["variadic"] else "")
    out.print(f"[bold]{escape(method.name)}[/] (version {method.version})")
    out.print(escape(f"inputs: {inputs}"))
    if doc["follows"]:
        out.print(escape(f"follows: {doc['follows']}"))
    if doc["doc"]:
        out.print()
        for line in doc["doc"].splitlines():
            out.print(escape(line.strip()))
    if not method.params:
        out.print("\nparameters: none")
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
    out.print()
    out.print(table)


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
        if "statistic" in info:
            out.print(escape(f"  {statistic_line(info['statistic'])}"))
        for doc in info.get("computed", ()):
            out.print(escape(f"  reads {computed_line(doc)}"))
        if info["by_block"]:
            groups = ", ".join(f"{b} {n}" for b, n in info["by_block"].items())  # in the model's block order
            out.print(escape(f"  tensors to recompute by block: {groups}"))


def print_inspect(doc: dict) -> None:
    arch, lora = doc["architecture"], doc.get("lora")
    what = _lora_summary(lora) if lora else f"{arch['description']} ({arch['name']})"
    out.print(f"[bold]{escape(str(doc['path']))}[/]: {escape(what)}")
    totals = doc["totals"]
    dtypes = ", ".join(f"{k} {v}" for k, v in totals["dtypes"].items())
    out.print(f"{totals['tensors']} tensors, {totals['params']:,} parameters, {human_bytes(totals['bytes'])} ({escape(dtypes)})")
    if doc.get("hashes"):
        h = doc["hashes"]
        out.print(f"AutoV1 {h['autov1']}  AutoV2 {h['autov2']}  sha256 {h['sha256']}")
        out.print(f"tensor data sha256 {h['tensor_data_sha256']}")
    if lora:
        _print_lora_rows(lora, doc["grouping"])
    else:
        table = Table(title="by " + doc["grouping"], title_justify="left")
        for col in (doc["grouping"], "tensors", "parameters", "size", "dtypes"):
            table.add_column(col, justify="left" if col in (doc["grouping"], "dtypes") else "right")
        for row in doc["blocks"]:
            table.add_row(escape(row["name"]), str(row["tensors"]), f"{row['params']:,}", human_bytes(row["bytes"]),
                          escape(", ".join(f"{k} {v}" for k, v in row["dtypes"].items())))
        out.print(table)
        comps = ", ".join(f"{k} {v['tensors']} tensors ({human_bytes(v['bytes'])})" for k, v in doc["components"].items())
        out.print(escape(f"components: {comps}"))
    if doc.get("lineage"):
        out.print("lineage:")
        out.print(lineage_tree({"kind": "model", "name": str(doc["path"]), "made_by": doc["lineage"]}))
    if doc["metadata"]:
        out.print("metadata:")
        for key in sorted(doc["metadata"]):  # recipes too, cut short: --json has them whole
            out.print(escape(_metadata_line(key, doc["metadata"][key])))


META_VALUE = 60  # most characters of a metadata value shown on its line


def _metadata_line(key: str, value: str) -> str:
    """'  key: value' on one line of the terminal; a long value (a recipe: thousands of
    characters) is cut, with its full length. One barely too long (a hash) is kept whole:
    cutting it would save less than the note of its length costs."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    room = max(24, min(META_VALUE, out.width - len(key) - 4))
    more = f"... ({len(value):,} chars)"
    if len(flat) > room + len(more):
        flat = flat[: room - len(more)] + more
    return f"  {key}: {flat}"


def _lora_summary(lora: dict) -> str:
    """'LoRA (LoCon) for sdxl: 722 modules, rank 32, alpha 16'."""
    kind = "LoRA" if lora["format"] == "LoRA" else f"LoRA ({lora['format']})"
    target = lora["target"]["name"]
    if lora["target"].get("grouping") == "layer":  # an architecture without blocks: LLMs and the like
        target = f"{target} models (LLMs)"
    return f"{kind} for {target}: {lora['modules']} modules, {_rank_text(lora)}, {_alpha_text(lora)}"


def _rank_text(lora: dict) -> str:
    full = lora["modules_without_rank"]  # LoKr modules with both factors whole
    if not lora["ranks"]:
        return "full-rank factors"
    return _values("rank", lora["ranks"], lora["rank"]) + (f" ({full} modules full-rank)" if full else "")


def _values(word: str, values: list, common) -> str:
    if len(values) == 1:
        return f"{word} {values[0]:g}"
    shown = ", ".join(f"{v:g}" for v in values) if len(values) <= 4 else f"{values[0]:g}-{values[-1]:g}"
    return f"{word}s {shown} (mostly {common:g})"


def _alpha_text(lora: dict) -> str:
    missing = lora["modules_without_alpha"]
    if not lora["alphas"]:
        return "alpha = rank (none stored)" if missing else "no readable alpha"
    text = _values("alpha", lora["alphas"], lora["alpha"])
    return text + (f" ({missing} modules without: alpha = rank)" if missing else "")


def _print_lora_rows(lora: dict, grouping: str) -> None:
    """A LoRA's modules by block (or layer) and by component of the model it was made for."""
    group = lora["target"].get("grouping", "block")
    table = Table(title=f"modules by {group}", title_justify="left")
    for col in (group, "modules", "tensors", "parameters", "size"):
        table.add_column(col, justify="left" if col == group else "right")
    for row in lora["blocks"]:
        table.add_row(escape(row["name"]), str(row["modules"]), str(row["tensors"]), f"{row['params']:,}",
                      human_bytes(row["bytes"]))
    out.print(table)
    comps = ", ".join(f"{k} {v['modules']} modules" for k, v in lora["components"].items())  # sizes: the table
    out.print(escape(f"components: {comps}"))
    if lora.get("name_styles"):
        out.print(escape("module names: " + ", ".join(f"{k} {v}" for k, v in lora["name_styles"].items())))
    if lora["unmatched"]:
        out.print(escape(f"{len(lora['unmatched'])} modules match no layer of an {lora['target']['name']} "
                         f"checkpoint, e.g. {lora['unmatched'][0]}"))
    if lora["stray_tensors"]:
        out.print(escape(f"{len(lora['stray_tensors'])} tensors belong to no LoRA module, e.g. {lora['stray_tensors'][0]}"))


def print_diff(doc: dict) -> None:
    if doc.get("mismatch"):  # no tables: their numbers would compare unlike things
        out.print(escape(f"{doc['a']} vs {doc['b']}: {doc['mismatch']}"))
        out.print(f"{len(doc['only_in_a'])} keys only in A, {len(doc['only_in_b'])} only in B, "
                  f"{len(doc['shape_mismatch'])} with other shapes, {doc['total']['tensors']} compared")
        return
    out.print(escape(f"{doc['a']} vs {doc['b']} ({doc['architecture']['name']})"))
    for title, rows in ((doc["grouping"], doc["blocks"]), ("component", doc["components"])):
        table = Table(title=f"by {title}", title_justify="left")
        for col in (title, "tensors", "cosine", "rel. L2", "changed"):
            table.add_column(col, justify="left" if col == title else "right")
        for row in rows:
            table.add_row(escape(row["name"]), str(row["tensors"]), _num(row["cosine"], 5), _num(row["rel_l2"], 4),
                          f"{row['changed'] * 100:.1f}%")
        out.print(table)
    total = doc["total"]
    out.print(f"total: cosine {_num(total['cosine'], 5)}, relative L2 {_num(total['rel_l2'], 4)}, "
              f"{total['changed'] * 100:.1f}% of elements changed")
    for label, key in (("only in A", "only_in_a"), ("only in B", "only_in_b")):
        if doc[key]:
            out.print(escape(f"{label}: {len(doc[key])} keys, e.g. {doc[key][0]}"))
    if doc["shape_mismatch"]:
        first = doc["shape_mismatch"][0]
        out.print(escape(f"shape mismatches: {len(doc['shape_mismatch'])}, e.g. {first['key']} "
                         f"{tuple(first['a'])} vs {tuple(first['b'])}"))


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
