"""Finding a recipe's parents on disk: by sha256 (A1111's hashes, AutoV2), by name, by path.

Candidates are the model files (and model folders) under the --models folders. A file is hashed
at most once per run: its sha256 is kept by (size, mtime) for as long as the finder lives, and a
file whose name matches the one the recipe records is hashed first, so a parent that is where
the recipe says costs one hash, not one per file in the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergebuild.record.hashes import remembered_sha256

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")
MAX_FILES = 100_000  # candidates looked at, at most: a --models folder is a model folder, not a disk
HEX = set("0123456789abcdef")


class ModelFinder:
    def __init__(self, dirs: list[Path] | tuple[Path, ...] = ()):
        self.dirs = [Path(d) for d in dirs]
        self._files: list[Path] | None = None
        self._sha: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)
        self.hashed = 0  # files hashed this run (for tests and the summary line)

    # --- candidates ---------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """Model files and model folders under the --models folders (symbolic links not followed)."""
        if self._files is None:
            found: list[Path] = []
            for root in self.dirs:
                for folder, subdirs, names in os.walk(root):
                    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                    here = Path(folder)
                    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
                        found.append(here)  # a Hugging Face model folder
                    found += [here / n for n in sorted(names) if n.lower().endswith(MODEL_SUFFIXES)]
                    if len(found) >= MAX_FILES:
                        break
            self._files = found[:MAX_FILES]
        return self._files

    def sha256(self, path: Path) -> str | None:
        """The file's sha256, hashed once per (size, mtime) in this run; None if it cannot be read."""
        try:
            st = path.stat()
            cached = self._sha.get(str(path))
            if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
                return cached[2]
            digest = remembered_sha256(path)  # once per file per machine (the per-user store)
        except OSError:
            return None
        self.hashed += 1
        self._sha[str(path)] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    # --- look-ups -----------------------------------------------------------------------------
    def by_hash(self, digest: str, name: str | None = None) -> Path | None:
        """The file whose sha256 is `digest` (64 hex) or starts with it (AutoV2: 10 hex)."""
        digest = str(digest).lower()
        if len(digest) < 8 or not set(digest) <= HEX:
            return None
        files = [f for f in self.files() if f.is_file()]
        stem = Path(name).stem.lower() if name else None
        first = [f for f in files if name and (f.name.lower() == Path(name).name.lower() or f.stem.lower() == stem)]
        known = [f for f in files if str(f) in self._sha and f not in first]
        rest = [f for f in files if f not in first and f not in known]
        for f in first + known + rest:
            sha = self.sha256(f)
            if sha is not None and sha.startswith(digest):
                return f
        return None

    def by_name(self, name: str) -> Path | None:
        """A candidate with this file (or folder) name, or this stem."""
        wanted = Path(str(name).replace("\\", "/")).name.lower()
        if not wanted:
            return None
        for f in self.files():
            if f.name.lower() == wanted:
                return f
        for f in self.files():
            if f.stem.lower() == Path(wanted).stem and f.is_file():
                return f
        return None

    def by_path(self, ref: str, *bases: Path) -> Path | None:
        """`ref` as a path: absolute, or relative to one of `bases` or of a --models folder, or
        its last part found in a --models folder."""
        ref = str(ref).replace("\\", "/")
        if not ref or "\x00" in ref:
            return None
        p = Path(ref).expanduser()
        if p.is_absolute():
            return p if p.exists() else None
        for base in (*bases, *self.dirs):
            if (base / p).exists():
                return base / p
        for base in self.dirs:
            if (base / p.name).exists():
                return base / p.name
        return None


def layer_count(path: Path | None) -> int | None:
    """The number of layers of a Hugging Face model folder (config.json), if it says."""
    if path is None or not path.is_dir():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 10_000:
            return value
    return None
