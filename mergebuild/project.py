"""The public facade: load a Mergefile, plan, build, collect garbage. The CLI is a thin layer on it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.errors import MergefileError, UsageError
from mergebuild.execute.commit import lora_files, output_date
from mergebuild.execute.executor import Executor, MergeResult
from mergebuild.record.lineage import SourceHashes, build_metadata, header_budget
from mergebuild.record.lock import write_lock
from mergebuild.planning.shortcut import remember_all
from mergebuild.planning.planner import DIRTY, PENDING, Plan, make_plan
from mergebuild.record.state import decide_outputs, reasons as merge_reasons
from mergebuild.mergefile.parse import load_mergefile  # noqa: F401 (part of the facade)
from mergebuild.mergefile.model import Mergefile
from mergebuild.store import eviction
from mergebuild.store.cache import Cache
from mergebuild.store.fingerprints import user_store
from mergebuild.store.remote_attach import attach_remote, finish_build, tier_totals
from mergebuild.tensors.folder import remove_output
from mergebuild.tensors.header import MAX_HEADER
from mergebuild.tensors.writer import header_bytes, layout


@dataclass(frozen=True)
class BuildOptions:
    mergefile: Path | Mergefile = Path("mergefile.toml")  # a path, or a Mergefile already loaded
    targets: tuple[str, ...] = ()
    force: bool = False
    cache_dir: Path | None = None
    device: str | None = None
    lock_timeout: float | None = None  # seconds to wait for another build's lock (None: forever)
    ray: str | None = None  # run the tensor tasks on a Ray cluster: its address ("": RAY_ADDRESS or a local one)
    remote_cache: str | None = None  # off | read | readwrite | require (None: readwrite when a remote is set)


@dataclass
class MergeStatus:
    """What a dry run says of one merge."""

    name: str
    tensors: int
    dirty: int
    pending: int
    output: Path | None
    output_current: bool
    needed: bool = True
    reasons: list[str] = field(default_factory=list)
    statistic: dict | None = None  # its whole-model statistic: name, state, what it reads (StatisticTask.describe)
    computed: list[dict] = field(default_factory=list)  # the computed sources it reads (planning/computed.py)

    @property
    def state(self) -> str:
        if not self.needed:
            return "up to date"
        fishers = [c["name"] for c in self.computed if c["state"] != "cached"]
        if fishers:
            then = f", then {self.dirty + self.pending} of {self.tensors} tensors" if self.dirty + self.pending else ""
            return f"{', '.join(fishers)} to compute{then}"
        if self.statistic is not None and self.statistic["state"] == "dirty":
            return f"{self.statistic['name']} to compute, then {self.dirty + self.pending} of {self.tensors} tensors"
        if self.dirty:
            return f"{self.dirty} of {self.tensors} tensors dirty"
        if self.pending:
            return f"depends on a dirty input ({self.pending} tensors may change)"
        if self.output is not None and not self.output_current:
            return "output to write from cache"
        return "up to date"


@dataclass
class BuildReport:
    """What a build did besides its merges: the cache's size and limit, warnings."""

    cache_bytes: int = 0
    cache_limit: int = 0
    warnings: list[str] = field(default_factory=list)  # known before the build starts
    late_warnings: list[str] = field(default_factory=list)  # found while building
    ray: dict | None = None  # what --ray did (execute/ray_executor.py RaySummary)
    tiers: dict | None = None  # per cache tier: hits and bytes moved by this build (store/tiers.py)


def cache_dir(mf: Mergefile | None, opts: BuildOptions) -> Path:
    if opts.cache_dir is not None:
        return Path(opts.cache_dir)
    env = os.environ.get("MERGEBUILD_CACHE")
    if env:
        return Path(env)
    if mf is None:
        raise UsageError("no cache named: give --cache-dir DIR or set MERGEBUILD_CACHE, or run next to a Mergefile")
    return mf.settings.cache


def mergefile_of(opts: BuildOptions) -> Mergefile:
    return opts.mergefile if isinstance(opts.mergefile, Mergefile) else load_mergefile(opts.mergefile)


def open_project(opts: BuildOptions, readonly: bool = False, remote: bool = True) -> tuple[Mergefile, Cache]:
    """The Mergefile and its cache, with the remote tier behind it when one is set (reached
    once here: unreachable is a warning, or with --remote-cache=require an error)."""
    mf = mergefile_of(opts)
    cache = Cache(cache_dir(mf, opts), readonly_ok=readonly)
    if remote:
        try:
            attach_remote(cache, mf.settings.remote_cache, mf.settings.remote_options, opts.remote_cache)
        except BaseException:
            cache.close()
            raise
    return mf, cache


def _open_cache(opts: BuildOptions, readonly: bool = False) -> tuple[Mergefile | None, Cache]:
    """The cache commands need no Mergefile when the cache is named (--cache-dir, MERGEBUILD_CACHE)."""
    named = opts.cache_dir is not None or os.environ.get("MERGEBUILD_CACHE")
    if isinstance(opts.mergefile, Mergefile):
        mf = opts.mergefile
    else:
        mf = load_mergefile(opts.mergefile) if not named or Path(opts.mergefile).is_file() else None
    return mf, Cache(cache_dir(mf, opts), readonly_ok=readonly)


def dry_run(opts: BuildOptions) -> tuple[Plan, list[MergeStatus]]:
    plan, statuses, _ = dry_run_with_warnings(opts)
    return plan, statuses


def dry_run_with_warnings(opts: BuildOptions) -> tuple[Plan, list[MergeStatus], list[str]]:
    mf, cache = open_project(opts, readonly=True)
    try:
        plan = make_plan(mf, cache, list(opts.targets), opts.force)
        decide_outputs(plan, cache, opts.force)
        warnings = check_headers(plan, cache) + (cache.remote.warnings if cache.remote is not None else [])
        why = merge_reasons(plan, cache, opts.force)
        return plan, [_status(plan, name, why.get(name, [])) for name in plan.merges], warnings
    finally:
        cache.close()


def _status(plan: Plan, name: str, reasons: list[str]) -> MergeStatus:
    merge = plan.merges[name]
    stat = merge.statistic.describe() if merge.statistic is not None else None
    computed = [n for n in dict.fromkeys(merge.spec.inputs) if n in plan.statistics]
    if computed:  # computed sources (planning/computed.py: imported where a Mergefile has one)
        from mergebuild.planning.computed import describe_computed

        computed = [describe_computed(plan.statistics[n]) for n in computed]
    return MergeStatus(name, len(merge.tasks), merge.count(DIRTY), merge.count(PENDING), merge.spec.output,
                       merge.current, merge.needed, reasons, stat, computed)


def check_headers(plan: Plan, cache: Cache) -> list[str]:
    """Every output's header fits safetensors' limit (exit 2 before any compute, naming what
    made it big); the warnings its lineage gave."""
    warnings: list[str] = []
    loras = lora_files(plan)
    for name, merge in plan.merges.items():
        if merge.spec.output is None or not merge.needed or merge.current:
            continue
        metadata = build_metadata(plan, name, SourceHashes.placeholders(plan, loras), "0" * 64,
                                  output_date(cache, merge), warnings)
        slots, _ = layout([(t.name, t.dtype, t.shape) for t in merge.tasks.values()])
        size = len(header_bytes(slots, metadata))
        if size > MAX_HEADER:
            biggest = ", ".join(f"{what} {n / 1e6:.1f} MB" for what, n in header_budget(metadata)[:3])
            raise MergefileError(plan.mergefile.path, f"merges.{name}", "output",
                                 f"its header would take {size / 1e6:.1f} MB, over safetensors' limit of "
                                 f"{MAX_HEADER / 1e6:.0f} MB (largest parts: {biggest}; tensor entries "
                                 f"{len(header_bytes(slots, {})) / 1e6:.1f} MB)")
    store_problem = user_store().take_warning()  # the per-user fingerprint store, once (store/fingerprints.py)
    return list(dict.fromkeys(warnings + ([store_problem] if store_problem else [])))


def build(opts: BuildOptions, progress=None, on_plan=None, on_wait=None) -> tuple[Plan, dict[str, MergeResult]]:
    """Build the targets; a second build on the same cache waits for the first, then reuses."""
    plan, results, _ = build_with_report(opts, progress, on_plan, on_wait)
    return plan, results


def build_with_report(opts: BuildOptions, progress=None, on_plan=None, on_wait=None):
    from mergebuild.portable import STREAMING_MMAP, set_mmap_threshold

    set_mmap_threshold(STREAMING_MMAP)  # before planning's 16 MB read buffers raise glibc's
    mf, cache = open_project(opts)
    try:
        make_executor = _executor(opts)  # with --ray, an unreachable cluster fails before any work
        with cache.exclusive(opts.lock_timeout, on_wait):
            plan = make_plan(mf, cache, list(opts.targets), opts.force)
            decide_outputs(plan, cache, opts.force)
            report = BuildReport(warnings=check_headers(plan, cache))
            if on_plan is not None:
                on_plan(plan, merge_reasons(plan, cache, opts.force), report.warnings)
            own = eviction.own_limit(mf.settings.cache_limit)
            build_id = cache.index.start_build(str(mf.path), mf.settings.cache_limit)
            device = opts.device or mf.settings.device
            executor = make_executor(plan, cache, device, build_id, opts.force, progress, mf.settings.staging)
            results = executor.run()
            remember_all(plan, cache)  # the merges now complete are not planned again (planning/shortcut.py)
            report.ray = executor.summary.doc() if opts.ray is not None else None
            tiers = finish_build(cache)  # uploads done, fetched copies an output holds dropped, counts kept
            report.tiers = tiers if cache.remote is not None else None  # --json shows them with a remote
            report.late_warnings += cache.remote.warnings if cache.remote is not None else []
            report.late_warnings += [w for w in dict.fromkeys(executor.warnings) if w not in report.warnings]
            write_lock(plan, results, executor.output_sha256)
            limit = eviction.effective_limit(cache, str(mf.path), own)
            kept = eviction.enforce_limit(cache, limit)
            report.cache_bytes, report.cache_limit = kept.after, limit
            if kept.over:
                report.late_warnings.append(
                    f"the cache holds {kept.after / 1e9:.2f} GB, over its limit of {limit / 1e9:.2f} GB: the current "
                    f"targets need {kept.needed / 1e9:.2f} GB of it (raise cache_limit or {eviction.ENV_LIMIT})")
            return plan, results, report
    finally:
        cache.close()


def _executor(opts: BuildOptions):
    """The local executor, or with --ray one that sends the tensor tasks to the cluster (Ray is
    imported only then)."""
    if opts.ray is None:
        return Executor
    from functools import partial

    from mergebuild.execute.ray_cluster import connect
    from mergebuild.execute.ray_executor import RayExecutor

    connect(opts.ray or None)
    return partial(RayExecutor, address=opts.ray or None)


def clean(opts: BuildOptions) -> tuple[list[Path], list[str]]:
    """Remove the declared outputs (only what mergebuild wrote); (removed, kept as not ours)."""
    mf = mergefile_of(opts)
    names = list(opts.targets) or mf.targets
    for name in names:
        if name not in mf.merges:
            raise UsageError(f"clean: {name!r} is not a merge of {mf.path.name} (merges: {', '.join(mf.merges)})")
    removed, kept = [], []
    for name in names:
        out = mf.merges[name].output
        if out is not None:
            r, k = remove_output(out)
            removed += r
            kept += [f"{out}: {n}" for n in k]
    return removed, kept


def collect_garbage(opts: BuildOptions, keep_builds: int | None = None) -> dict:
    """Drop cache entries no registered Mergefile needs and not used by the last N builds."""
    mf, cache = _open_cache(opts)
    try:
        with cache.exclusive(opts.lock_timeout):
            keep = keep_builds if keep_builds is not None else (mf.settings.keep_builds if mf else 3)
            return eviction.collect(cache, keep)
    finally:
        cache.close()


def verify_cache(opts: BuildOptions) -> dict:
    """Re-hash every stored tensor the index knows; remove bad ones (the next build recomputes
    them). Tensors located in outputs that were moved, edited or deleted are reported as such."""
    from mergebuild.dtypes import nbytes

    _mf, cache = _open_cache(opts)
    try:
        with cache.exclusive(opts.lock_timeout):
            changed, in_changed = _drop_stale_files(cache)
            checked = bad = missing = moved = 0
            dangling = []
            for digest, dtype, shape in cache.index.entry_infos():
                checked += 1
                if not cache.has(digest):
                    if digest in in_changed:
                        moved += 1  # it lived in an output the user moved, edited or deleted
                    else:
                        missing += 1
                    dangling.append(digest)
                elif cache.get(digest, dtype, shape, nbytes(dtype, shape)) is None:
                    bad += 1
                    dangling.append(digest)
            cache.index.forget_entries_of(dangling)
            cache.index.forget_blobs([d for d in dangling if not cache.blobs.has(d)])
            return {"checked": checked, "bad_removed": bad, "missing": missing,
                    "outputs_changed": changed, "output_tensors_dropped": moved}
    finally:
        cache.close()


def _drop_stale_files(cache: Cache) -> tuple[int, set[str]]:
    """Forget recorded files (outputs, packs) that are gone or changed since mergebuild wrote
    them: how many, and the digests that were located in them."""
    files, digests = 0, set()
    for path in cache.index.files():
        if not cache._file_valid(path):
            digests.update(cache.index.located_digests(path))
            files += 1
            cache.forget_file(path)
    return files, digests


def cache_stats(opts: BuildOptions) -> dict:
    mf, cache = _open_cache(opts, readonly=True)
    try:
        usage = cache.usage()
        limit = eviction.effective_limit(cache, str(mf.path) if mf else "", eviction.own_limit(
            mf.settings.cache_limit if mf else None))
        located = cache.index.location_count()
        return {"path": str(cache.root), "bytes": sum(usage.values()), "by_kind": usage, "limit": limit,
                "blobs": len(cache.index.blob_rows()), "output_tensors": located, **cache.index.counts(),
                "tiers": tier_totals(cache.root, mf.settings if mf else None)}
    finally:
        cache.close()


def check_status(opts: BuildOptions) -> dict[str, list[str]]:
    """For every target (or those asked for), why a build would change its output; an empty
    list means up to date: the same predicate the build uses."""
    mf, cache = open_project(opts, readonly=True)
    try:
        plan = make_plan(mf, cache, list(opts.targets))
        decide_outputs(plan, cache)
        why = merge_reasons(plan, cache)
        out = {}
        for target in plan.targets:
            merge = plan.merges[target]
            if merge.spec.output is None:
                out[target] = why.get(target, [])
            elif merge.current:
                out[target] = []
            else:
                out[target] = why.get(target) or [merge.stale_why or "never built"]
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
        for task in merge.tasks.values() if s.needed else ():
            if task.state in (DIRTY, PENDING):
                block = merge.arch.block_of(task.name, plan.mergefile.settings.time_embed == "BASE") if merge.arch else None
                layer = merge.arch.layer_of(task.name) if merge.arch and block is None else None
                group = block or (f"layer {layer}" if layer is not None else "other")
                by_block[group] = by_block.get(group, 0) + 1
        order = {b: i for i, b in enumerate(merge.arch.blocks)} if merge.arch else {}
        by_block = dict(sorted(by_block.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        out[s.name] = {"state": s.state, "tensors": s.tensors, "dirty": s.dirty if s.needed else 0,
                       "pending": s.pending if s.needed else 0, "by_block": by_block, "reasons": s.reasons,
                       **({"statistic": s.statistic} if s.statistic is not None else {}),
                       **({"computed": s.computed} if s.computed else {})}
    return out


def report_data(opts: BuildOptions) -> tuple[Mergefile, dict, dict[str, int], int]:
    """What `mergebuild report` shows, from records only (no model is read): the Mergefile,
    each merge's last run, the cache's bytes by kind and its limit."""
    mf, cache = open_project(opts, readonly=True, remote=False)
    try:
        runs = cache.index.runs(str(mf.path))
        limit = eviction.effective_limit(cache, str(mf.path), eviction.own_limit(mf.settings.cache_limit))
        return mf, runs, cache.usage(), limit
    finally:
        cache.close()
