"""The public facade: load a Mergefile, plan, build, collect garbage. The CLI is a thin layer on it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from mergebuild.execute.executor import Executor, MergeResult
from mergebuild.explain import explain
from mergebuild.lockfile import read_lock, status, write_lock
from mergebuild.plan.graph import build_graph
from mergebuild.plan.planner import DIRTY, PENDING, Plan, make_plan, output_digest, output_is_current
from mergebuild.spec.mergefile import load_mergefile  # noqa: F401 (part of the facade)
from mergebuild.spec.model import Mergefile
from mergebuild.store.cache import Cache


@dataclass(frozen=True)
class BuildOptions:
    mergefile: Path = Path("mergefile.toml")
    targets: tuple[str, ...] = ()
    force: bool = False
    cache_dir: Path | None = None
    device: str | None = None


@dataclass
class MergeStatus:
    """What a dry run says of one merge."""

    name: str
    tensors: int
    dirty: int
    pending: int
    output: Path | None
    output_current: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.dirty:
            return f"{self.dirty} of {self.tensors} tensors dirty"
        if self.pending:
            return f"depends on a dirty input ({self.pending} tensors may change)"
        if self.output is not None and not self.output_current:
            return "output to write from cache"
        return "up to date"


def cache_dir(mf: Mergefile, opts: BuildOptions) -> Path:
    if opts.cache_dir is not None:
        return Path(opts.cache_dir)
    env = os.environ.get("MERGEBUILD_CACHE")
    return Path(env) if env else mf.settings.cache


def open_project(opts: BuildOptions) -> tuple[Mergefile, Cache]:
    mf = load_mergefile(opts.mergefile)
    return mf, Cache(cache_dir(mf, opts))


def dry_run(opts: BuildOptions) -> tuple[Plan, list[MergeStatus]]:
    mf, cache = open_project(opts)
    try:
        plan = make_plan(mf, cache, list(opts.targets), opts.force)
        reasons = explain(plan, cache, opts.force)
        return plan, [_status(plan, cache, name, reasons.get(name, [])) for name in plan.merges]
    finally:
        cache.close()


def _status(plan: Plan, cache: Cache, name: str, reasons: list[str]) -> MergeStatus:
    from mergebuild.execute.executor import identity_text

    merge = plan.merges[name]
    out = merge.spec.output
    current = out is not None and output_is_current(cache, out, output_digest(merge, identity_text(plan, name)))
    if out is not None and not current and not reasons and not merge.count(DIRTY) and not merge.count(PENDING):
        reasons = ["output missing or changed on disk"]
    return MergeStatus(name, len(merge.tasks), merge.count(DIRTY), merge.count(PENDING), out, current, reasons)


def build(opts: BuildOptions, progress=None, on_plan=None) -> tuple[Plan, dict[str, MergeResult]]:
    """Build the targets; a second build on the same cache waits for the first, then reuses."""
    mf, cache = open_project(opts)
    try:
        with cache.exclusive():
            plan = make_plan(mf, cache, list(opts.targets), opts.force)
            if on_plan is not None:
                on_plan(plan, explain(plan, cache, opts.force))
            build_id = cache.index.start_build(str(mf.path))
            device = opts.device or mf.settings.device
            executor = Executor(plan, cache, device, build_id, opts.force, progress, mf.settings.staging)
            results = executor.run()
            write_lock(plan, results, executor.output_sha256)
            return plan, results
    finally:
        cache.close()


def clean(opts: BuildOptions) -> list[Path]:
    mf = load_mergefile(opts.mergefile)
    names = list(opts.targets) or mf.targets
    removed = []
    for name in names:
        out = mf.merges[name].output if name in mf.merges else None
        if out is not None and out.exists():
            out.unlink()
            removed.append(out)
    return removed


def collect_garbage(opts: BuildOptions, keep_builds: int | None = None) -> dict:
    """Drop cache entries no current target needs and not used by the last N builds."""
    mf, cache = open_project(opts)
    try:
        with cache.exclusive():
            keep = keep_builds or mf.settings.keep_builds
            plan = make_plan(mf, cache, list(mf.merges))
            needed = {t.key for m in plan.merges.values() for t in m.tasks.values() if t.key}
            recent = cache.index.recent_builds(keep)
            dropped = cache.index.drop_entries_except(needed, min(recent) if recent else 0)
            referenced = cache.index.referenced_digests()
            freed = blobs = 0
            for digest in list(cache.blobs.all_digests()):
                if digest not in referenced:
                    freed += cache.blobs.remove(digest)
                    blobs += 1
            packs, pack_bytes = cache.collect_packs(referenced)
            cache.clear_stale()
            return {"entries_removed": dropped, "blobs_removed": blobs + packs, "bytes_freed": freed + pack_bytes}
    finally:
        cache.close()


def verify_cache(opts: BuildOptions) -> dict:
    """Re-hash every blob the index knows; remove bad ones (the next build recomputes them)."""
    from mergebuild.dtypes import nbytes

    mf, cache = open_project(opts)
    try:
        with cache.exclusive():
            checked = bad = missing = 0
            for digest, dtype, shape in cache.index.blob_infos():
                checked += 1
                if not cache.has(digest):
                    missing += 1
                elif cache.get(digest, dtype, shape, nbytes(dtype, shape)) is None:
                    bad += 1
            return {"checked": checked, "bad_removed": bad, "missing": missing}
    finally:
        cache.close()


def cache_stats(opts: BuildOptions) -> dict:
    mf, cache = open_project(opts)
    try:
        count, size = cache.size_on_disk()
        return {"path": str(cache.root), "blobs": count, "bytes": size, **cache.index.counts()}
    finally:
        cache.close()


def check_status(opts: BuildOptions) -> dict[str, list[str]]:
    """For every target of the Mergefile (or those asked for), why it is out of date with
    mergefile.lock and the files on disk; an empty list means up to date."""
    mf, cache = open_project(opts)
    try:
        plan = make_plan(mf, cache, list(opts.targets))
        own = status(plan, cache, read_lock(mf.path))
        graph = build_graph(mf)
        out = {}
        for target in plan.targets:
            chain = [n for n in plan.order if n in own and (n == target or n in nx.ancestors(graph, target))]
            out[target] = [r if n == target else f"{n}: {r}" for n in chain for r in own[n]]
        return out
    finally:
        cache.close()


def explain_target(opts: BuildOptions) -> dict:
    """Per merge the target needs: dirty and pending tensors by block, and why."""
    plan, statuses = dry_run(opts)
    out = {}
    for s in statuses:
        merge = plan.merges[s.name]
        by_block: dict[str, int] = {}
        for task in merge.tasks.values():
            if task.state in (DIRTY, PENDING):
                block = merge.arch.block_of(task.name, plan.mergefile.settings.time_embed == "BASE") if merge.arch else None
                layer = merge.arch.layer_of(task.name) if merge.arch and block is None else None
                group = block or (f"layer {layer}" if layer is not None else "other")
                by_block[group] = by_block.get(group, 0) + 1
        out[s.name] = {"state": s.state, "tensors": s.tensors, "dirty": s.dirty, "pending": s.pending,
                       "by_block": by_block, "reasons": s.reasons}
    return out
