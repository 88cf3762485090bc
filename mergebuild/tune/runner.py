"""One evaluation: build a Mergefile text (ranges filled in) incrementally, then score the output.

The text is written to a hidden file in the Mergefile's folder, so relative paths and the cache
resolve as for the Mergefile itself; it and its lock are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.build import BuildOptions, build
from mergebuild.errors import BuildError, MergefileError
from mergebuild.record import lock as lockfile
from mergebuild.record.lock import lock_path
from mergebuild.mergefile.parse import parse_mergefile
from mergebuild.portable import FileLock, is_locked
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

    def evaluate(self, text: str, target: str, output: Path) -> Evaluation:
        started = time.perf_counter()
        ev = Evaluation()
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
        parse_mergefile(text, self.mergefile)  # errors name the user's Mergefile, not the hidden copy
        cache = Path(tempfile.mkdtemp(prefix="mergebuild-tune-")) if self.fresh_cache else self.cache_dir
        self.temp.write_text(text, encoding="utf-8")
        try:
            opts = BuildOptions(mergefile=self.temp, targets=(target,), cache_dir=cache, device=self.device)
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
