"""The parsed Mergefile as frozen values (no I/O, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cache: Path
    device: str = "auto"
    compute_dtype: str = "float32"
    keep_builds: int = 3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path  # absolute


@dataclass(frozen=True)
class MergeSpec:
    name: str
    method: str
    inputs: tuple[str, ...]
    params: dict = field(hash=False)  # method parameters as written (plain values for now)
    output: Path | None = None  # absolute; a merge with an output is a target
    dtype: str | None = None  # float16 | bfloat16 | float32; None: the first input's, per tensor
    discard: str | None = None  # regex: keys to leave out of the result


@dataclass(frozen=True)
class Mergefile:
    path: Path
    settings: Settings
    models: dict[str, ModelSpec]
    merges: dict[str, MergeSpec]

    @property
    def targets(self) -> list[str]:
        return [name for name, m in self.merges.items() if m.output is not None]

    def node(self, name: str) -> ModelSpec | MergeSpec:
        return self.models.get(name) or self.merges[name]
