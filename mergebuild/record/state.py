"""What a build would change, and why: the one answer `build`, `-n`, `status` and `explain` share.

A target is current exactly when a build would leave its output byte for byte as it is: the
output exists, is unchanged since mergebuild wrote it, and was made from the recipe the
Mergefile describes now (its identity, planning/recipe.py). That holds whatever was built in
between: intermediates alone, other targets, other Mergefiles on the same cache. The reason a
merge has work is the difference between the recipe it was last built from and the recipe now.
"""

from __future__ import annotations

from pathlib import Path

from mergebuild.planning.recipe import IDENTITY_KEY, changes, recorded_nodes
from mergebuild.planning.shortcut import settle
from mergebuild.planning.sources import remember_sha256
from mergebuild.store.cache import Cache
from mergebuild.record.hashes import file_sha256, tensor_data_sha256
from mergebuild.tensors.folder import foreign_files, is_folder_output, output_marker, read_manifest
from mergebuild.tensors.header import read_header


def decide_outputs(plan, cache: Cache, force: bool = False) -> None:
    """Which merges' outputs are current, and which merges the build must run."""
    graph = plan.graph
    base = plan.mergefile.path.parent
    for name, merge in plan.merges.items():
        if merge.spec.output is not None:
            merge.current, merge.stale_why = (False, "--force") if force else output_state(cache, merge, base)
    needed: set[str] = set()
    for name, merge in plan.merges.items():
        if name in plan.targets and (merge.spec.output is None or not merge.current):
            needed.add(name)
        elif merge.spec.output is not None and not merge.current:
            needed.add(name)  # an upstream merge that has an output of its own: kept current too
    for name in list(needed):
        needed |= {a for a in graph.ancestors(name) if a in plan.merges}
    for name, merge in plan.merges.items():
        merge.needed = name in needed
    settle(plan, cache)  # a merge restored from its summary that the build runs: its bytes checked


def output_state(cache: Cache, merge, base: Path | None = None) -> tuple[bool, str]:
    """(current, why not): whether the output holds what the recipe makes, as it is on disk."""
    out = merge.spec.output
    shown = _shown(out, base)
    marker = output_marker(out)
    if not marker.exists():
        return False, f"{shown} is missing"
    recorded = cache.index.output(str(out))
    if recorded is not None and recorded[0] == merge.identity and _files_unchanged(cache, out):
        return True, ""
    # the cache does not know the file as it is now: ask the file itself
    metadata = _metadata(out)
    if metadata is None:
        return False, f"{shown} is not a readable output"
    if metadata.get(IDENTITY_KEY) != merge.identity:
        return False, f"{shown} was built from another recipe"
    if not _data_intact(out, metadata):
        return False, f"{shown} changed on disk"
    return True, ""


def _shown(path: Path, base: Path | None) -> str:
    """A path as the Mergefile writes it: relative to its folder when below it."""
    try:
        return str(Path(path).relative_to(base)) if base is not None else str(path)
    except ValueError:
        return str(path)


def _files_unchanged(cache: Cache, out: Path) -> bool:
    files = [p for p, (_, _, owner) in cache.index.files("output").items() if owner == str(out)]
    return bool(files) and all(cache._file_valid(p) for p in files) and str(output_marker(out)) in files


def _metadata(out: Path) -> dict | None:
    try:
        if is_folder_output(out):
            shards = sorted(n for n in (read_manifest(out) or {}) if n.endswith(".safetensors"))
            return read_header(out / shards[0]).metadata if shards else None
        return read_header(out).metadata
    except Exception:  # a damaged output is simply not current
        return None


def _data_intact(out: Path, metadata: dict) -> bool:
    """The tensors are the ones written: their sha256 (files) or the manifest's hashes (folders)."""
    if is_folder_output(out):
        return not foreign_files(out)
    expected = metadata.get("modelspec.hash_sha256", "").removeprefix("0x")
    return bool(expected) and tensor_data_sha256(out) == expected


# --- why -------------------------------------------------------------------------------------
def reasons(plan, cache: Cache, force: bool = False) -> dict[str, list[str]]:
    """For every merge the build would run and that has work, why, most specific first."""
    out = {}
    mergefile = str(plan.mergefile.path)
    for name, merge in plan.merges.items():
        work = merge.needed and (merge.count("dirty") or merge.count("pending")
                                 or (merge.spec.output is not None and not merge.current))
        if not work:
            continue
        if force:
            out[name] = ["--force"]
            continue
        out[name] = _why(plan, cache, mergefile, name, merge)
    return out


def _why(plan, cache: Cache, mergefile: str, name: str, merge) -> list[str]:
    recorded = _recorded(plan, cache, mergefile, name, merge)
    if recorded is None:
        lines = ["never built from this Mergefile"]
    else:
        lines = recipe_changes(plan, recorded, name, cache)
    if not lines:
        if merge.spec.output is not None and not merge.current:
            lines = [merge.stale_why]
        else:
            lines = ["cache entries missing (the cache was cleared, collected or moved)"]
    return lines


def _recorded(plan, cache: Cache, mergefile: str, name: str, merge) -> dict[str, dict] | None:
    """The nodes `name` was last built from: its output's own recipe, else the index's."""
    if merge.spec.output is not None:
        metadata = _metadata(merge.spec.output) if output_marker(merge.spec.output).exists() else None
        nodes = recorded_nodes(metadata or {})
        if nodes is not None and name in nodes:
            return nodes
    closure = cache.index.last_closure(mergefile, name)
    if closure is None:
        return None
    stored = cache.index.recipe_nodes(list(closure.values()))
    return {n: stored[i] for n, i in closure.items() if i in stored}


def recipe_changes(plan, recorded: dict[str, dict], name: str, cache: Cache | None = None) -> list[str]:
    """The changes between the recorded nodes and the recipe now, over `name` and its inputs."""
    lines: list[str] = []
    for node in plan.recipe.closure(name):
        blocks = plan.merges[node].arch.blocks if node in plan.merges and plan.merges[node].arch else ()
        now = plan.recipe.nodes[node]
        old = recorded.get(node)
        if node in plan.sources and old is not None and old.get("content") != now.get("content"):
            now = {**now, "sha256": _sha256(plan.sources[node], cache)}  # named by the hash users know
        for line in changes(node, old, now, blocks):
            if line not in lines:
                lines.append(line)
    return lines


def _sha256(source, cache: Cache | None) -> str:
    if source.sha256 is None:
        sha = file_sha256(source.hash_file)
        if cache is not None:
            remember_sha256(source, cache, sha)
        source.sha256 = sha
    return source.sha256
