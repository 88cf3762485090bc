"""mergefile.lock: what each merge was last built from and what it produced, meant to be
committed beside the Mergefile (like dvc.lock).

Per merge: its recipe node (method, version, parameters as written, selections, the settings
that reach it), its identity, input files (path relative to the Mergefile, size, sha256), the
number of tensors and a digest of their contents; for targets also the output (path, size,
sha256, AutoV2, identity). JSON with sorted keys, so diffs stay small. `status` does not need
it: it asks the outputs themselves (record/state.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergebuild import __version__
from mergebuild.planning.outputs import lock_path
from mergebuild.portable import replace
from mergebuild.planning.planner import Plan
from mergebuild.record.hashes import autov2
from mergebuild.store.hashing import text_digest
from mergebuild.tensors.folder import output_marker

LOCK_SCHEMA = 1
__all__ = ["lock_path", "read_lock", "write_lock", "content_digest"]


def read_lock(mergefile: Path) -> dict | None:
    try:
        doc = json.loads(lock_path(mergefile).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == LOCK_SCHEMA else None


def write_lock(plan: Plan, results: dict, output_hashes: dict[str, str]) -> Path:
    """Update the lock with the merges just built (others keep their entries)."""
    path = lock_path(plan.mergefile.path)
    doc = read_lock(plan.mergefile.path) or {"schema": LOCK_SCHEMA, "merges": {}}
    doc["mergebuild"] = __version__
    for name, result in results.items():
        if not result.ran:
            continue
        previous = doc["merges"].get(name, {}).get("output")
        doc["merges"][name] = entry = _entry(plan, name, output_hashes.get(name))
        if "output" not in entry and previous and previous.get("identity") == plan.merges[name].identity:
            entry["output"] = previous
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    try:
        if path.exists() and path.read_text() == text:
            return path  # a no-op build touches nothing
    except OSError:
        pass
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(text)
        replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _entry(plan: Plan, name: str, output_sha256: str | None) -> dict:
    base = plan.mergefile.path.parent
    entry = {k: v for k, v in plan.recipe.nodes[name].items() if k not in ("kind", "tool")}
    entry["compute_dtype"] = entry.get("settings", {}).get("compute_dtype")
    entry["identity"] = plan.merges[name].identity
    entry["input_files"] = {
        n: {"path": _relative(plan.sources[n].path, base), "sha256": plan.sources[n].sha256,
            "size": plan.sources[n].size()}
        for n in plan.mergefile.merges[name].inputs if n in plan.sources
    }
    merge = plan.merges[name]
    entry["tensors"] = len(merge.tasks)
    entry["content"] = content_digest(plan, name)
    if merge.spec.output is not None and output_sha256 is not None:
        entry["output"] = {"path": _relative(merge.spec.output, base), "sha256": output_sha256,
                           "autov2": autov2(output_sha256), "size": output_marker(merge.spec.output).stat().st_size,
                           "identity": merge.identity}
    return entry


def content_digest(plan: Plan, name: str) -> str | None:
    tasks = plan.merges[name].tasks.values()
    if any(t.digest is None for t in tasks):
        return None
    return text_digest(json.dumps([[t.name, t.digest] for t in tasks]))


def _relative(path: Path, base: Path) -> str:
    """Relative to the Mergefile, with `/`: the lock reads the same on every system."""
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return Path(path).as_posix()
