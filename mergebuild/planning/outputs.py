"""Where outputs may go: refused at plan time, before anything is read or written.

An output is replaced by every build, so it must never name anything else the build knows: a
source, the Mergefile, its lock, the cache, another output, or a place inside a source's model
folder, the cache or a folder output. An existing file is replaced only when mergebuild wrote
it; an existing folder only when its manifest accounts for every file in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebuild.errors import MergefileError
from mergebuild.mergefile.model import Mergefile
from mergebuild.tensors.folder import foreign_files, is_folder_output, written_by_mergebuild


def lock_path(mergefile: Path) -> Path:
    return Path(mergefile).with_suffix(".lock")


def check_outputs(mf: Mergefile, cache_root: Path, targets: list[str] | None = None) -> None:
    """Refuse (exit 2, naming the field) every output that could destroy something."""
    known = [("the Mergefile", mf.path, False), ("the Mergefile's lock", lock_path(mf.path), False),
             ("the cache", Path(cache_root), True)]
    known += [(f"[models.{n}]", m.path, m.path.is_dir()) for n, m in mf.models.items()]
    outputs = [(n, m.output) for n, m in mf.merges.items() if m.output is not None]
    for name, out in outputs:
        if targets and name not in targets:
            continue
        others = [(f"the output of [merges.{n}]", o, is_folder_output(o)) for n, o in outputs if n != name]
        for what, path, is_folder in known + others:
            problem = _conflict(out, path, is_folder)
            if problem:
                raise MergefileError(mf.path, f"merges.{name}", "output", f"{out} {problem} {what}")
        problem = _existing(out)
        if problem:
            raise MergefileError(mf.path, f"merges.{name}", "output", problem)


def _conflict(out: Path, other: Path, other_is_folder: bool) -> str | None:
    if same_path(out, other):
        return "is"
    if is_within(other, out):
        return "contains"
    if other_is_folder and is_within(out, other):
        return "lies inside"
    return None


def _existing(out: Path) -> str | None:
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{out}: {parent} is a file, not a folder the output could go in"
            break
    try:
        if out.is_symlink() and not out.exists():
            return f"{out} is a broken symbolic link; remove it or name another output"
        exists = out.exists()
    except OSError as e:
        return f"{out}: {e.strerror}"
    if not exists:
        return None
    if not is_folder_output(out):
        if out.is_dir():
            return f"{out} is an existing folder, but the output is a .safetensors file; name another output"
        if out.stat().st_size and not written_by_mergebuild(out):
            return (f"{out} exists and was not written by mergebuild; move it away or name another output "
                    "(mergebuild replaces only its own files)")
        return None
    if not out.is_dir():
        return (f"{out} is an existing file, but an output without the .safetensors suffix is a model folder; "
                "name the output NAME.safetensors, or another folder")
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (f"{out} is a folder holding files mergebuild did not write ({shown}); "
                "move them away or name another output folder")
    return None


def same_path(a: Path, b: Path) -> bool:
    if _resolved(a) == _resolved(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def is_within(child: Path, parent: Path) -> bool:
    """Whether `child` lies strictly inside folder `parent` (symlinks and, for existing paths,
    case-insensitive file systems included)."""
    c, p = _resolved(child), _resolved(parent)
    if p in c.parents:
        return True
    if not parent.exists():
        return False
    for ancestor in c.parents:
        try:
            if ancestor.exists() and os.path.samefile(ancestor, parent):
                return True
        except OSError:
            continue
    return False


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))
