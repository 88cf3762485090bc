"""The [tune] and [soup] tables of a Mergefile, validated. Every error names the table and the
field (MergefileError, exit code 2). See ../../docs/tune.md."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import MergefileError
from mergebuild.methods.registry import get_method
from mergebuild.mergefile.model import Mergefile
from mergebuild.mergefile.search import Range

SAMPLERS = ("tpe", "random", "grid", "cmaes")
DIRECTIONS = ("maximize", "minimize")
SCORER_FIELDS = ("command", "python", "direction")
RAY_FIELDS = ("parallel", "cpus_per_trial", "gpus_per_trial")  # tune --ray: how the trials share the cluster
TUNE_FIELDS = ("target", "trials", "sampler", "seed", "timeout", *SCORER_FIELDS, *RAY_FIELDS)
SOUP_FIELDS = ("ingredients", "output", *SCORER_FIELDS)
DEFAULT_TRIALS = 20


@dataclass(frozen=True)
class ScorerSpec:
    """How to score an output: a shell command (the last number it prints on stdout) or a Python
    function `module:function` (called with the output's path, returns a number)."""

    folder: Path  # the Mergefile's folder: the command's working directory, on sys.path for python
    command: str | None = None
    python: str | None = None
    direction: str = "maximize"

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def better_or_equal(self, a: float, b: float) -> bool:
        return a >= b if self.maximize else a <= b

    def describe(self) -> str:
        return self.command if self.command is not None else f"python {self.python}"


@dataclass(frozen=True)
class TuneConfig:
    target: str
    output: Path
    scorer: ScorerSpec
    trials: int = DEFAULT_TRIALS
    sampler: str = "tpe"
    seed: int | None = None
    timeout: float | None = None
    parallel: int | None = None  # trials at once with --ray (None: as many as the cluster fits)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class SoupConfig:
    ingredients: tuple[str, ...]
    output: Path
    scorer: ScorerSpec


def tune_config(mf: Mergefile, ranges: list[Range]) -> TuneConfig:
    path, table, where = mf.path, mf.tune, "tune"
    if not table:
        raise MergefileError(path, where, None, "missing: `mergebuild tune` needs a [tune] table "
                             "(target, and command or python)")
    _known(path, where, table, TUNE_FIELDS)
    target = table.get("target")
    if not isinstance(target, str) or not target:
        raise MergefileError(path, where, "target", "missing: the merge whose output is scored")
    if target not in mf.merges:
        raise MergefileError(path, where, "target", f"{target!r} is not a merge{_hint(target, mf.merges)}")
    output = mf.merges[target].output
    if output is None:
        raise MergefileError(path, where, "target", f"[merges.{target}] has no output to score: give it one")
    trials = table.get("trials", DEFAULT_TRIALS)
    if not _int(trials) or trials < 1:
        raise MergefileError(path, where, "trials", f"expected a whole number >= 1, got {trials!r}")
    sampler = table.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise MergefileError(path, where, "sampler", f"expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    seed = table.get("seed")
    if seed is not None and not _int(seed):
        raise MergefileError(path, where, "seed", f"expected a whole number, got {seed!r}")
    timeout = table.get("timeout")
    if timeout is not None and not (_number(timeout) and timeout > 0):
        raise MergefileError(path, where, "timeout", f"expected seconds > 0, got {timeout!r}")
    if not ranges:
        raise MergefileError(path, "merges", None, "no open search range to tune: write a parameter as "
                             "{ search = [low, high] } or { choice = [...] }")
    _check_ranges(mf, ranges, target, sampler)
    return TuneConfig(target, output, _scorer(mf, where, table), trials, sampler, seed, timeout,
                      *_ray_fields(path, where, table))


def _ray_fields(path, where: str, table: dict) -> tuple:
    parallel = table.get("parallel")
    if parallel is not None and not (_int(parallel) and parallel >= 1):
        raise MergefileError(path, where, "parallel", f"expected a whole number >= 1, got {parallel!r}")
    resources = []
    for name, default in (("cpus_per_trial", 1.0), ("gpus_per_trial", 0.0)):
        value = table.get(name, default)
        if not (_number(value) and 0 <= value <= 1024) or (name == "cpus_per_trial" and value == 0):
            low = "> 0" if name == "cpus_per_trial" else ">= 0"
            raise MergefileError(path, where, name, f"expected a number {low} (a fraction shares one), got {value!r}")
        resources.append(float(value))
    return (parallel, *resources)


def soup_config(mf: Mergefile) -> SoupConfig:
    path, table, where = mf.path, mf.soup, "soup"
    if not table:
        raise MergefileError(path, where, None, "missing: `mergebuild tune --greedy-soup` needs a [soup] table "
                             "(ingredients, output, and command or python)")
    _known(path, where, table, SOUP_FIELDS)
    ingredients = table.get("ingredients")
    if not isinstance(ingredients, list) or len(ingredients) < 2 or not all(isinstance(i, str) for i in ingredients):
        raise MergefileError(path, where, "ingredients", "expected a list of two or more model names")
    for name in ingredients:
        if name not in mf.models:
            raise MergefileError(path, where, "ingredients", f"{name!r} is not a model{_hint(name, mf.models)}")
    if len(set(ingredients)) != len(ingredients):
        raise MergefileError(path, where, "ingredients", "a model is listed twice")
    output = table.get("output")
    if not isinstance(output, str) or not output:
        raise MergefileError(path, where, "output", "missing: the file to write the soup to")
    output = mf.path.parent / output
    taken = {m.path.resolve(): f"models.{n}" for n, m in mf.models.items()}
    taken.update({m.output.resolve(): f"merges.{n}" for n, m in mf.merges.items() if m.output is not None})
    if output.resolve() in taken:
        raise MergefileError(path, where, "output", f"{output} is also [{taken[output.resolve()]}]")
    return SoupConfig(tuple(ingredients), output, _scorer(mf, where, table))


def _scorer(mf: Mergefile, where: str, table: dict) -> ScorerSpec:
    path = mf.path
    command, python = table.get("command"), table.get("python")
    if (command is None) == (python is None):
        raise MergefileError(path, where, "command", "give exactly one scorer: command = \"python score.py "
                             "{output}\" or python = \"module:function\"")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise MergefileError(path, where, "command", f"expected a shell command, got {command!r}")
    if python is not None:
        module, _, function = python.partition(":") if isinstance(python, str) else ("", "", "")
        if not module or not function.isidentifier():
            raise MergefileError(path, where, "python", f"expected \"module:function\", got {python!r}")
    direction = table.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise MergefileError(path, where, "direction", f"expected maximize or minimize, got {direction!r}")
    return ScorerSpec(path.parent, command, python, direction)


def _check_ranges(mf: Mergefile, ranges: list[Range], target: str, sampler: str) -> None:
    from mergebuild.planning.graph import build_graph

    path = mf.path
    upstream = build_graph(mf).ancestors(target) | {target}
    if not any(r.merge in upstream for r in ranges):
        raise MergefileError(path, "tune", "target", f"no open search range reaches {target!r} "
                             f"(ranges in: {', '.join(sorted({r.merge for r in ranges}))})")
    for r in ranges:
        where, field = f"merges.{r.merge}", r.id.split(".", 2)[2]
        if r.choices:
            continue
        if r.log and r.step is not None:
            raise MergefileError(path, where, field, "a range takes step or log = true, not both")
        if param_kind(mf, r) is int and not all(_whole(v) for v in (r.low, r.high, r.step or 1)):
            raise MergefileError(path, where, field, "an integer parameter: bounds and step must be whole numbers")
        if sampler == "grid" and r.step is None and param_kind(mf, r) is not int:
            raise MergefileError(path, "tune", "sampler", f"grid needs a finite grid: give [{where}] {field} a step "
                                 "or a choice")
    if sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise MergefileError(path, "tune", "sampler", "cmaes needs the cmaes package: pip install cmaes")


def param_kind(mf: Mergefile, r: Range) -> type:
    """float or int: the kind of the method parameter a range stands for."""
    method = get_method(mf.merges[r.merge].method)
    param = method.param(r.param) if method is not None else None
    return int if param is not None and param.kind is int else float


def check_python_scorer(mf: Mergefile, scorer: ScorerSpec, where: str) -> None:
    """Import a python scorer once up front: a typo is a Mergefile error, not N failed trials."""
    if scorer.python is None:
        return
    from mergebuild.tune.scoring import load_function

    try:
        load_function(scorer)
    except Exception as e:  # noqa: BLE001 (any import error is the user's to fix)
        raise MergefileError(mf.path, where, "python", f"cannot load {scorer.python}: {type(e).__name__}: {e}") from None


def _known(path, where: str, table: dict, fields) -> None:
    for key in table:
        if key not in fields:
            raise MergefileError(path, where, key, f"unknown field{_hint(key, fields)}")


def _hint(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _whole(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
