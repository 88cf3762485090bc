"""One evaluation: build a Mergefile text (ranges filled in) incrementally, then score the output.

The text is written to a hidden file in the Mergefile's folder, so relative paths and the cache
resolve as for the Mergefile itself; it and its lock are removed afterwards. Its outputs are
moved to tune's own folder beside the cache (scratch_folder), so a trial never rewrites the
target's real output, nor another Mergefile's output at the same path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.project import BuildOptions, build
from mergebuild.errors import BuildError, MergefileError, UsageError
from mergebuild.record import lock as lockfile
from mergebuild.record.lock import lock_path
from mergebuild.mergefile.model import FILE_SUFFIX
from mergebuild.tensors.folder import is_folder_output
from mergebuild.mergefile.parse import parse_mergefile
from mergebuild.portable import FileLock, is_locked
from mergebuild.store.hashing import text_digest
from mergebuild.tune.scoring import Score, Scorer


@dataclass
class Evaluation:
    score: Score | None = None
    computed: int = 0
    reused: int = 0
    build_seconds: float = 0.0
    seconds: float = 0.0
    content: str | None = None  # digest of the output's tensors
    error: str | None = None
    tail: str = ""
    merges: dict = field(default_factory=dict)  # name -> (computed, reused)
    output: Path | None = None  # what was scored: the trial's output in the scratch folder

    @property
    def value(self) -> float | None:
        return None if self.score is None else self.score.value

    @property
    def ok(self) -> bool:
        return self.error is None and self.value is not None


class Runner:
    """Builds texts of one Mergefile against one cache (or a fresh cache per build)."""

    def __init__(self, mergefile: Path, cache_dir: Path, scorer: Scorer, fresh_cache: bool = False,
                 device: str | None = None, tag: str = "tune"):
        self.mergefile = Path(mergefile).absolute()
        self.cache_dir = Path(cache_dir)
        self.scorer = scorer
        self.fresh_cache = fresh_cache
        self.device = device
        self.temp = self.mergefile.parent / f".{self.mergefile.stem}.{tag}-{os.getpid()}.toml"
        self.scratch = scratch_folder(self.cache_dir, self.mergefile, tag)
        self._scratch = _lock_scratch(self.scratch)
        self._remove_stale(tag)
        self._alive = FileLock(self.temp.with_suffix(".alive"))  # held while this run lives
        self._alive.acquire()

    def _remove_stale(self, tag: str) -> None:
        """Hidden Mergefiles (and their locks) left by a killed run: nobody holds their .alive
        lock any more (a reused PID fools nothing)."""
        for path in self.mergefile.parent.glob(f".{self.mergefile.stem}.{tag}-*.*"):
            alive = path.with_suffix(".alive")
            if path.suffix == ".alive" or not is_locked(alive):
                if not is_locked(alive):
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        self._alive.release()
        self.temp.with_suffix(".alive").unlink(missing_ok=True)
        self._scratch.release()

    def evaluate(self, text: str, target: str) -> Evaluation:
        """Build `text` with its outputs in the scratch folder, and score the target's there."""
        started = time.perf_counter()
        ev = Evaluation()
        text, output = redirect_outputs(text, self.scratch, target)
        ev.output = output
        try:
            plan, results = self.build(text, target)
        except (BuildError, MergefileError) as e:
            ev.error, ev.seconds = f"build failed: {e}", time.perf_counter() - started
            return ev
        ev.build_seconds = time.perf_counter() - started
        ev.computed = sum(r.computed for r in results.values())
        ev.reused = sum(r.reused for r in results.values())
        ev.merges = {n: (r.computed, r.reused) for n, r in results.items()}
        ev.content = content_digest(plan, target)
        ev.score = self.scorer.score(output, ev.content)
        if not ev.score.ok:
            ev.error, ev.tail = ev.score.error, ev.score.tail
        ev.seconds = time.perf_counter() - started
        return ev

    def score_file(self, path: Path) -> Evaluation:
        """Score a source file as it is (a soup ingredient alone)."""
        from mergebuild.tune.scoring import file_digest

        started = time.perf_counter()
        ev = Evaluation(content="file:" + file_digest(path))
        ev.score = self.scorer.score(path, ev.content)
        if not ev.score.ok:
            ev.error, ev.tail = ev.score.error, ev.score.tail
        ev.seconds = time.perf_counter() - started
        return ev

    def build(self, text: str, target: str):
        """Build `text` as written: its outputs are the real ones (evaluate() redirects first)."""
        parse_mergefile(text, self.mergefile)  # errors name the user's Mergefile, not the hidden copy
        cache = Path(tempfile.mkdtemp(prefix="mergebuild-tune-")) if self.fresh_cache else self.cache_dir
        self.temp.write_text(text, encoding="utf-8")
        try:
            opts = BuildOptions(mergefile=self.temp, targets=(target,), cache_dir=cache, device=self.device)
            from mergebuild.tune.two_tailed import resolve_tails  # it imports this module

            opts, _ = resolve_tails(opts)  # k = "auto" upstream: the tail the two-tailed rule keeps
            return build(opts)
        finally:
            self.temp.unlink(missing_ok=True)
            lock_path(self.temp).unlink(missing_ok=True)
            if self.fresh_cache:
                shutil.rmtree(cache, ignore_errors=True)


def content_digest(plan, target: str) -> str | None:
    """A digest of what the target's output holds: its tensors (not its metadata, which names
    the parameters)."""
    if target not in plan.merges:
        return None
    digest = lockfile.content_digest(plan, target)
    return None if digest is None else "tensors:" + digest


def scratch_folder(cache_dir: Path, mergefile: Path, tag: str) -> Path:
    """Where a Mergefile's trial outputs go: <cache's parent>/.<cache name>-tune/<stem>-<digest>.<tag>/.
    Beside the cache, not in it (a build refuses outputs inside the cache: planning/outputs.py), one
    folder per Mergefile (by its path) and per tag, reused across studies: the trial output is the
    cache's copy of its tensors (execute/outputs.py), so keeping it makes the next run cheaper."""
    cache = Path(cache_dir).absolute()
    mergefile = Path(mergefile).absolute()
    name = f"{mergefile.stem}-{text_digest(str(mergefile))[:12]}.{tag}"
    return cache.parent / f".{cache.name}-tune" / name


def _lock_scratch(folder: Path) -> FileLock:
    """One run per scratch folder: two would replace each other's output under their scorers."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock")
    if not lock.acquire(blocking=False):
        raise UsageError(f"another `mergebuild tune` of this Mergefile is running (it holds {folder})")
    return lock


def redirect_outputs(text: str, folder: Path, target: str) -> tuple[str, Path]:
    """The text with every merge's output moved into `folder` (tomlkit: formatting kept), and the
    target's new output: trial.safetensors (or a trial/ folder), upstream-<merge>... for the other
    outputs a build of the target also keeps current."""
    import tomlkit

    doc = tomlkit.parse(text)
    moved = {}
    for name, table in doc.get("merges", {}).items():
        if "output" not in table:
            continue
        suffix = "" if is_folder_output(Path(str(table["output"]))) else FILE_SUFFIX  # a folder stays a folder
        stem = "trial" if name == target else f"upstream-{name}"
        moved[name] = Path(folder).absolute() / f"{stem}{suffix}"
        table["output"] = str(moved[name])
    if target not in moved:
        raise BuildError(f"[merges.{target}] has no output to score")
    return tomlkit.dumps(doc), moved[target]
