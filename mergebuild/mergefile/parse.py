"""Parse and validate a Mergefile (TOML). Every error names the file, the table and the field.

The schema is the contract users' files rely on; docs/mergefile.md documents it.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from mergebuild.dtypes import COMPUTE_DTYPES, OUTPUT_DTYPES
from mergebuild.errors import MergefileError
from mergebuild.portable import WINDOWS
from mergebuild.methods.registry import get_method, suggest
from mergebuild.layouts.blocks import PRESETS, block_name_examples, is_block_name
from mergebuild.mergefile.computed import check_computed, fisher_model, is_computed
from mergebuild.mergefile.model import MODEL_SUFFIXES, Mergefile, MergeSpec, ModelSpec, Rule, Settings, never_copied
from mergebuild.mergefile.search import check_range, is_range
from mergebuild.mergefile.vocab_fields import vocab_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_LEVEL = ("settings", "models", "merges", "tune", "soup")
SETTINGS_FIELDS = ("cache", "device", "compute_dtype", "keep_builds", "time_embed", "staging", "cache_limit",
                   "copy_metadata", "remote_cache", "remote_options")
MODEL_FIELDS = ("path",)
MERGE_FIELDS = ("method", "inputs", "output", "dtype", "discard", "rules", "include", "exclude", "clip_to_inputs",
                "fix_clip_position_ids", "shard_size", "vocab", "tokenizer_source")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)\s*$", re.IGNORECASE)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
RULE_FIELDS = ("blocks", "match", "regex", "not")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_COUNT = 10**6  # keep_builds and the like: more is a typo, not a wish
MAX_SIZE = 2**62  # bytes: sizes must fit the index's integers
MAX_PATH = 4096
DRIVE = re.compile(r"^[A-Za-z]:/")
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
WINDOWS_FORBIDDEN = set('<>:"|?*')


def load_mergefile(path: Path, allow_search: bool = False) -> Mergefile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergefileError(path, None, None, "no such Mergefile (use -f to name another)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MergefileError(path, None, None, f"cannot read: {e}") from None
    return parse_mergefile(text, path, allow_search)


def parse_mergefile(text: str, path: Path, allow_search: bool = False) -> Mergefile:
    """Parse Mergefile text; `path` locates relative paths and names the file in errors.
    allow_search: accept open search ranges (for `mergebuild tune`)."""
    path = Path(path).absolute()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MergefileError(path, None, None, f"invalid TOML: {e}") from None
    except RecursionError:
        raise MergefileError(path, None, None, "invalid TOML: nested too deeply") from None
    for key in doc:
        if key not in TOP_LEVEL:
            raise MergefileError(path, None, key, f"unknown table or key{_hint(key, TOP_LEVEL)}")
    base = path.parent
    _check_finite(path, "settings", _table(path, doc, "settings"))
    settings = _settings(path, base, _table(path, doc, "settings"))
    models = {n: _model(path, base, n, t) for n, t in _named_tables(path, doc, "models").items()}
    merges = {n: _merge(path, base, n, t, allow_search) for n, t in _named_tables(path, doc, "merges").items()}
    for name in models.keys() & merges.keys():
        raise MergefileError(path, f"merges.{name}", None, f"the name {name!r} is also a model")
    if not merges:
        raise MergefileError(path, "merges", None, "the Mergefile has no merges")
    check_computed(path, models)
    _check_inputs(path, models, merges)
    _check_outputs(path, models, merges)
    return Mergefile(path, settings, models, merges, _table(path, doc, "tune"), _table(path, doc, "soup"))


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
        raise MergefileError(path, where, "device", f"{device!r} is not auto, cpu, mps, cuda or cuda:N")
    compute = _string(path, where, "compute_dtype", table.get("compute_dtype", "float32"))
    if compute not in COMPUTE_DTYPES:
        raise MergefileError(path, where, "compute_dtype", f"{compute!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    keep = table.get("keep_builds", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= MAX_COUNT:
        raise MergefileError(path, where, "keep_builds", f"expected a whole number from 0 to {MAX_COUNT}, got {keep!r}")
    time_embed = table.get("time_embed", "IN00")
    if time_embed not in ("IN00", "BASE"):
        raise MergefileError(path, where, "time_embed", f"expected 'IN00' or 'BASE', got {time_embed!r}")
    staging = _size(path, where, "staging", table.get("staging", Settings.staging))
    limit = table.get("cache_limit")
    limit = _size(path, where, "cache_limit", limit) if limit is not None else None
    if device == "mps" and compute == "float64":
        raise MergefileError(path, where, "compute_dtype", "MPS (Apple silicon) has no float64: use float32 there, "
                             "or device = \"cpu\"")
    cache = _portable_name(path, where, "cache", _path(path, where, "cache", cache))
    copy = _copy_metadata(path, where, table.get("copy_metadata", True))
    remote, options = _remote(path, where, table)
    return Settings(cache=base / cache, device=device, compute_dtype=compute,
                    keep_builds=keep, time_embed=time_embed, staging=staging, cache_limit=limit,
                    copy_metadata=copy, remote_cache=remote, remote_options=options)


def _remote(path, where, table: dict) -> tuple[str | None, dict]:
    """remote_cache: an fsspec URL (s3://bucket/prefix, file:///shared/folder); remote_options:
    a table its file system takes. Errors never show the URL's user:password@."""
    url = table.get("remote_cache")
    if url is not None and (not isinstance(url, str) or "://" not in url or not url.split("://", 1)[1].strip("/")):
        shown = re.sub(r"://[^/@]*@", "://***@", url) if isinstance(url, str) else url
        raise MergefileError(path, where, "remote_cache", "expected a URL such as \"s3://bucket/prefix\" or "
                             f"\"file:///shared/folder\", got {shown!r}")
    options = table.get("remote_options", {})
    if not isinstance(options, dict):
        raise MergefileError(path, where, "remote_options", "expected a table, such as "
                             "{ endpoint_url = \"http://127.0.0.1:9000\" }")
    return url, options


def _copy_metadata(path, where, value) -> bool | tuple[str, ...]:
    """true, false, or a list of metadata keys."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise MergefileError(path, where, "copy_metadata", f"expected true, false or a list of metadata keys, "
                             f"got {value!r}")
    for key in value:
        why = never_copied(key)
        if why:
            raise MergefileError(path, where, "copy_metadata", f"{key!r} {why}: it is never copied from the inputs")
    return tuple(dict.fromkeys(value))


def _model(path, base: Path, name: str, table: dict) -> ModelSpec:
    where = f"models.{name}"
    if is_computed(table):  # a Fisher computed from data (mergefile/computed.py)
        return fisher_model(path, base, name, table, _hint)
    for key in table:
        if key not in MODEL_FIELDS:
            raise MergefileError(path, where, key, f"unknown field{_hint(key, MODEL_FIELDS)}")
    if "path" not in table:
        raise MergefileError(path, where, "path", "missing: a model needs the path of its file")
    return ModelSpec(name, base / _path(path, where, "path", _string(path, where, "path", table["path"])))


def _merge(path, base: Path, name: str, table: dict, allow_search: bool = False) -> MergeSpec:
    where = f"merges.{name}"
    if "method" not in table:
        raise MergefileError(path, where, "method", "missing: which merge method to use")
    _check_finite(path, where, table)
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
    output = base / _output(path, where, _string(path, where, "output", output)) if output is not None else None
    dtype = table.get("dtype")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise MergefileError(path, where, "dtype", f"{dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    discard = table.get("discard")
    if discard is not None:
        discard = _string(path, where, "discard", discard)
        _compile(path, where, "discard", discard)
    params = {k: v for k, v in table.items() if k not in MERGE_FIELDS}
    _check_params(path, where, method, params, allow_search)
    _check_counts(path, where, method, params, len(inputs))
    rules = tuple(_rule(path, f"{where}.rules", i, method, r) for i, r in enumerate(_list(path, where, "rules", table.get("rules", []))))
    include = _patterns(path, where, "include", table.get("include"))
    exclude = _patterns(path, where, "exclude", table.get("exclude"))
    clip, fix_ids = (_flag(path, where, table, f) for f in ("clip_to_inputs", "fix_clip_position_ids"))
    shard_size = _size(path, where, "shard_size", table.get("shard_size", "5GB"))
    vocab, tokenizer_source = vocab_fields(path, where, table, inputs, method)
    return MergeSpec(name, method_name, tuple(inputs), params, output, dtype, discard, rules, include, exclude,
                     clip, fix_ids, shard_size, vocab=vocab, tokenizer_source=tokenizer_source)


def _size(path, where, field, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIZE:
        return value
    m = SIZE.match(value) if isinstance(value, str) else None
    size = int(float(m.group(1)) * UNITS[m.group(2).upper()]) if m else 0
    if not 0 < size <= MAX_SIZE:
        raise MergefileError(path, where, field, f"expected bytes or a size such as \"2GB\" (more than 0, at most "
                             f"{MAX_SIZE // 10**12:,} TB), got {value!r}")
    return size


def _path(path, where, field, value: str) -> str:
    """A file or folder name as users write it, made to mean the same on every system: `/` and
    `\\` both separate folders; a drive letter (C:/...) is absolute on Windows and an error
    elsewhere; no NUL characters, nothing absurdly long (the OS would refuse them with errors
    that name nothing)."""
    if "\x00" in value:
        raise MergefileError(path, where, field, "a path cannot contain a NUL character")
    value = value.replace("\\", "/")
    if DRIVE.match(value) or value.startswith("//"):
        if not WINDOWS:
            raise MergefileError(path, where, field, f"{value!r} is a Windows path (a drive letter or a network "
                                 "share); on this system write a path of this system, or one relative to the Mergefile")
    if len(value) > MAX_PATH or any(len(part) > 255 for part in Path(value).parts):
        raise MergefileError(path, where, field, f"the path is too long ({len(value)} characters)")
    return value


def _portable_name(path, where, field, value: str) -> str:
    """Files mergebuild creates must be creatable on every system: a Mergefile written on Linux
    must not fail on a friend's Windows machine. So names Windows reserves or refuses are
    refused everywhere."""
    for i, part in enumerate(value.split("/")):
        if part in ("", ".", "..") or (i == 0 and DRIVE.match(part + "/")):
            continue
        stem = part.split(".")[0].strip().upper()
        if stem in WINDOWS_RESERVED:
            raise MergefileError(path, where, field, f"{part!r}: Windows reserves the name {stem} (also CON, PRN, AUX, "
                                 "NUL, COM1-9, LPT1-9, with any extension); choose another")
        bad = sorted({c for c in part if c in WINDOWS_FORBIDDEN or ord(c) < 32})
        if bad:
            raise MergefileError(path, where, field, f"{part!r}: Windows does not allow {' '.join(map(repr, bad))} in a "
                                 "file name; choose another")
        if part.endswith((".", " ")):
            raise MergefileError(path, where, field, f"{part!r}: Windows drops a trailing dot or space from a name; "
                                 "choose another")
    return value


def _output(path, where, value: str) -> str:
    value = _portable_name(path, where, "output", _path(path, where, "output", value))
    suffix = Path(value).suffix.lower()
    if suffix in MODEL_SUFFIXES:
        raise MergefileError(path, where, "output", f"{value!r}: mergebuild writes safetensors; name the output "
                             f"{Path(value).stem}.safetensors (a name without a model-file suffix is a folder)")
    return value


def _check_finite(path, where: str, value, field: str = "") -> None:
    """NaN and infinity parse as TOML floats but are no parameter's value: refuse them here,
    before any compute, and before they can reach the metadata as non-JSON tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MergefileError(path, where, field or None, f"{value} is not a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_finite(path, where, item, f"{field}[{key}]" if isinstance(key, int) else
                      (f"{field}.{key}" if field else str(key)))


def _flag(path, where, table: dict, field: str) -> bool:
    value = table.get(field, False)
    if not isinstance(value, bool):
        raise MergefileError(path, where, field, f"expected true or false, got {value!r}")
    return value


def _list(path, where, field, value) -> list:
    if not isinstance(value, list):
        raise MergefileError(path, where, field, "expected a list (an array of tables: [[...rules]])")
    return value


def _rule(path, where: str, index: int, method, table) -> Rule:
    where = f"{where}[{index}]"
    if not isinstance(table, dict):
        raise MergefileError(path, where, None, "a rule is a table")
    params = {k: v for k, v in table.items() if k not in RULE_FIELDS}
    if not params:
        raise MergefileError(path, where, None, "the rule sets no parameter")
    for key, value in params.items():
        param = method.param(key)
        if param is None or not param.numeric:
            raise MergefileError(path, where, key, f"not a numeric parameter of {method.name}")
        if not param.accepts(value):
            raise MergefileError(path, where, key, f"expected {param.describe()}, got {value!r}")
    blocks = table.get("blocks")
    if blocks is not None:
        blocks = _string(path, where, "blocks", blocks)
        for word in blocks.replace(",", " ").replace("-", " ").split():
            if not is_block_name(word):
                raise MergefileError(path, where, "blocks", f"{word!r} is not a block name ({block_name_examples()})")
    match = table.get("match", [])
    match = [match] if isinstance(match, str) else match
    if not isinstance(match, list) or not all(isinstance(m, str) and m for m in match):
        raise MergefileError(path, where, "match", "expected a substring or a list of substrings")
    regex = table.get("regex")
    if regex is not None:
        _compile(path, where, "regex", _string(path, where, "regex", regex))
    negate = table.get("not", False)
    if not isinstance(negate, bool):
        raise MergefileError(path, where, "not", f"expected true or false, got {negate!r}")
    return Rule(params, blocks, tuple(match), regex, negate)


def _patterns(path, where, field, value) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise MergefileError(path, where, field, "expected a regular expression or a list of them")
    for v in values:
        _compile(path, where, field, v)
    return tuple(values)


MAX_PATTERN = 100_000  # characters: a regular expression longer than this is a mistake (and slow to compile)


def _compile(path, where, field, pattern: str):
    if len(pattern) > MAX_PATTERN:
        raise MergefileError(path, where, field, f"the regular expression is {len(pattern):,} characters long "
                             f"(at most {MAX_PATTERN:,})")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise MergefileError(path, where, field, f"not a valid regular expression: {e}") from None


def _check_params(path, where: str, method, params: dict, allow_search: bool = False) -> None:
    known = [p.name for p in method.params]
    for key, value in params.items():
        param = method.param(key)
        if param is None:
            allowed = known + list(MERGE_FIELDS)
            raise MergefileError(path, where, key, f"unknown parameter of {method.name}{_hint(key, allowed)}")
        if param.numeric:
            _check_ranges(path, where, key, value, allow_search)
        if is_range(value) or (isinstance(value, str) and value in param.words):
            continue
        if param.numeric and not isinstance(value, (int, float)):
            _check_varying(path, where, key, param, value)
        elif param.check is not None and param.check(value) is not None:  # a structured value: where it is wrong
            inner, message = param.check(value)
            raise MergefileError(path, where, key + inner, message)
        elif not param.accepts(value):
            raise MergefileError(path, where, key, f"expected {param.describe()}, got {value!r}")
    for param in method.params:
        if param.required and param.name not in params:
            raise MergefileError(path, where, param.name, f"missing: {method.name} needs {param.name}")


def _check_counts(path, where: str, method, params: dict, inputs: int) -> None:
    """A list with one value per input model must have as many values (else the build would
    fail halfway, after hours of other merges)."""
    for p in method.params:
        value = params.get(p.name)
        if p.count is not None and isinstance(value, list) and value and len(value) != p.count(inputs):
            raise MergefileError(path, where, p.name, f"{len(value)} values for {p.count(inputs)} "
                                 f"{'model' if p.count(inputs) == 1 else 'models'} ({p.doc})")


def _check_ranges(path, where: str, key: str, value, allow_search: bool) -> None:
    """Open search ranges ({ search = [lo, hi] }, { choice = [...] }) are for `mergebuild tune`."""
    found = [(key, value)] if is_range(value) else []
    if isinstance(value, dict) and not found:
        found = [(f"{key}.{k}", v) for k, v in value.items() if is_range(v)]
    for field, spec in found:
        if not allow_search:
            raise MergefileError(path, where, field, "an open search range: run `mergebuild tune` to search it, "
                                 "or give a value")
        check_range(path, where, field, spec)


def _check_varying(path, where: str, key: str, param, value) -> None:
    """A numeric parameter that varies by block or layer: a table, a list, or a preset name."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(value, str):
        if value not in PRESETS:
            raise MergefileError(path, where, key, f"expected {param.describe()} (or a block table, a list, "
                                 f"a preset: {', '.join(PRESETS)}), got {value!r}")
    elif isinstance(value, list):
        if not all(number(v) for v in value):
            raise MergefileError(path, where, key, "a block list holds numbers only")
    elif isinstance(value, dict):
        for name, v in value.items():
            if name == "gradient":
                if not (isinstance(v, list) and len(v) >= 2 and all(number(x) for x in v)):
                    raise MergefileError(path, where, f"{key}.gradient", "expected a list of two or more numbers")
            elif name == "component" and "gradient" in value:  # which stack of layers it spans (a VLM's)
                if not isinstance(v, str) or not v:
                    raise MergefileError(path, where, f"{key}.component", f"expected a component name, got {v!r}")
            elif name == "default" or is_block_name(name):
                if is_range(v):
                    continue  # checked by _check_ranges
                if not number(v):
                    raise MergefileError(path, where, f"{key}.{name}", f"expected a number, got {v!r}")
            else:
                raise MergefileError(path, where, f"{key}.{name}",
                                     f"not a block name ({block_name_examples()}), default or gradient")
    else:
        raise MergefileError(path, where, key, f"expected {param.describe()}, a block table, a list or a preset, got {value!r}")


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
    import difflib  # for a misspelt name only

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
