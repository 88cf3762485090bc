"""Reading sd-mecha 1.1's `.mecha` text (untrusted): instructions, `&N` references, literals,
each merge's parameters bound by sd-mecha's signatures. record/foreign/mecha.py turns the result
into a Mergefile or a lineage tree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Unexpressible

HEADER = "version 0.1.0"
MAX_LINES = 200_000
CONSTANTS = {"null": None, "true": True, "false": False}
BLOCK_CONVERSIONS = {"convert_sd1_blocks_to_ldm": "sd1-supermerger_blocks",
                     "convert_sdxl_blocks_to_sgm": "sdxl-supermerger_blocks"}
# positional parameters after the model inputs (sd-mecha 1.1's signatures), and their defaults
SIGNATURES = {
    "weighted_sum": (2, (("alpha", 0.5),)),
    "slerp": (2, (("alpha", 0.5),)),
    "add_difference": (2, (("alpha", 1.0),)),
    "subtract": (2, ()),
    "train_difference_mask": (3, (("alpha", 1.0),)),
    "fallback": (2, ()),
    "pick_component": (1, (("component", None),)),
    "cast": (1, (("device", None), ("dtype", None))),
    "n_average": (None, ()),
    "geometric_median": (None, (("eps", 1e-6), ("maxiter", 100), ("ftol", 1e-20))),
    "ties_sum": (None, (("k", 1.0), ("vote_sgn", False))),
    "model_stock": (None, (("cos_eps", 1e-6),)),
}


@dataclass
class Model:
    path: str
    config: str | None
    space: str | None
    line: int


@dataclass
class Literal:
    value: object
    config: str | None
    space: str | None
    line: int


@dataclass
class Merge:
    method: str
    args: list
    kwargs: dict
    line: int
    params: dict = field(default_factory=dict)  # bound by name (SIGNATURES)
    inputs: list = field(default_factory=list)


# --- reading (untrusted) ---------------------------------------------------------------------
def parse(text: str, where: str) -> list:
    """The results of a .mecha recipe's lines, in order; one line (InputError) if it is not one."""
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        raise InputError(f"{where}: {len(lines):,} lines: too long for a recipe")
    first = lines[0].strip().lstrip("\ufeff")
    if not first.startswith("version"):
        raise InputError(f"{where}: not an sd-mecha recipe (expected `{HEADER}` on line 1)")
    if first != HEADER:
        raise InputError(f"{where}: sd-mecha recipe {first!r}: this reader knows `{HEADER}` (sd-mecha 1.1)")
    results: list = []
    for number, line in enumerate(lines[1:], 2):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            results.append(_instruction(line, results, number))
        except ValueError as e:
            raise InputError(f"{where}: line {number}: {e}") from None
    if not results:
        raise InputError(f"{where}: the recipe is empty")
    return results


def _instruction(line: str, results: list, number: int):
    command, *tokens = _tokenize(line)
    args, kwargs = [], {}
    for token in tokens:
        if "=" in token and not token.startswith('"'):
            key, raw = token.split("=", 1)
            if not key.isidentifier():
                raise ValueError(f"{key!r} is not a parameter name")
            kwargs[key] = _value(raw, results)
        else:
            args.append(_value(token, results))
    if command == "dict":
        if args:
            raise ValueError("dict takes key=value pairs only")
        return dict(kwargs)
    if command == "literal":
        if len(args) != 1:
            raise ValueError("literal takes one value")
        return Literal(args[0], _text(kwargs.get("model_config")), _text(kwargs.get("merge_space")), number)
    if command == "model":
        if len(args) != 1 or not isinstance(args[0], str):
            raise ValueError("model takes a quoted path")
        return Model(args[0], _text(kwargs.get("model_config")), _text(kwargs.get("merge_space")), number)
    if command in ("merge", "call"):
        if not args or not isinstance(args[0], str):
            raise ValueError(f"{command} takes a quoted method name first")
        return Merge(args[0], args[1:], kwargs, number)
    raise ValueError(f"unknown command {command!r} (expected dict, literal, model or merge)")


def _text(value):
    return value if isinstance(value, str) else None


def _value(token: str, results: list):
    if token in CONSTANTS:
        return CONSTANTS[token]
    if token.startswith("&"):
        try:
            index = int(token[1:])
        except ValueError:
            raise ValueError(f"{token!r} is not a reference") from None
        if not 0 <= index < len(results):
            raise ValueError(f"reference {token} out of bounds (only earlier lines can be referenced)")
        return results[index]
    if token.startswith('"') and token.endswith('"') and len(token) >= 2:
        return token[1:-1]
    try:
        number = float(token) if ("." in token or "e" in token.lower()) else int(token)
    except ValueError:
        raise ValueError(f"{token[:40]!r} is not a value") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{token} is not a finite number")
    return number


def _tokenize(line: str) -> list[str]:
    """sd-mecha's tokenizer: spaces split, double quotes group, a backslash escapes one character."""
    tokens, current, prefix = [], [], []
    quoted = escaped = False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
            continue
        elif char == '"':
            quoted = not quoted
            if quoted:
                prefix, current = current, []
            else:
                tokens.append("".join(prefix) + '"' + "".join(current) + '"')
                current, prefix = [], []
            continue
        elif char == " " and not quoted:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("mismatched quotes")
    if current:
        tokens.append("".join(current))
    if not tokens:
        raise ValueError("empty instruction")
    return tokens


def bind(merge: Merge) -> None:
    """Name a merge's arguments by sd-mecha's signature: its model inputs, then its parameters."""
    arity, params = SIGNATURES.get(merge.method, (None, ()))
    args = list(merge.args)
    if arity is None:
        merge.inputs = args
        rest = []
    else:
        merge.inputs, rest = args[:arity], args[arity:]
    merge.params = {name: default for name, default in params}
    for (name, _), value in zip(params, rest):
        merge.params[name] = value
    for extra in rest[len(params):]:
        merge.params[f"#{len(merge.params)}"] = extra
    merge.params.update(merge.kwargs)


# --- parameter values ------------------------------------------------------------------------
def param_value(value):
    """A literal parameter: a number, string or flag; or a block table ({BASE: .., IN00: ..})."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Merge) and value.method == "convert_singleton" and len(value.args) == 1:
        return param_value(value.args[0])
    if isinstance(value, Merge) and value.method in BLOCK_CONVERSIONS and len(value.args) == 1:
        inner = value.args[0]
        if isinstance(inner, Literal) and isinstance(inner.value, dict):
            table = {k: param_value(v) for k, v in inner.value.items()}
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in table.values()):
                return BlockTable(table, value.method)
        raise Unexpressible(f"line {value.line}: block weights that are not numbers")
    if isinstance(value, Literal):
        inner = value.value
        if isinstance(inner, dict) and set(inner) == {"key"}:
            return param_value(inner["key"])
        if not isinstance(inner, dict):
            return param_value(inner)
        raise Unexpressible(f"line {value.line}: a literal of {value.config or 'keys'} (per-key values)")
    line = getattr(value, "line", "?")
    raise Unexpressible(f"line {line}: a parameter computed by {getattr(value, 'method', 'a model')}")


@dataclass
class BlockTable:
    blocks: dict
    conversion: str
