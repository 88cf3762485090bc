"""mergefile.lock: what each merge was last built from and what it produced, meant to be
committed beside the Mergefile (like dvc.lock).

Per merge: its recipe node (method, version, parameters as written, selections, the settings
that reach it), its identity, input files (path relative to the Mergefile, size, sha256), the
number of tensors and a digest of their contents; for targets also the output (path, size,
sha256, AutoV2, identity; the sha256 and AutoV2 when the build knew them: a build does not read
an output again only to hash it, docs/caching.md). JSON with sorted keys, so diffs stay small.
`status` does not need it: it asks the outputs themselves (record/state.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergebuild import __version__
from mergebuild.planning.outputs import lock_path
from mergebuild.portable import replace
from mergebuild.planning.planner import Plan
from mergebuild.record.hashes import autov2, known_hashes
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
        same = previous and previous.get("identity") == plan.merges[name].identity
        if same and ("output" not in entry or ("sha256" not in entry["output"] and "sha256" in previous)):
            entry["output"] = previous  # the same output (its identity fixes its bytes): what was known of it
    for name, entry in doc["merges"].items():
        _add_known_hash(plan, name, entry)
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
    marker = output_marker(merge.spec.output) if merge.spec.output is not None else None
    if marker is not None and marker.exists():
        entry["output"] = {"path": _relative(merge.spec.output, base), "size": marker.stat().st_size,
                           "identity": merge.identity}
        if output_sha256 is not None:
            entry["output"].update(sha256=output_sha256, autov2=autov2(output_sha256))
    return entry


def _add_known_hash(plan: Plan, name: str, entry: dict) -> None:
    """An output's sha256 and AutoV2, once something computed them (`inspect`, `lineage`, a
    later build that read the file): the per-user store knows them for the file as it is."""
    output, merge = entry.get("output"), plan.merges.get(name)
    if not output or "sha256" in output or merge is None or merge.spec.output is None:
        return
    if not merge.current or output.get("identity") != merge.identity:
        return
    sha = known_hashes(output_marker(merge.spec.output))[0]
    if sha is not None:
        output.update(sha256=sha, autov2=autov2(sha))


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
