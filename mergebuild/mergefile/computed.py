"""Computed sources in [models]: a table with `fisher_of` instead of `path` (docs/mergefile.md).

    [models.ft1_fisher]
    fisher_of = "ft1"              # a [models] table with a file
    loss = "train.py:loss"         # loss(state_dict, batch) -> a scalar tensor
    batches = "train.py:batches"   # batches() -> an iterable of batches
    samples = 64                   # how many batches the Fisher averages over
    version = "v2"                 # optional: stands for the scripts' content in the cache key

Only the fields are checked here (no file is opened): the scripts are read while planning
(planning/computed.py), run only when the Fisher must be computed (execute/computed.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from mergebuild.errors import MergefileError
from mergebuild.mergefile.model import FisherSpec, ModelSpec, ScriptFunction

FISHER_FIELDS = ("fisher_of", "loss", "batches", "samples", "version")
FUNCTION = re.compile(r"^(?P<file>[^:]+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
MAX_SAMPLES = 10**7


def is_computed(table: dict) -> bool:
    return "fisher_of" in table


def fisher_model(path: Path, base: Path, name: str, table: dict, hint) -> ModelSpec:
    """The ModelSpec of a computed Fisher source; `hint(key, choices)` words a typo's suggestion."""
    where = f"models.{name}"
    for key in table:
        if key not in FISHER_FIELDS:
            raise MergefileError(path, where, key, f"unknown field of a computed Fisher source{hint(key, FISHER_FIELDS)}")
    of = table["fisher_of"]
    if not isinstance(of, str) or not of:
        raise MergefileError(path, where, "fisher_of", f"expected the name of a [models] table, got {of!r}")
    loss = _function(path, base, where, "loss", table.get("loss"))
    batches = _function(path, base, where, "batches", table.get("batches"))
    samples = table.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= MAX_SAMPLES:
        raise MergefileError(path, where, "samples", f"expected how many batches to average over (1 to "
                             f"{MAX_SAMPLES:,}), got {samples!r}")
    version = table.get("version")
    if version is not None and (not isinstance(version, str) or not version.strip()):
        raise MergefileError(path, where, "version", f"expected a non-empty string, got {version!r}")
    return ModelSpec(name, loss.path, FisherSpec(of, loss, batches, samples, version))


def _function(path: Path, base: Path, where: str, field: str, value) -> ScriptFunction:
    if value is None:
        raise MergefileError(path, where, field, f"missing: \"script.py:function\" ({_role(field)})")
    m = FUNCTION.match(value) if isinstance(value, str) else None
    if m is None:
        raise MergefileError(path, where, field, f"expected \"script.py:function\" ({_role(field)}), got {value!r}")
    return ScriptFunction((base / m["file"].replace("\\", "/")).absolute(), m["name"], value)


def _role(field: str) -> str:
    return {"loss": "a function of a state dict and a batch returning a scalar loss",
            "batches": "a function returning an iterable of batches"}[field]


def check_computed(path: Path, models: dict[str, ModelSpec]) -> None:
    """Each Fisher source names a model with a file of its own."""
    for name, spec in models.items():
        if spec.fisher is None:
            continue
        of = spec.fisher.of
        if of not in models:
            raise MergefileError(path, f"models.{name}", "fisher_of", f"unknown model {of!r}{_close(of, models)}")
        if models[of].fisher is not None:
            raise MergefileError(path, f"models.{name}", "fisher_of", f"{of!r} is itself computed: a Fisher is "
                                 "computed from a model file")


def _close(name: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
