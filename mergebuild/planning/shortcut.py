"""The per-merge short-circuit: a merge planned before, from the same recipe and the same inputs,
is not planned again tensor by tensor.

Planning a merge costs per tensor (its parameters, key, cache lookup): a 200-merge Mergefile
over SDXL-shaped models is ~500k tasks. But what planning makes of a merge is a function of its
Mergefile table, the settings, the identities of its inputs (planning/recipe.py: a source's is
its tensors' digests and metadata, a merge's everything upstream) and mergebuild's own code.
So once a merge is complete (every task cached or passed through), the outcome is remembered
under a hash of exactly those (`plan_key`): its recipe node and identity, what planning said
(warnings, notes, architecture) and its task table. The next plan restores it without reading
a tensor; the table itself is read only when something needs the tensors (a merge downstream
that is planned, the executor, explain).

What is not trusted from a summary, and checked where it matters (`settle`, after the outputs
are decided): that the tensors are still stored. A merge the build runs has its digests checked
against the cache (eviction, gc, `cache verify`); a missing one, or an output to write, plans
that merge again in full, exactly as without the short-circuit. A merge nothing runs needs no
bytes, so it needs no check: its output is current. --force, a vocabulary or a whole-model
statistic, and a table holding anything but plain values are always planned in full.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import zlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path, PurePath

from mergebuild import __version__
from mergebuild.layouts.blocks import architecture
from mergebuild.methods.parts import POSITION_IDS
from mergebuild.methods.registry import get_method
from mergebuild.planning.planner import (CACHED, PASSTHROUGH, MergePlan, Plan, TensorTask,
                                         _node, _plan_merge, resolve_keys)
from mergebuild.planning.recipe import node_identity
from mergebuild.store.hashing import text_digest
from mergebuild.store.index import Index

FORMAT = 1  # of a summary; a new format simply plans everything once
KEEP_PER_MERGE = 8  # summaries kept per merge name (a few recipes tried back and forth)


class _NotPlain(Exception):
    """A value a plan key cannot stand for (a user's script, an object): plan in full."""


def _plain(value):
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise _NotPlain(type(value).__name__)


@lru_cache(maxsize=1)
def code_stamp() -> str:
    """mergebuild's version and its code and data files as they are (any edit to the planner,
    a method or an architecture file plans everything once more)."""
    root = Path(__file__).resolve().parent.parent
    stamps = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith((".py", ".json")):
                st = os.stat(os.path.join(folder, name))
                stamps.append((os.path.relpath(os.path.join(folder, name), root), st.st_size, st.st_mtime_ns))
    return text_digest(json.dumps([__version__, sorted(stamps)]))


def plan_key(plan: Plan, name: str) -> str | None:
    """What planning `name` depends on, hashed; None: it must be planned in full."""
    mf = plan.mergefile
    spec = mf.merges[name]
    inputs = [plan.recipe.identities.get(i) for i in spec.inputs]
    methods = [(m.name, m.version) for m in (get_method(spec.method), get_method("copy"), POSITION_IDS) if m]
    if None in inputs:
        return None
    try:
        models = {i: _as_dict(plan, ("models", i), mf.models[i]) for i in spec.inputs if i in mf.models}
        doc = [FORMAT, code_stamp(), name, dataclasses.asdict(spec), _as_dict(plan, ("settings",), mf.settings), models,
               inputs, methods]
        return text_digest(json.dumps(doc, sort_keys=True, default=_plain))
    except (_NotPlain, TypeError, ValueError):
        return None


def _as_dict(plan: Plan, key: tuple, value) -> dict:
    """dataclasses.asdict of the settings or a model, once per plan (not once per merge)."""
    memo = plan.__dict__.setdefault("plan_key_docs", {})
    if key not in memo:
        memo[key] = dataclasses.asdict(value)
    return memo[key]


# --- restoring -------------------------------------------------------------------------------
class LazyTasks(Mapping):
    """A summarized merge's tasks, read from the index on first use (a no-op never reads them)."""

    def __init__(self, load, count: int):
        self._load, self._count, self._tasks = load, count, None

    @property
    def loaded(self) -> bool:
        return self._tasks is not None

    def _all(self) -> dict[str, TensorTask]:
        if self._tasks is None:
            self._tasks = self._load()
        return self._tasks

    def __getitem__(self, name: str) -> TensorTask:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return self._count if self._tasks is None else len(self._tasks)

    def __contains__(self, name) -> bool:
        return name in self._all()

    def keys(self):
        return self._all().keys()

    def values(self):
        return self._all().values()

    def items(self):
        return self._all().items()


@dataclasses.dataclass
class SummarizedMerge(MergePlan):
    """A merge restored from its summary: every task cached or passed through (as it was when
    remembered; `settle` checks the bytes of those a build runs)."""

    plan_key: str = ""
    method_count: int = 0

    def count(self, state: str) -> int:
        if self.tasks.loaded:
            return super().count(state)
        return {CACHED: self.method_count, PASSTHROUGH: len(self.tasks) - self.method_count}.get(state, 0)

    @property
    def method_tasks(self) -> int:
        return self.method_count


def restore(plan: Plan, name: str, cache, force: bool) -> bool:
    """Put `name`'s summary in the plan, if it has one for what the plan holds now."""
    if force:
        return False
    key = plan_key(plan, name)
    found = cache.index.plan_summary(key) if key is not None else None
    if found is None:
        return False
    identity, meta = found[0], json.loads(found[1])
    spec = plan.mergefile.merges[name]
    node = meta["node"]
    if identity != node_identity(name, node, [plan.recipe.identities[i] for i in node.get("inputs", [])]):
        return False
    arch = architecture(meta["arch"]) if meta["arch"] is not None else None
    if (meta["arch"] is not None and arch is None) or get_method(spec.method) is None:
        return False
    merge = SummarizedMerge(
        spec, get_method(spec.method), LazyTasks(lambda: _tasks(plan, name, cache, key), meta["tensors"]), arch=arch,
        arch_how=meta["arch_how"], warnings=meta["warnings"], notes=meta["notes"],
        output_metadata=meta["output_metadata"], block_sensitive=meta["block_sensitive"], identity=identity,
        config=meta["config"], adapter=meta["adapter"], plan_key=key, method_count=meta["method_tasks"])
    plan.merges[name] = merge
    plan.recipe.add(name, node)
    return True


def _tasks(plan: Plan, name: str, cache, key: str) -> dict[str, TensorTask]:
    try:
        rows = json.loads(zlib.decompress(_summary_tasks(cache, key)))
    except (TypeError, ValueError, zlib.error):  # pruned by another build since, or damaged: plan it
        merge = _plan_merge(plan, plan.mergefile.merges[name])
        resolve_keys(plan, merge, cache)
        return dict(merge.tasks)
    out = {}
    for tensor, dtype, shape, inputs, method, task_key, digest in rows:
        inputs = tuple((node, read or tensor) for node, read in inputs)
        if method is None:
            out[tensor] = TensorTask(tensor, dtype, tuple(shape), inputs, None, digest=digest, state=PASSTHROUGH)
        else:  # never computed from here: a task to compute is planned again (expand)
            out[tensor] = TensorTask(tensor, dtype, tuple(shape), inputs, _method(method), key=task_key,
                                     digest=digest, state=CACHED)
    return out


def _summary_tasks(cache, key: str) -> bytes | None:
    try:
        return cache.index.plan_summary_tasks(key)
    except sqlite3.ProgrammingError:  # the plan outlived its cache (mergebuild.plan): read them afresh
        index = Index(cache.index.path, readonly=True)
        try:
            return index.plan_summary_tasks(key)
        finally:
            index.close()


def _method(name: str):
    return POSITION_IDS if name == POSITION_IDS.name else get_method(name)


# --- remembering -----------------------------------------------------------------------------
def remember(plan: Plan, merge: MergePlan, cache) -> None:
    """Keep a fully planned merge's outcome, if it is complete and plain."""
    if isinstance(merge, SummarizedMerge) or cache.index.readonly or not _summarizable(merge):
        return
    done = plan.__dict__.setdefault("remembered", set())  # saved while planning: not again after the build
    key = plan_key(plan, merge.spec.name)
    if key is None or key in done:
        return
    done.add(key)
    rows = []
    for t in merge.tasks.values():
        inputs = [[node, "" if tensor == t.name else tensor] for node, tensor in t.inputs]
        rows.append([t.name, t.dtype, list(t.shape), inputs, t.method.name if t.method else None, t.key, t.digest])
    meta = {"node": plan.recipe.nodes[merge.spec.name], "arch": merge.arch.name if merge.arch else None,
            "arch_how": merge.arch_how, "warnings": merge.warnings, "notes": merge.notes,
            "output_metadata": merge.output_metadata, "block_sensitive": merge.block_sensitive,
            "config": merge.config, "adapter": merge.adapter, "tensors": len(merge.tasks),
            "method_tasks": merge.method_tasks}
    try:
        text = json.dumps(meta)  # in order: the node is written into outputs as it is
    except (TypeError, ValueError):
        return
    blob = zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 1)
    cache.index.save_plan_summary(key, merge.spec.name, merge.identity, text, blob, KEEP_PER_MERGE)


def remember_all(plan: Plan, cache) -> None:
    """After a build: every merge that came out complete."""
    for merge in plan.merges.values():
        remember(plan, merge, cache)


def _summarizable(merge: MergePlan) -> bool:
    if merge.vocab is not None or getattr(merge, "statistic", None) is not None or not merge.identity:
        return False
    architectures_known = merge.arch is None or architecture(merge.arch.name) is merge.arch
    if not architectures_known:
        return False
    for t in merge.tasks.values():
        if t.digest is None:
            return False
        if t.method is None:
            continue
        if t.state != CACHED or t.digest is None or t.key is None or _method(t.method.name) is not t.method:
            return False
    return True


# --- checking what a build runs --------------------------------------------------------------
def settle(plan: Plan, cache) -> None:
    """After the outputs are decided: a summarized merge the build runs keeps its summary only
    while every tensor it stands for is stored, and when it has no output to write; otherwise
    it is planned in full, as it would be without the short-circuit."""
    for name, merge in list(plan.merges.items()):
        if not isinstance(merge, SummarizedMerge) or not merge.needed:
            continue
        writes = merge.spec.output is not None and not merge.current
        digests = sorted({t.digest for t in merge.tasks.values() if t.method is not None})
        if writes or len(cache.has_many(digests)) != len(digests):
            expand(plan, name, cache)


def expand(plan: Plan, name: str, cache) -> MergePlan:
    """Plan a summarized merge in full, in place (its identity is the same: its inputs are)."""
    old = plan.merges[name]
    if not isinstance(old, SummarizedMerge):
        return old
    merge = _plan_merge(plan, old.spec)
    merge.identity = node_identity(name, _node(plan, merge), [plan.recipe.identities[i] for i in old.spec.inputs])
    if merge.identity != old.identity:
        raise AssertionError(f"merges.{name}: its summary does not describe it (identity {old.identity[:12]} "
                             f"vs {merge.identity[:12]})")
    resolve_keys(plan, merge, cache)
    merge.current, merge.needed, merge.stale_why = old.current, old.needed, old.stale_why
    plan.merges[name] = merge
    return merge
