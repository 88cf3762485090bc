"""mergefile.lock: what each merge was last built from and what it produced, meant to be
committed beside the Mergefile (like dvc.lock). `mergebuild status` compares against it.

Per merge: method, version, the resolved parameters and selections, input files (path relative
to the Mergefile, size, sha256), the number of tensors and a digest of their contents; for
targets also the output (path, size, sha256, AutoV2). JSON with sorted keys, so diffs stay small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergebuild import __version__
from mergebuild.explain import merge_fingerprint
from mergebuild.plan.planner import Plan
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import autov2, file_sha256, text_digest
from mergebuild.tensors.folder import output_marker

LOCK_SCHEMA = 1


def lock_path(mergefile: Path) -> Path:
    return Path(mergefile).with_suffix(".lock")


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
    for name in results:
        previous = doc["merges"].get(name, {}).get("output")
        doc["merges"][name] = entry = _entry(plan, name, output_hashes.get(name))
        unchanged = previous and previous.get("digest") == plan.merges[name].output_digest
        if "output" not in entry and unchanged:
            entry["output"] = previous
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return path  # a no-op build touches nothing
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)
    return path


def _entry(plan: Plan, name: str, output_sha256: str | None) -> dict:
    base = plan.mergefile.path.parent
    entry = {k: v for k, v in merge_fingerprint(plan, name).items() if k != "files"}
    entry["input_files"] = {
        n: {"path": _relative(plan.sources[n].path, base), "sha256": plan.sources[n].sha256,
            "size": sum(st.st_size for _, st in plan.sources[n].parts)}
        for n in plan.mergefile.merges[name].inputs if n in plan.sources
    }
    merge = plan.merges[name]
    entry["tensors"] = len(merge.tasks)
    entry["content"] = content_digest(plan, name)
    if merge.spec.output is not None and output_sha256 is not None:
        entry["output"] = {"path": _relative(merge.spec.output, base), "sha256": output_sha256,
                           "autov2": autov2(output_sha256), "size": output_marker(merge.spec.output).stat().st_size,
                           "digest": merge.output_digest}
    return entry


def content_digest(plan: Plan, name: str) -> str | None:
    tasks = plan.merges[name].tasks.values()
    if any(t.digest is None for t in tasks):
        return None
    return text_digest(json.dumps([[t.name, t.digest] for t in tasks]))


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def status(plan: Plan, cache: Cache, lock: dict | None) -> dict[str, list[str]]:
    """For every merge of the plan, its own reasons to be out of date with the lock ([] when
    none; a merge is also out of date when an input merge is)."""
    entries = (lock or {}).get("merges", {})
    reasons: dict[str, list[str]] = {}
    for name in plan.order:
        if name not in plan.merges:
            continue
        entry = entries.get(name)
        if entry is None:
            reasons[name] = ["not in mergefile.lock (never built)"]
            continue
        now = merge_fingerprint(plan, name)
        out = _setting_changes(entry, now)
        out += _file_changes(plan, cache, name, entry)
        out += _output_changes(plan, cache, name, entry)
        reasons[name] = out
    return reasons


def _setting_changes(entry: dict, now: dict) -> list[str]:
    from mergebuild.explain import changes

    return changes(entry, {k: v for k, v in now.items() if k != "files"})


def _file_changes(plan: Plan, cache: Cache, name: str, entry: dict) -> list[str]:
    out = []
    for n in plan.mergefile.merges[name].inputs:
        if n not in plan.sources:
            continue
        source, locked = plan.sources[n], entry.get("input_files", {}).get(n)
        if locked is None:
            out.append(f"input file {source.path} is new")
            continue
        size = sum(st.st_size for _, st in source.parts)
        if size != locked.get("size") or _sha256(cache, source) != locked.get("sha256"):
            out.append(f"input file {source.path} changed")
    return out


def _sha256(cache: Cache, source) -> str:
    if source.sha256 is None:
        source.sha256 = file_sha256(source.hash_file)
        cache.index.save_sha256(str(source.hash_file), source.stat, source.sha256)
    return source.sha256


def _output_changes(plan: Plan, cache: Cache, name: str, entry: dict) -> list[str]:
    output = plan.mergefile.merges[name].output
    if output is None:
        return []
    locked = entry.get("output")
    marker = output_marker(output)
    if locked is None or not marker.exists():
        return [f"output {output} missing"]
    stat = marker.stat()
    if stat.st_size != locked["size"]:
        return [f"output {output} changed on disk"]
    # the index knows what this very file (same stat) holds; hash it only when it does not
    if cache.index.output_digest(str(output), stat) != locked.get("digest") and file_sha256(marker) != locked["sha256"]:
        return [f"output {output} changed on disk"]
    return []
