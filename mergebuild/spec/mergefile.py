"""Parse and validate a Mergefile (TOML). Every error names the file, the table and the field.

The schema is the contract users' files rely on; docs/mergefile.md documents it.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from mergebuild.dtypes import OUTPUT_DTYPES, USER_DTYPES
from mergebuild.errors import MergefileError
from mergebuild.methods.registry import get_method, suggest
from mergebuild.spec.model import Mergefile, MergeSpec, ModelSpec, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_LEVEL = ("settings", "models", "merges")
SETTINGS_FIELDS = ("cache", "device", "compute_dtype", "keep_builds")
MODEL_FIELDS = ("path",)
MERGE_FIELDS = ("method", "inputs", "output", "dtype", "discard")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def load_mergefile(path: Path) -> Mergefile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergefileError(path, None, None, "no such Mergefile (use -f to name another)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MergefileError(path, None, None, f"cannot read: {e}") from None
    return parse_mergefile(text, path)


def parse_mergefile(text: str, path: Path) -> Mergefile:
    """Parse Mergefile text; `path` locates relative paths and names the file in errors."""
    path = Path(path).absolute()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MergefileError(path, None, None, f"invalid TOML: {e}") from None
    for key in doc:
        if key not in TOP_LEVEL:
            raise MergefileError(path, None, key, f"unknown table or key{_hint(key, TOP_LEVEL)}")
    base = path.parent
    settings = _settings(path, base, _table(path, doc, "settings"))
    models = {n: _model(path, base, n, t) for n, t in _named_tables(path, doc, "models").items()}
    merges = {n: _merge(path, base, n, t) for n, t in _named_tables(path, doc, "merges").items()}
    for name in models.keys() & merges.keys():
        raise MergefileError(path, f"merges.{name}", None, f"the name {name!r} is also a model")
    if not merges:
        raise MergefileError(path, "merges", None, "the Mergefile has no merges")
    _check_inputs(path, models, merges)
    _check_outputs(path, models, merges)
    return Mergefile(path, settings, models, merges)


def _table(path, doc, key) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise MergefileError(path, None, key, "must be a table")
    return value


def _named_tables(path, doc, key) -> dict[str, dict]:
    tables = _table(path, doc, key)
    for name, value in tables.items():
        if not isinstance(value, dict):
            raise MergefileError(path, f"{key}.{name}", None, "must be a table")
        if not NAME.match(name):
            raise MergefileError(path, f"{key}.{name}", None, "names use letters, digits, '_', '-' and '.'")
    return tables


def _settings(path, base: Path, table: dict) -> Settings:
    where = "settings"
    for key in table:
        if key not in SETTINGS_FIELDS:
            raise MergefileError(path, where, key, f"unknown setting{_hint(key, SETTINGS_FIELDS)}")
    cache = _string(path, where, "cache", table.get("cache", "cache"))
    device = _string(path, where, "device", table.get("device", "auto"))
    if not DEVICE.match(device):
        raise MergefileError(path, where, "device", f"{device!r} is not auto, cpu, cuda or cuda:N")
    compute = _string(path, where, "compute_dtype", table.get("compute_dtype", "float32"))
    if compute not in USER_DTYPES:
        raise MergefileError(path, where, "compute_dtype", f"{compute!r} is not one of {', '.join(USER_DTYPES)}")
    keep = table.get("keep_builds", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise MergefileError(path, where, "keep_builds", f"expected a whole number >= 1, got {keep!r}")
    return Settings(cache=base / cache, device=device, compute_dtype=compute, keep_builds=keep)


def _model(path, base: Path, name: str, table: dict) -> ModelSpec:
    where = f"models.{name}"
    for key in table:
        if key not in MODEL_FIELDS:
            raise MergefileError(path, where, key, f"unknown field{_hint(key, MODEL_FIELDS)}")
    if "path" not in table:
        raise MergefileError(path, where, "path", "missing: a model needs the path of its file")
    return ModelSpec(name, base / _string(path, where, "path", table["path"]))


def _merge(path, base: Path, name: str, table: dict) -> MergeSpec:
    where = f"merges.{name}"
    if "method" not in table:
        raise MergefileError(path, where, "method", "missing: which merge method to use")
    method_name = _string(path, where, "method", table["method"])
    method = get_method(method_name)
    if method is None:
        raise MergefileError(path, where, "method", f"unknown method {method_name!r}{suggest(method_name)}")
    inputs = table.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise MergefileError(path, where, "inputs", "expected a list of model or merge names")
    if not method.arity_ok(len(inputs)):
        raise MergefileError(path, where, "inputs", f"{method_name} takes {method.arity_text()}, got {len(inputs)}")
    output = table.get("output")
    output = base / _string(path, where, "output", output) if output is not None else None
    dtype = table.get("dtype")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise MergefileError(path, where, "dtype", f"{dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    discard = table.get("discard")
    if discard is not None:
        discard = _string(path, where, "discard", discard)
        try:
            re.compile(discard)
        except re.error as e:
            raise MergefileError(path, where, "discard", f"not a valid regular expression: {e}") from None
    params = {k: v for k, v in table.items() if k not in MERGE_FIELDS}
    _check_params(path, where, method, params)
    return MergeSpec(name, method_name, tuple(inputs), params, output, dtype, discard)


def _check_params(path, where: str, method, params: dict) -> None:
    known = [p.name for p in method.params]
    for key, value in params.items():
        param = method.param(key)
        if param is None:
            allowed = known + list(MERGE_FIELDS)
            raise MergefileError(path, where, key, f"unknown parameter of {method.name}{_hint(key, allowed)}")
        if not param.accepts(value):
            raise MergefileError(path, where, key, f"expected {param.describe()}, got {value!r}")
    for param in method.params:
        if param.required and param.name not in params:
            raise MergefileError(path, where, param.name, f"missing: {method.name} needs {param.name}")


def _check_inputs(path, models: dict, merges: dict) -> None:
    names = list(models) + list(merges)
    for merge in merges.values():
        for name in merge.inputs:
            if name not in models and name not in merges:
                raise MergefileError(
                    path, f"merges.{merge.name}", "inputs", f"unknown model or merge {name!r}{_hint(name, names)}"
                )


def _check_outputs(path, models: dict, merges: dict) -> None:
    seen: dict[Path, str] = {m.path.resolve(): f"models.{n}" for n, m in models.items()}
    for merge in merges.values():
        if merge.output is None:
            continue
        out = merge.output.resolve()
        if out in seen:
            raise MergefileError(path, f"merges.{merge.name}", "output", f"{merge.output} is also [{seen[out]}]")
        seen[out] = f"merges.{merge.name}"


def _string(path, table: str, field: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise MergefileError(path, table, field, f"expected a non-empty string, got {value!r}")
    return value


def _hint(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
