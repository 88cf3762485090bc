"""Architecture layouts as data: every key of a checkpoint with its shape, dtype and component.

sd1-ldm.json and sdxl-sgm.json are derived from sd-mecha's model configs (MIT License,
Copyright (c) 2023 ljleb). Format: {"identifier", "source", "keys": {KEY: {"shape", "dtype",
"component", "optional"?}}}.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent


def layout_names() -> list[str]:
    """The layouts there are (fixtures' key tables; architectures are in archs/)."""
    return sorted(p.stem for p in HERE.glob("*.json"))


@lru_cache(maxsize=None)
def load_layout(name: str) -> dict:
    path = HERE / f"{name}.json"
    if not path.exists():
        known = ", ".join(layout_names())
        raise ValueError(f"unknown layout {name!r} (known: {known})")
    return json.loads(path.read_text())
