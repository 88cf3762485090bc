"""Why a merge is dirty: compare what it is built from now with what it was last built from.

Like ninja's `-d explain` and snakemake's Reason: the planner decides *what* is dirty from cache
keys; this module only puts words on *why*, from the recipe each merge was last built with.
"""

from __future__ import annotations

from mergebuild.plan.planner import DIRTY, PENDING, Plan
from mergebuild.store.cache import Cache


def merge_fingerprint(plan: Plan, merge: str) -> dict:
    spec = plan.mergefile.merges[merge]
    files = {}
    for name in spec.inputs:
        if name in plan.sources:
            s = plan.sources[name]
            files[name] = s.stats()
    return {
        "method": spec.method,
        "version": plan.merges[merge].method.version,
        "params": spec.params,
        "dtype": spec.dtype,
        "discard": spec.discard,
        "inputs": list(spec.inputs),
        "files": files,
        "compute_dtype": plan.mergefile.settings.compute_dtype,
        **selection(spec),
    }


def selection(spec) -> dict:
    """The parts of a merge that choose keys and per-key values, beyond its parameters."""
    return {
        "rules": [{"blocks": r.blocks, "match": list(r.match), "regex": r.regex, "not": r.negate, **r.params}
                  for r in spec.rules],
        "include": list(spec.include),
        "exclude": list(spec.exclude),
        "clip_to_inputs": spec.clip_to_inputs,
        "fix_clip_position_ids": spec.fix_clip_position_ids,
    }


def explain(plan: Plan, cache: Cache, force: bool = False) -> dict[str, list[str]]:
    """For every merge of the plan with work to do, the reasons, most specific first."""
    out = {}
    mf_path = str(plan.mergefile.path)
    for name, merge in plan.merges.items():
        dirty, pending = merge.count(DIRTY), merge.count(PENDING)
        if not dirty and not pending:
            continue
        if force:
            out[name] = ["--force"]
            continue
        reasons = changes(cache.index.last_recipe(mf_path, name), merge_fingerprint(plan, name))
        upstream = [i for i in merge.spec.inputs if i in plan.merges and _has_work(plan, i)]
        reasons += [f"input {i!r} has tensors to recompute" for i in upstream]
        if not reasons:
            reasons = ["cache entries missing (the cache was cleared, collected or moved)"]
        out[name] = reasons
    return out


def _has_work(plan: Plan, merge: str) -> bool:
    m = plan.merges[merge]
    return m.count(DIRTY) > 0 or m.count(PENDING) > 0


def changes(last: dict | None, now: dict) -> list[str]:
    if last is None:
        return ["never built from this Mergefile"]
    reasons = []
    if last.get("method") != now["method"]:
        reasons.append(f"method changed: {last.get('method')} -> {now['method']}")
    elif last.get("version") != now["version"]:
        reasons.append(f"method version changed: {last.get('version')} -> {now['version']}")
    before, after = last.get("params", {}), now["params"]
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            reasons.append(f"parameter {key} changed: {before.get(key, 'unset')} -> {after.get(key, 'unset')}")
    for field in ("dtype", "discard", "compute_dtype", "inputs", "rules", "include", "exclude",
                  "clip_to_inputs", "fix_clip_position_ids"):
        if field in last and last[field] != now[field]:
            reasons.append(f"{field} changed: {last.get(field)} -> {now[field]}")
    for name, stats in now.get("files", {}).items():
        before = {s[0]: s for s in last.get("files", {}).get(name, [])}
        for info in stats:
            if before.get(info[0]) != info:
                reasons.append(f"input file {info[0]} changed")
    return reasons
