"""Scoring an output: a shell command or a Python function, with a score cache.

The cache maps (what the output holds, who scores it) -> the score, in <cache>/tune/scores.sqlite:
a point that comes back (the same tensors, under any parameters) costs nothing. "What the output
holds" is a digest of its tensors' digests (see runner.py), or of a source file's bytes; "who
scores it" is the command or module:function plus a hash of the scorer's own files, so editing
score.py invalidates its cached scores.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import xxhash

from mergebuild.tune.config import ScorerSpec

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?\b(?i:nan|inf(?:inity)?)\b")
TAIL_CHARS = 2000


class ScoreError(Exception):
    """The scorer failed: a non-zero exit, no number, an exception, or NaN."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


@dataclass
class Score:
    value: float | None
    cached: bool = False
    seconds: float = 0.0
    error: str | None = None  # one line
    tail: str = ""  # the end of the scorer's stderr (or traceback)

    @property
    def ok(self) -> bool:
        return self.value is not None


def last_number(text: str) -> float | None:
    found = None
    for m in NUMBER.finditer(text):
        found = m.group(0)
    return None if found is None else float(found)


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes (or of a folder's files, by name)."""
    h = xxhash.xxh3_128()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def scorer_identity(spec: ScorerSpec) -> str:
    """The command (or module:function) and a digest of the scorer's files."""
    files: list[Path] = []
    if spec.command is not None:
        try:
            words = shlex.split(spec.command)
        except ValueError:
            words = spec.command.split()
        files = [spec.folder / w for w in words if "{" not in w and (spec.folder / w).is_file()]
        ident = f"command:{spec.command}"
    else:
        module = spec.python.partition(":")[0]
        origin = _module_file(spec.folder, module)
        files = [origin] if origin is not None else []
        ident = f"python:{spec.python}"
    parts = [ident] + [f"{f.name}:{file_digest(f)}" for f in files]
    return "\n".join(parts)


def _module_file(folder: Path, module: str) -> Path | None:
    candidate = folder.joinpath(*module.split("."))
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


_FUNCTIONS: dict[tuple[str, str], object] = {}


def load_function(spec: ScorerSpec):
    key = (str(spec.folder), spec.python)
    if key not in _FUNCTIONS:
        module_name, _, name = spec.python.partition(":")
        folder = str(spec.folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module = importlib.import_module(module_name)
        function = getattr(module, name)
        if not callable(function):
            raise TypeError(f"{spec.python} is not callable")
        _FUNCTIONS[key] = function
    return _FUNCTIONS[key]


class ScoreCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (content TEXT, scorer TEXT, value REAL, at REAL, "
                        "PRIMARY KEY (content, scorer))")
        self.db.commit()

    def get(self, content: str, scorer: str) -> float | None:
        row = self.db.execute("SELECT value FROM scores WHERE content = ? AND scorer = ?", (content, scorer)).fetchone()
        return None if row is None else row[0]

    def put(self, content: str, scorer: str, value: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", (content, scorer, value, time.time()))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


class Scorer:
    """Scores outputs; with a cache root, remembers every score by content."""

    def __init__(self, spec: ScorerSpec, cache_root: Path | None):
        self.spec = spec
        self.identity = scorer_identity(spec)
        self.cache = ScoreCache(Path(cache_root) / "tune" / "scores.sqlite") if cache_root is not None else None

    def score(self, output: Path, content: str | None) -> Score:
        started = time.perf_counter()
        if self.cache is not None and content is not None:
            value = self.cache.get(content, self.identity)
            if value is not None:
                return Score(value, cached=True, seconds=time.perf_counter() - started)
        try:
            value = self._run(Path(output))
        except ScoreError as e:
            return Score(None, seconds=time.perf_counter() - started, error=str(e), tail=e.tail)
        if self.cache is not None and content is not None:
            self.cache.put(content, self.identity, value)
        return Score(value, seconds=time.perf_counter() - started)

    def _run(self, output: Path) -> float:
        if self.spec.command is not None:
            value = self._command(output)
        else:
            value = self._python(output)
        if not math.isfinite(value):
            raise ScoreError(f"the score is {value}")
        return value

    def _command(self, output: Path) -> float:
        command = self.spec.command.replace("{output}", shlex.quote(str(output)))
        command = command.replace("{python}", shlex.quote(sys.executable))
        env = {**os.environ, "MERGEBUILD_OUTPUT": str(output)}
        proc = subprocess.run(command, shell=True, cwd=self.spec.folder, env=env, capture_output=True, text=True,
                              errors="replace")
        if proc.returncode != 0:
            raise ScoreError(f"the scorer exited with status {proc.returncode}", _tail(proc.stderr or proc.stdout))
        value = last_number(proc.stdout)
        if value is None:
            raise ScoreError("the scorer printed no number on stdout", _tail(proc.stderr or proc.stdout))
        return value

    def _python(self, output: Path) -> float:
        try:
            function = load_function(self.spec)
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for --json
                result = function(str(output))
            return float(result)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 (a scorer's failure fails the trial, not the study)
            raise ScoreError(f"{self.spec.python} raised {type(e).__name__}: {e}", _tail(traceback.format_exc())) from None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _tail(text: str) -> str:
    text = (text or "").strip()
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]
