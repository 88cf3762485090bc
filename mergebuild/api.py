"""mergebuild's Python API: what the CLI does, for scripts and notebooks.

    import mergebuild

    mf = mergebuild.load("mergefile.toml")
    for merge in mergebuild.dry_run(mf):          # what a build would do, and why
        print(merge.name, merge.state, merge.reasons)
    result = mergebuild.project(mf, progress=print)  # build the targets; events as they happen
    print(result.merges["final"].computed, result.cache_bytes)
    print(mergebuild.status(mf))                  # {"final": []}: up to date
    print(mergebuild.lineage("out/final.safetensors"))

Every function takes a Mergefile (from `load`) or the path of one, and raises
`mergebuild.errors.MergebuildError` (with `exit_code` 1 or 2) for what the CLI reports as one
line. docs/api.md has more examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergebuild import project as _build
from mergebuild.errors import UsageError
from mergebuild.execute.executor import MergeResult, NullProgress
from mergebuild.mergefile import Mergefile, load_mergefile, parse_mergefile
from mergebuild.planning.planner import Plan

__all__ = ["BuildResult", "MergeResult", "MergeStatus", "Mergefile", "build", "dry_run", "lineage", "load", "plan",
           "status"]

MergeStatus = _build.MergeStatus
MARK = "# written by mergebuild.load from a dict"
ProgressCallback = Callable[[dict], Any]


def load(source: str | Path | dict, path: str | Path | None = None) -> Mergefile:
    """A Mergefile: read from the path `source`, or built in code from a dict of the TOML's
    tables (`{"models": {...}, "merges": {...}}`). A dict is written to `path` (default
    `mergefile.toml` in the working folder) so that its relative paths, its lock file and its
    place among the cache's Mergefiles work as for a file; an existing file there is replaced
    only if it holds the same text or was written this way before."""
    if isinstance(source, dict):
        import tomlkit

        target = Path(path or "mergefile.toml").absolute()
        text = MARK + "\n" + tomlkit.dumps(source)
        parse_mergefile(text, target)  # errors before anything is written
        if target.exists() and not target.read_text(encoding="utf-8").startswith(MARK):
            raise UsageError(f"{target} exists and was not written by mergebuild.load; name another path")
        target.write_text(text, encoding="utf-8")
        return load_mergefile(target)
    return load_mergefile(Path(source))


def _options(mf: Mergefile | str | Path, targets=(), force: bool = False, cache: str | Path | None = None,
             device: str | None = None, lock_timeout: float | None = None) -> _build.BuildOptions:
    mf = mf if isinstance(mf, Mergefile) else load(mf)
    return _build.BuildOptions(mergefile=mf, targets=tuple(targets or ()), force=force,
                               cache_dir=Path(cache) if cache is not None else None, device=device,
                               lock_timeout=lock_timeout)


def resolved_tails(opts: _build.BuildOptions, dry: bool = False) -> tuple[_build.BuildOptions, dict]:
    """opts with its Mergefile parsed (once) and every needed k = "auto" replaced by the tail the
    two-tailed rule keeps (tune/two_tailed.py; with dry, from the cache only), and what it chose
    per merge. tune is imported only when a merge has k = "auto"."""
    mf = _build.mergefile_of(opts)
    opts = dataclasses.replace(opts, mergefile=mf)
    if not any(m.method == "tail_average" and (m.params.get("k") == "auto" or "scorer" in m.params)
               for m in mf.merges.values()):
        return opts, {}
    from mergebuild.tune.two_tailed import resolve_tails

    return resolve_tails(opts, dry)


def plan(mf: Mergefile | str | Path, targets=(), force: bool = False, cache: str | Path | None = None) -> Plan:
    """The plan of a build: per merge, its tasks (one per output tensor, with its cache key and
    state), whether its output is current and whether the build would run it."""
    return _build.dry_run(resolved_tails(_options(mf, targets, force, cache), dry=True)[0])[0]


def dry_run(mf: Mergefile | str | Path, targets=(), force: bool = False,
            cache: str | Path | None = None) -> list[MergeStatus]:
    """What a build would do, merge by merge: `state` ("up to date", "12 of 1143 tensors dirty",
    ...), the counts, and `reasons` in the format `mix1.alpha: 0.4 -> 0.45`."""
    return _build.dry_run(resolved_tails(_options(mf, targets, force, cache), dry=True)[0])[1]


@dataclass
class BuildResult:
    merges: dict[str, MergeResult]
    outputs: dict[str, Path]
    cache_bytes: int
    cache_limit: int
    warnings: list[str] = field(default_factory=list)
    tails: dict = field(default_factory=dict)  # per k = "auto" merge: the tail the two-tailed rule kept


def build(mf: Mergefile | str | Path, targets=(), force: bool = False, cache: str | Path | None = None,
          device: str | None = None, progress: ProgressCallback | NullProgress | None = None,
          lock_timeout: float | None = None) -> BuildResult:
    """Build the targets (default: every merge with an output) and what they need.

    progress: an object with start / advance / finish (see execute.executor.NullProgress), or a
    function called with one dict per event: {"event": "start", "merge", "tensors", "bytes",
    "step", "steps"}, {"event": "advance", "merge", "tensors", "written", "read"},
    {"event": "finish", "merge"}."""
    if callable(progress) and not hasattr(progress, "start"):
        progress = _Events(progress)
    opts, tails = resolved_tails(_options(mf, targets, force, cache, device, lock_timeout))
    _plan, results, report = _build.build_with_report(opts, progress)
    return BuildResult(results, {n: r.output for n, r in results.items() if r.output is not None},
                       report.cache_bytes, report.cache_limit, report.warnings + report.late_warnings,
                       {n: c.doc() for n, c in tails.items()})


def status(mf: Mergefile | str | Path, targets=(), cache: str | Path | None = None) -> dict[str, list[str]]:
    """Per target, why a build would change its output; an empty list means up to date."""
    return _build.check_status(resolved_tails(_options(mf, targets, cache=cache), dry=True)[0])


def lineage(path: str | Path) -> dict:
    """How a file (or model folder) was made, from its metadata alone: a tree of merges and
    files, across generations (mergebuild's recipe, A1111's, ModelSpec's)."""
    from mergebuild.record.lineage_read import read_lineage  # not needed by a build

    return read_lineage(Path(path))


class _Events(NullProgress):
    """Progress as plain dicts, for a callback."""

    def __init__(self, callback: ProgressCallback):
        self.callback = callback

    def start(self, name, tensors, nbytes, step=1, steps=1):
        self.callback({"event": "start", "merge": name, "tensors": tensors, "bytes": nbytes, "step": step,
                       "steps": steps})

    def advance(self, name, tensors, written, read=0):
        self.callback({"event": "advance", "merge": name, "tensors": tensors, "written": written, "read": read})

    def finish(self, name):
        self.callback({"event": "finish", "merge": name})
