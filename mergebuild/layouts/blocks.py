"""Architectures: detect one from key names, map a key to its block (MBW) or layer index.

The data lives in architectures.json; this module only interprets it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
BLOCK_NAME = re.compile(r"^(BASE|IN\d\d|M00|OUT\d\d)$")


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    detect: tuple[str, ...]
    blocks: tuple[str, ...]  # in supermerger order; empty for generic models
    rules: tuple[tuple[re.Pattern, str, str | None], ...]
    default_block: str | None
    components: dict[str, tuple[str, ...]]
    layer_pattern: re.Pattern | None = None

    def block_of(self, key: str, time_embed_in_base: bool = False) -> str | None:
        """The MBW block of a key (SD models); None for generic models."""
        if not self.blocks:
            return None
        for pattern, template, tag in self.rules:
            m = pattern.search(key)
            if m:
                if tag == "time_embed" and time_embed_in_base:
                    return "BASE"
                return template.format(*(int(g) for g in m.groups()))
        return self.default_block

    def layer_of(self, key: str) -> int | None:
        if self.layer_pattern is None:
            return None
        m = self.layer_pattern.search(key)
        return int(m.group(1)) if m else None

    def component_of(self, key: str) -> str | None:
        for name, prefixes in self.components.items():
            if any(key.startswith(p) or (self.name == "generic" and p in key) for p in prefixes):
                return name
        return None


@lru_cache(maxsize=None)
def architectures() -> dict[str, Architecture]:
    doc = json.loads((HERE / "architectures.json").read_text())
    out = {}
    for name in doc["order"]:
        a = doc["architectures"][name]
        out[name] = Architecture(
            name=name,
            description=a["description"],
            detect=tuple(a["detect"]),
            blocks=tuple(a["blocks"]),
            rules=tuple((re.compile(p), t, tag) for p, t, tag in a["rules"]),
            default_block=a["default_block"],
            components={k: tuple(v) for k, v in a["components"].items()},
            layer_pattern=re.compile(a["layer_pattern"]) if a.get("layer_pattern") else None,
        )
    return out


def group_of(arch: Architecture, key: str, time_embed_in_base: bool = False) -> str:
    """The block of a key (SD models), else its layer ("layer 12"), else "other": how explain,
    the build's statistics and the report group tensors."""
    block = arch.block_of(key, time_embed_in_base)
    if block is not None:
        return block
    layer = arch.layer_of(key)
    return f"layer {layer}" if layer is not None else "other"


def detect(keys) -> tuple[Architecture, str]:
    """The architecture of a model from its key names, and how it was recognised."""
    keys = list(keys)
    for arch in architectures().values():
        if arch.detect and all(any(k.startswith(p) for k in keys) for p in arch.detect):
            return arch, f"keys start with {' and '.join(repr(p) for p in arch.detect)}"
    generic = architectures()["generic"]
    layers = {generic.layer_of(k) for k in keys} - {None}
    how = f"{len(layers)} layers found by {generic.layer_pattern.pattern!r}" if layers else "no layer indices found"
    return generic, how


def expand_blocks(text: str, arch: Architecture) -> set[str]:
    """'IN04-IN08 M00 OUT*' style block lists (supermerger's elemental syntax) -> block names."""
    out: set[str] = set()
    for word in text.replace(",", " ").split():
        if "-" in word:
            first, last = word.split("-", 1)
            for name in (first, last):
                _check_block(name, arch)
            i, j = arch.blocks.index(first), arch.blocks.index(last)
            out.update(arch.blocks[min(i, j) : max(i, j) + 1])
        else:
            _check_block(word, arch)
            out.add(word)
    return out


def _check_block(name: str, arch: Architecture) -> None:
    if name not in arch.blocks:
        have = f"{arch.blocks[0]}..{arch.blocks[-1]}" if arch.blocks else "no blocks (use gradient or match)"
        raise ValueError(f"block {name!r} does not exist in {arch.name} ({have})")


# supermerger presets: 26 values, BASE first (GRAD_V: 0, then 1 -> 0 in steps of 1/12 down to M00,
# then back up to 1 at OUT11)
def _grad_v() -> list[float]:
    down = [round(1 - i / 12, 6) for i in range(12)]
    return [0.0, *down, 0.0, *reversed(down)]


PRESETS: dict[str, list[float]] = {
    "ALL_A": [0.0] * 26,
    "ALL_B": [1.0] * 26,
    "FLAT_25": [0.0] + [0.25] * 25,
    "FLAT_75": [0.0] + [0.75] * 25,
    "GRAD_V": _grad_v(),
    "GRAD_A": [0.0] + [round(1 - v, 6) for v in _grad_v()[1:]],
}


def block_values(values: list[float], arch: Architecture) -> dict[str, float]:
    """A list in supermerger order -> {block: value}. A 26-value SD list on SDXL keeps
    IN00-IN08 and M00-OUT08, as supermerger's conversion does."""
    n = len(arch.blocks)
    if len(values) == n:
        return dict(zip(arch.blocks, values))
    if n == 20 and len(values) == 26:
        kept = values[:10] + values[13:23]
        return dict(zip(arch.blocks, kept))
    raise ValueError(f"{arch.name} has {n} blocks ({', '.join(arch.blocks[:3])}, ...), got {len(values)} values")


def is_block_name(name: str) -> bool:
    return bool(BLOCK_NAME.match(name))
