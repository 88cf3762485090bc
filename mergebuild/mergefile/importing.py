"""A Mergefile drafted from another tool's recipe, written as TOML with comments.

The readers of foreign recipes (record/foreign/) fill a Draft: models, merges, their values, and
for each value a note saying where it came from. `render` writes it as Mergefile text, every
note a TOML comment, and what could not be expressed listed at the top; `check` parses the text
back with the Mergefile's own parser, so a draft that would not load is caught here, not by the
user's first build. Nothing here reads a file.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.errors import InputError, MergefileError
from mergebuild.mergefile.parse import NAME, parse_mergefile

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_NAME = 80
NOTE_WIDTH = 100  # a note longer than this goes on its own line(s) above the value


class Unexpressible(Exception):
    """A part of a recipe a Mergefile cannot say; the message says what and why."""


@dataclass
class Value:
    """A value written into the Mergefile, and where it came from."""

    value: object
    note: str = ""


@dataclass
class DraftRule:
    params: dict[str, object]
    match: list[str] = field(default_factory=list)
    regex: str | None = None
    blocks: str | None = None
    negate: bool = False
    note: str = ""


@dataclass
class DraftModel:
    path: str  # as written: relative to the Mergefile's folder, or absolute
    note: str = ""
    comments: list[str] = field(default_factory=list)


@dataclass
class DraftMerge:
    method: Value
    inputs: Value  # a list of names
    fields: dict[str, Value] = field(default_factory=dict)  # parameters and merge fields, in order
    rules: list[DraftRule] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)


@dataclass
class Draft:
    source: str  # what was imported: "mergekit YAML merge.yml"
    base: Path  # the folder the Mergefile will be in: relative paths are relative to it
    header: list[str] = field(default_factory=list)
    settings: dict[str, Value] = field(default_factory=dict)
    models: dict[str, DraftModel] = field(default_factory=dict)
    merges: dict[str, DraftMerge] = field(default_factory=dict)
    unexpressed: list[str] = field(default_factory=list)  # left out or approximated
    differences: list[str] = field(default_factory=list)  # expressed, with numbers known to differ
    missing: list[str] = field(default_factory=list)  # parents that were not found
    recorded: bool = False  # the values are a file's own record (see check)
    _names: set[str] = field(default_factory=set)

    def name(self, wanted: str) -> str:
        """A fresh model or merge name made from `wanted` (a file stem, a stage name)."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(wanted)).strip("._-")[:MAX_NAME] or "model"
        if not NAME.match(name):
            name = "_" + name
        candidate, i = name, 2
        while candidate.lower() in self._names:
            candidate, i = f"{name}-{i}", i + 1
        self._names.add(candidate.lower())
        return candidate

    def release(self, name: str) -> None:
        """Free a name given by `name` (its holder is renamed)."""
        self._names.discard(name.lower())

    def path_text(self, path: Path) -> str:
        """A path as the Mergefile should hold it: relative to its folder when inside it."""
        path = Path(os.path.abspath(path))
        try:
            return path.relative_to(Path(os.path.abspath(self.base))).as_posix()
        except ValueError:
            return path.as_posix()

    def setting(self, key: str, value, note: str) -> None:
        """A [settings] value; a second, different one for the same key is listed as not expressible."""
        old = self.settings.get(key)
        if old is not None and old.value != value:
            self.unexpressed.append(f"[settings] {key}: {value!r} wanted too ({note}), but one Mergefile has one "
                                    f"value; {old.value!r} is kept")
            return
        if old is None:
            self.settings[key] = Value(value, note)


# --- writing ---------------------------------------------------------------------------------
def render(draft: Draft) -> str:
    out: list[str] = []
    out += _comment_lines(f"A Mergefile imported by `mergebuild import` from {draft.source}.")
    for line in draft.header:
        out += _comment_lines(line)
    out += _comment_lines("Each value's comment says where it came from (docs/import.md says what maps to what).")
    for title, items in (("Not expressible here (left out, or approximated as said):", draft.unexpressed),
                         ("Expressed, but the numbers differ from the original tool's:", draft.differences),
                         ("Parents not found (their paths are placeholders: find the files, then import again "
                          "with --models DIR):", draft.missing)):
        if items:
            out.append("#")
            out += _comment_lines(title)
            for item in items:
                out += _comment_lines(f"  - {item}", "#     ")
    if draft.settings:
        out += ["", "[settings]"]
        out += [_assign(k, v) for k, v in draft.settings.items()]
    for name, model in draft.models.items():
        out.append("")
        for c in model.comments:
            out += _comment_lines(c)
        out.append(f"[models.{_key(name)}]")
        out.append(_assign("path", Value(model.path, model.note)))
    for name, merge in draft.merges.items():
        out.append("")
        for c in merge.comments:
            out += _comment_lines(c)
        out.append(f"[merges.{_key(name)}]")
        out.append(_assign("method", merge.method))
        out.append(_assign("inputs", merge.inputs))
        out += [_assign(k, v) for k, v in merge.fields.items()]
        for rule in merge.rules:
            out.append("")
            if rule.note:
                out += _comment_lines(rule.note)
            out.append(f"[[merges.{_key(name)}.rules]]")
            for k, v in (("blocks", rule.blocks), ("match", rule.match[0] if len(rule.match) == 1 else rule.match),
                         ("regex", rule.regex), ("not", rule.negate)):
                if v:
                    out.append(_assign(k, Value(v)))
            out += [_assign(k, Value(v)) for k, v in rule.params.items()]
    return "\n".join(out).lstrip("\n") + "\n"


def check(text: str, path: Path, recorded: bool = False) -> None:
    """Parse the rendered text as a Mergefile, so that what would not load is caught here, before
    the file is written. recorded: the values come as a file's metadata records them (mergebuild's
    own recipe), so a value this mergebuild refuses is the recipe's, not the importer's."""
    try:
        parse_mergefile(text, path)
    except MergefileError as e:
        why = e.args[0].split(": ", 1)[-1]
        if recorded:
            raise InputError(f"the recipe it records does not make a Mergefile this mergebuild accepts: {why}") from None
        raise InputError(f"mergebuild import wrote a Mergefile that does not load (a bug: please report it with "
                         f"the recipe): {why}") from None


def _assign(key: str, value: Value) -> str:
    line = f"{_key(key)} = {toml_value(value.value)}"
    note = _one_line(value.note)
    if not note:
        return line
    if len(line) + len(note) + 4 <= NOTE_WIDTH or len(note) <= 40:
        return f"{line}  # {note}"
    return "\n".join(_comment_lines(note) + [line])


def _comment_lines(text: str, continuation: str | None = None) -> list[str]:
    """Wrapped comment lines; newlines and control characters of untrusted text become spaces,
    so nothing a recipe holds can leave the comment."""
    lead = len(text) - len(text.lstrip(" "))
    first = "# " + " " * lead
    prefix, rest = first, continuation or first
    lines, current = [], ""
    for word in _one_line(text).split():
        if current and len(prefix) + len(current) + 1 + len(word) > NOTE_WIDTH:
            lines.append(prefix + current)
            current, prefix = word, rest
        else:
            current = f"{current} {word}" if current else word
    lines.append((prefix + current).rstrip())
    return lines


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "\u2028\u2029" else " " for c in str(text)).strip()


def _key(key: str) -> str:
    return key if BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise InputError(f"{text.encode('utf-8', 'replace').decode()!r}: not valid text (an undecodable file name?)")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"{value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise InputError(f"cannot write {type(value).__name__} value {value!r} into a Mergefile")
