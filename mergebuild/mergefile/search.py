"""Open search ranges in a Mergefile, for `mergebuild tune`.

Any numeric parameter, or one block of a block table, may be a range instead of a value:
    alpha = { search = [0.0, 1.0] }                    continuous
    alpha = { search = [0.0, 1.0], step = 0.05 }       on a grid
    alpha = { search = [0.001, 1.0], log = true }      log scale
    alpha = { choice = [0.2, 0.5, 0.8] }               one of these
    alpha = { default = 0.5, IN05 = { search = [0.0, 1.0] } }
A plain build refuses a Mergefile with open ranges; `tune` fills them in trial by trial with
substitute(), which keeps the file's comments and formatting (tomlkit).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergebuild.errors import MergefileError

SEARCH_KEYS = {"search", "step", "log"}


@dataclass(frozen=True)
class Range:
    id: str  # "merges.mix.alpha" or "merges.mix.alpha.IN05"
    merge: str
    param: str
    block: str | None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()


def is_range(value) -> bool:
    return isinstance(value, dict) and ("search" in value or "choice" in value)


def check_range(path, where: str, field: str, value: dict) -> None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if "choice" in value:
        choices = value["choice"]
        if set(value) != {"choice"} or not isinstance(choices, list) or not choices or not all(number(c) for c in choices):
            raise MergefileError(path, where, field, "choice = [...] takes a non-empty list of numbers, alone")
        return
    unknown = set(value) - SEARCH_KEYS
    if unknown:
        raise MergefileError(path, where, field, f"unknown key {sorted(unknown)[0]!r} in a search range")
    bounds = value["search"]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(number(b) for b in bounds) and bounds[0] < bounds[1]):
        raise MergefileError(path, where, field, "search = [low, high] takes two numbers, low < high")
    step = value.get("step")
    if step is not None and not (number(step) and step > 0):
        raise MergefileError(path, where, f"{field}.step", "expected a number > 0")
    if not isinstance(value.get("log", False), bool) or (value.get("log") and bounds[0] <= 0):
        raise MergefileError(path, where, f"{field}.log", "log = true needs a boolean and low > 0")


def open_ranges(mf) -> list[Range]:
    """Every open range of a Mergefile parsed with allow_search=True, in file order."""
    out = []
    for name, merge in mf.merges.items():
        for param, value in merge.params.items():
            if is_range(value):
                out.append(_range(f"merges.{name}.{param}", name, param, None, value))
            elif isinstance(value, dict):
                for block, v in value.items():
                    if is_range(v):
                        out.append(_range(f"merges.{name}.{param}.{block}", name, param, block, v))
    return out


def _range(rid: str, merge: str, param: str, block: str | None, value: dict) -> Range:
    if "choice" in value:
        return Range(rid, merge, param, block, choices=tuple(value["choice"]))
    low, high = value["search"]
    return Range(rid, merge, param, block, low, high, value.get("step"), value.get("log", False))


def substitute(text: str, values: dict[str, float]) -> str:
    """The Mergefile text with each range (by Range.id) replaced by a value; comments and
    formatting are kept."""
    import tomlkit

    doc = tomlkit.parse(text)
    for rid, value in values.items():
        parts = rid.split(".")
        table = doc["merges"][parts[1]]
        if len(parts) == 3:
            table[parts[2]] = value
        else:
            table[parts[2]][parts[3]] = value
    return tomlkit.dumps(doc)
