"""What `inspect` and `diff` print: one file's blocks, LoRA modules and metadata; two files
compared by block and component (render/console.py holds the consoles and the other commands')."""

from __future__ import annotations

from mergebuild.render import console
from mergebuild.render.console import escape, human_bytes, lineage_tree


def print_inspect(doc: dict) -> None:
    from rich.table import Table

    arch, lora = doc["architecture"], doc.get("lora")
    what = _lora_summary(lora) if lora else f"{arch['description']} ({arch['name']})"
    console.out.print(f"[bold]{escape(str(doc['path']))}[/]: {escape(what)}")
    totals = doc["totals"]
    dtypes = ", ".join(f"{k} {v}" for k, v in totals["dtypes"].items())
    console.out.print(f"{totals['tensors']} tensors, {totals['params']:,} parameters, {human_bytes(totals['bytes'])} "
                 f"({escape(dtypes)})")
    if doc.get("hashes"):
        h = doc["hashes"]
        console.out.print(f"AutoV1 {h['autov1']}  AutoV2 {h['autov2']}  sha256 {h['sha256']}")
        console.out.print(f"tensor data sha256 {h['tensor_data_sha256']}")
    if lora:
        _print_lora_rows(lora, doc["grouping"])
    else:
        table = Table(title="by " + doc["grouping"], title_justify="left")
        for col in (doc["grouping"], "tensors", "parameters", "size", "dtypes"):
            table.add_column(col, justify="left" if col in (doc["grouping"], "dtypes") else "right")
        for row in doc["blocks"]:
            table.add_row(escape(row["name"]), str(row["tensors"]), f"{row['params']:,}", human_bytes(row["bytes"]),
                          escape(", ".join(f"{k} {v}" for k, v in row["dtypes"].items())))
        console.out.print(table)
        comps = ", ".join(f"{k} {v['tensors']} tensors ({human_bytes(v['bytes'])})" for k, v in doc["components"].items())
        console.out.print(escape(f"components: {comps}"))
    if doc.get("lineage"):
        console.out.print("lineage:")
        console.out.print(lineage_tree({"kind": "model", "name": str(doc["path"]), "made_by": doc["lineage"]}))
    if doc["metadata"]:
        console.out.print("metadata:")
        for key in sorted(doc["metadata"]):  # recipes too, cut short: --json has them whole
            console.out.print(escape(_metadata_line(key, doc["metadata"][key])))


META_VALUE = 60  # most characters of a metadata value shown on its line


def _metadata_line(key: str, value: str) -> str:
    """'  key: value' on one line of the terminal; a long value (a recipe: thousands of
    characters) is cut, with its full length. One barely too long (a hash) is kept whole:
    cutting it would save less than the note of its length costs."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    room = max(24, min(META_VALUE, console.out.width - len(key) - 4))
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
    from rich.table import Table

    group = lora["target"].get("grouping", "block")
    table = Table(title=f"modules by {group}", title_justify="left")
    for col in (group, "modules", "tensors", "parameters", "size"):
        table.add_column(col, justify="left" if col == group else "right")
    for row in lora["blocks"]:
        table.add_row(escape(row["name"]), str(row["modules"]), str(row["tensors"]), f"{row['params']:,}",
                      human_bytes(row["bytes"]))
    console.out.print(table)
    comps = ", ".join(f"{k} {v['modules']} modules" for k, v in lora["components"].items())  # sizes: the table
    console.out.print(escape(f"components: {comps}"))
    if lora.get("name_styles"):
        console.out.print(escape("module names: " + ", ".join(f"{k} {v}" for k, v in lora["name_styles"].items())))
    if lora["unmatched"]:
        console.out.print(escape(f"{len(lora['unmatched'])} modules match no layer of an {lora['target']['name']} "
                         f"checkpoint, e.g. {lora['unmatched'][0]}"))
    if lora["stray_tensors"]:
        console.out.print(escape(f"{len(lora['stray_tensors'])} tensors belong to no LoRA module, "
                            f"e.g. {lora['stray_tensors'][0]}"))


def print_diff(doc: dict) -> None:
    from rich.table import Table

    if doc.get("mismatch"):  # no tables: their numbers would compare unlike things
        console.out.print(escape(f"{doc['a']} vs {doc['b']}: {doc['mismatch']}"))
        console.out.print(f"{len(doc['only_in_a'])} keys only in A, {len(doc['only_in_b'])} only in B, "
                  f"{len(doc['shape_mismatch'])} with other shapes, {doc['total']['tensors']} compared")
        return
    console.out.print(escape(f"{doc['a']} vs {doc['b']} ({doc['architecture']['name']})"))
    for title, rows in ((doc["grouping"], doc["blocks"]), ("component", doc["components"])):
        table = Table(title=f"by {title}", title_justify="left")
        for col in (title, "tensors", "cosine", "rel. L2", "changed"):
            table.add_column(col, justify="left" if col == title else "right")
        for row in rows:
            table.add_row(escape(row["name"]), str(row["tensors"]), _num(row["cosine"], 5), _num(row["rel_l2"], 4),
                          f"{row['changed'] * 100:.1f}%")
        console.out.print(table)
    total = doc["total"]
    console.out.print(f"total: cosine {_num(total['cosine'], 5)}, relative L2 {_num(total['rel_l2'], 4)}, "
              f"{total['changed'] * 100:.1f}% of elements changed")
    for label, key in (("only in A", "only_in_a"), ("only in B", "only_in_b")):
        if doc[key]:
            console.out.print(escape(f"{label}: {len(doc[key])} keys, e.g. {doc[key][0]}"))
    if doc["shape_mismatch"]:
        first = doc["shape_mismatch"][0]
        console.out.print(escape(f"shape mismatches: {len(doc['shape_mismatch'])}, e.g. {first['key']} "
                         f"{tuple(first['a'])} vs {tuple(first['b'])}"))


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
