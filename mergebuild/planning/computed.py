"""Computed sources: a Fisher computed from data is a statistic node of the plan (statistics.py).

`[models.ft1_fisher] fisher_of = "ft1"` becomes the node `ft1_fisher`, read by merges like any
model: its tensors are the Fisher of every floating-point tensor of ft1 (float32, same names and
shapes), computed by methods/fisher_data.py only when its key changes. The key holds the
statistic's name and version, `samples`, `loss` and `batches` as written, the compute dtype,
the digest of every tensor of ft1, and either the user's `version` or the digest of every script
file: the two scripts and, walked through their imports, each module they import that resolves
to a file under the Mergefile's folder (the scripts' own folder first, then the Mergefile's).
Installed packages are not part of it. Planning reads the scripts as text (ast), never runs them.
"""

from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

from mergebuild.dtypes import is_float
from mergebuild.errors import InputError
from mergebuild.methods.fisher_data import NAME, VERSION, diagonal_fisher
from mergebuild.methods.registry import PlannedStatistic
from mergebuild.mergefile.model import ModelSpec, ScriptFunction
from mergebuild.mergefile.scripts import MAX_SCRIPT, bound_names, parse_script, script_digests
from mergebuild.planning.statistics import StatisticTask


def plan_fisher(plan, spec: ModelSpec) -> StatisticTask:
    """The statistic node of a computed Fisher source (its model is planned before it)."""
    fisher, where = spec.fisher, f"models.{spec.name}"
    root = plan.mergefile.path.parent.resolve()
    model = plan.sources[fisher.of]
    files: dict[Path, str] = {}
    for field, fn in (("loss", fisher.loss), ("batches", fisher.batches)):
        tree = _parse(fn.path, where, field)
        _check_defined(tree, fn, where, field)
        script_digests(fn.path, tree, root, files)
    names = list(model.tensors)
    floats = [n for n in names if is_float(model.tensors[n].dtype)]
    if not floats:
        raise InputError(f"[{where}] fisher_of: {fisher.of} holds no floating-point tensor to compute a Fisher of")
    data = {"version": fisher.version} if fisher.version is not None else \
        {f"script:{_label(p, root)}": digest for p, digest in sorted(files.items())}
    folders = list(dict.fromkeys([fisher.loss.path.parent.resolve(), fisher.batches.path.parent.resolve(), root]))
    compute = partial(diagonal_fisher, names=names, floats=floats, where=where, loss_path=fisher.loss.path,
                      batches_path=fisher.batches.path, folders=folders, local=list(files))
    stat = PlannedStatistic(NAME, VERSION, compute, tuple((0, n) for n in names),
                            {n: ("F32", tuple(model.tensors[n].shape)) for n in floats},
                            {"samples": fisher.samples, "loss": fisher.loss.text, "batches": fisher.batches.text},
                            data)
    return StatisticTask(spec.name, "", stat, tuple((fisher.of, n) for n in names), inputs=(fisher.of,),
                         where=where)


def fisher_node(spec: ModelSpec, stat: StatisticTask) -> dict:
    """The recipe node of a computed source: what the Mergefile says, and what its key holds."""
    fisher = spec.fisher
    node = {"kind": "fisher", "inputs": [fisher.of], "statistic": {"name": stat.spec.name, "version": stat.spec.version},
            "loss": fisher.loss.text, "batches": fisher.batches.text, "samples": fisher.samples}
    if fisher.version is not None:
        node["version"] = fisher.version
    else:
        node["scripts"] = {k.removeprefix("script:"): v for k, v in stat.spec.data.items()}
    return node


def _parse(path: Path, where: str, field: str) -> ast.Module:
    try:
        if not path.is_file():
            raise FileNotFoundError
        if path.stat().st_size > MAX_SCRIPT:
            raise InputError(f"[{where}] {field}: {path} is larger than {MAX_SCRIPT >> 20} MB: not a script")
        return parse_script(path)
    except FileNotFoundError:
        raise InputError(f"[{where}] {field}: script not found: {path}") from None
    except (OSError, ValueError) as e:  # a folder, unreadable, NUL bytes
        raise InputError(f"[{where}] {field}: cannot read {path}: {e}") from None
    except SyntaxError as e:
        raise InputError(f"[{where}] {field}: {path.name} line {e.lineno}: syntax error: {e.msg}") from None


def _check_defined(tree: ast.Module, fn: ScriptFunction, where: str, field: str) -> None:
    """The function is bound at the script's top level: a def, an assignment or an import."""
    if fn.function not in bound_names(tree):
        defined = sorted(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        known = f" (it defines {', '.join(defined)})" if defined else ""
        raise InputError(f"[{where}] {field}: {fn.path.name} defines no function {fn.function!r}{known}")


def _label(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a script outside the Mergefile's folder
        return str(path)


def describe_computed(stat: StatisticTask) -> dict:
    """What -n -v, explain and --json say of a computed source: its state and what its key holds."""
    params = stat.spec.params
    scripts = sorted(k.removeprefix("script:") for k in stat.spec.data if k.startswith("script:"))
    return {"name": stat.node, "kind": "fisher", "of": stat.inputs[0], "state": stat.state,
            "samples": params["samples"], "loss": params["loss"], "batches": params["batches"],
            "reads": len(stat.reads), "scripts": scripts, **({"version": stat.spec.data["version"]}
                                                             if "version" in stat.spec.data else {})}


def computed_line(doc: dict) -> str:
    """One line of -n -v / explain: `ft1_fisher (the Fisher of ft1): dirty, ...`."""
    key = f"version {doc['version']!r}" if "version" in doc else f"{len(doc['scripts'])} script files"
    return (f"{doc['name']} (the Fisher of {doc['of']}): {doc['state']}; {doc['samples']} batches of "
            f"{doc['batches']}, loss {doc['loss']}; key: {doc['of']}'s {doc['reads']} tensors, {key}")
