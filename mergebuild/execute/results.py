"""What a build reports: each merge's result, and the progress it gives as it goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class MergeResult:
    name: str
    tensors: int
    computed: int
    seconds: float
    method_tensors: int
    output: Path | None = None
    written: bool = False
    architecture: str = ""
    ran: bool = True  # False: nothing the build makes needed it (its output was current)

    @property
    def reused(self) -> int:
        return self.tensors - self.computed

    @property
    def status(self) -> str:
        if self.computed == 0:
            return "cached"
        return "computed" if self.computed >= self.method_tensors else "partial"


class NullProgress:
    """What a build reports as it goes (the CLI draws it; the API passes it on). A merge with
    nothing to compute or write starts nothing.

    start: merge `name` has `tensors` to handle, `nbytes` of results to produce; it is merge
    `step` of the `steps` that have work. advance: `tensors` more are done, having written
    `written` bytes and read `read` bytes."""

    def start(self, name: str, tensors: int, nbytes: int, step: int = 1, steps: int = 1) -> None: ...
    def advance(self, name: str, tensors: int, written: int, read: int = 0) -> None: ...
    def finish(self, name: str) -> None: ...
