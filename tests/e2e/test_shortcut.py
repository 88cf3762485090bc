"""The per-merge short-circuit (planning/shortcut.py) keeps every guarantee of a full plan: in
sequences of edits, builds, other Mergefiles, gc, eviction and damaged blobs, each build computes
exactly what a build on a fresh cache would need, the output is the one a fresh cache makes, and
`status` / `-n` say what the build then does."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from mergebuild.planning.shortcut import SummarizedMerge
from mergebuild.project import BuildOptions, dry_run
from tests.conftest import load, write_model
from tests.faults.conftest import mb

pytestmark = pytest.mark.portable

TEXT = """
[settings]
cache = "cache"
[models.base]
path = "models/base.safetensors"
[models.real]
path = "models/real.safetensors"
[models.anime]
path = "models/anime.safetensors"

[merges.mix1]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = {a1}

[merges.mbw]
method = "weighted_sum"
inputs = ["mix1", "base"]
alpha = {{ default = 0.5, IN01 = {in01} }}
{dtype}

[merges.final]
method = "add_difference"
inputs = ["mbw", "anime", "base"]
alpha = {a3}
output = "{output}"
"""
BASE = {"a1": "0.4", "in01": "0.6", "a3": "0.5", "output": "out/final.safetensors", "dtype": ""}


def write(project: Path, name: str = "mergefile.toml", **changes) -> Path:
    path = project / name
    path.write_text(textwrap.dedent(TEXT.format(**{**BASE, **changes})))
    return path


def build(project: Path, *args) -> dict[str, int]:
    """Build; the tensors each merge computed."""
    result = mb(project, "-q", "--json", *args)
    assert result.code == 0, result.err
    return {n: m["computed"] for n, m in json.loads(result.out)["merges"].items()}


def reference(project: Path, tmp_path: Path, name: str = "mergefile.toml", output: str = "out/final.safetensors"):
    """The output the same Mergefile makes on a fresh cache, in a fresh folder (no summary there)."""
    fresh = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    shutil.copytree(project / "models", fresh / "models")
    shutil.copy(project / name, fresh / name)
    assert mb(fresh, "-q", "-f", name).code == 0
    return load(fresh / output)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def summarized(project: Path) -> set[str]:
    """The merges a dry run takes from their summaries (after the outputs are decided)."""
    plan, _ = dry_run(BuildOptions(mergefile=project / "mergefile.toml"))
    return {n for n, m in plan.merges.items() if isinstance(m, SummarizedMerge)}


def stale(project: Path) -> bool:
    return mb(project, "status", "--check").code == 1


def test_an_unchanged_merge_is_not_planned_again_and_the_no_op_stays_one(project):
    write(project)
    first = build(project)
    assert all(first.values())
    assert summarized(project) == {"mix1", "mbw", "final"}  # remembered by the build itself
    assert build(project) == {"mix1": 0, "mbw": 0, "final": 0} and not stale(project)
    dry = json.loads(mb(project, "-n", "--json").out)["merges"]
    assert all(m["status"] == "up to date" and m["dirty"] == m["pending"] == 0 for m in dry.values())
    assert json.loads(mb(project, "-q", "--json").out)["merges"]["final"]["ran"] is False


def test_edit_build_edit_back_and_another_mergefile(project, tmp_path):
    write(project)
    build(project)
    original = load(project / "out/final.safetensors")

    write(project, in01="0.65")  # one block of the middle merge
    assert summarized(project) == {"mix1"}
    assert stale(project) and "mbw.alpha IN01: 0.6 -> 0.65" in mb(project, "status").out
    computed = build(project)
    assert computed["mix1"] == 0 and computed["mbw"] > 0 and computed["final"] > 0
    assert same(load(project / "out/final.safetensors"), reference(project, tmp_path))

    write(project)  # back: every merge is known, the output holds the other recipe
    assert summarized(project) == {"mix1", "mbw"}  # final is planned in full: it writes its output
    assert stale(project) and "mbw.alpha IN01: 0.65 -> 0.6" in mb(project, "status").out
    assert build(project) == {"mix1": 0, "mbw": 0, "final": 0}  # written from the cache
    assert same(load(project / "out/final.safetensors"), original) and not stale(project)

    other = write(project, "other.toml", a1="0.9", output="out/other.safetensors")
    computed = build(project, "-f", other.name)
    assert all(computed.values())  # mix1 differs, so everything downstream does
    assert same(load(project / "out/other.safetensors"), reference(project, tmp_path, "other.toml",
                                                                   "out/other.safetensors"))
    assert not stale(project) and build(project) == {"mix1": 0, "mbw": 0, "final": 0}


def test_a_changed_dtype_and_force(project, tmp_path):
    write(project)
    build(project)
    write(project, dtype='dtype = "bfloat16"')
    assert stale(project)
    computed = build(project)
    assert computed["mix1"] == 0 and computed["mbw"] > 0
    assert load(project / "out/final.safetensors")["model.diffusion_model.out.0.bias"].dtype.is_floating_point
    assert same(load(project / "out/final.safetensors"), reference(project, tmp_path))
    forced = build(project, "--force")
    assert all(forced.values())


def test_gc_eviction_and_a_deleted_output_rebuild_what_is_missing(project, tmp_path):
    write(project)
    build(project)
    original = load(project / "out/final.safetensors")
    assert mb(project, "cache", "gc", "--keep", "0").code == 0
    assert not stale(project) and build(project) == {"mix1": 0, "mbw": 0, "final": 0}

    shutil.rmtree(project / "cache/objects")  # every intermediate gone (as eviction leaves it)
    assert not stale(project)  # the output is still what the recipe makes
    (project / "out/final.safetensors").unlink()
    assert stale(project) and "out/final.safetensors is missing" in mb(project, "status").out
    dry = json.loads(mb(project, "-n", "--json").out)["merges"]
    assert dry["mix1"]["dirty"] > 0 and dry["mbw"]["pending"] > 0  # the summaries do not hide it
    computed = build(project)
    assert computed["mix1"] > 0 and computed["mbw"] > 0
    assert same(load(project / "out/final.safetensors"), original)
    assert not stale(project) and build(project) == {"mix1": 0, "mbw": 0, "final": 0}


def _rewrite_in_place(path: Path) -> None:
    """Other values, the same size, written over the file; then its mtime put back (`cp -p`)."""
    st = path.stat()
    tensors = {k: v + 1 if v.is_floating_point() else v for k, v in load(path).items()}
    write_model(path.with_name("tmp.safetensors"), tensors)
    with open(path, "r+b") as f:
        f.write(path.with_name("tmp.safetensors").read_bytes())
    path.with_name("tmp.safetensors").unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_source_rewritten_in_place_behind_its_mtime(project, tmp_path):
    write(project)
    build(project)
    _rewrite_in_place(project / "models/base.safetensors")
    assert summarized(project) == {"mix1"}  # mix1 does not read base
    assert stale(project) and "models.base: content changed" in mb(project, "status").out
    computed = build(project)
    assert computed["mix1"] == 0 and computed["mbw"] > 0 and computed["final"] > 0
    assert same(load(project / "out/final.safetensors"), reference(project, tmp_path))


def test_a_damaged_blob_of_a_summarized_merge_is_recomputed(project, tmp_path):
    write(project)
    build(project)
    for blob in (project / "cache/objects").rglob("*"):  # every intermediate's bytes, damaged
        if blob.is_file():
            data = bytearray(blob.read_bytes())
            data[0] ^= 0xFF
            os.chmod(blob, 0o644)
            blob.write_bytes(bytes(data))
    write(project, a3="0.7")  # final is computed from mbw's blobs: mbw must be planned anew
    assert summarized(project) == {"mix1", "mbw"}
    computed = build(project)
    assert computed["final"] > 0
    assert same(load(project / "out/final.safetensors"), reference(project, tmp_path))
    assert mb(project, "cache", "verify").code == 0


def test_restored_tasks_are_the_ones_a_full_plan_makes(project):
    import sqlite3

    import mergebuild

    write(project)
    build(project)
    restored = mergebuild.plan(project / "mergefile.toml")  # read after its cache is closed, as API callers do
    assert {n for n, m in restored.merges.items() if isinstance(m, SummarizedMerge)} == {"mix1", "mbw", "final"}
    with sqlite3.connect(project / "cache/index.sqlite") as db:
        db.execute("DELETE FROM plan_summaries")
    full = mergebuild.plan(project / "mergefile.toml")
    assert not any(isinstance(m, SummarizedMerge) for m in full.merges.values())
    for name, merge in full.merges.items():
        mine = restored.merges[name]
        assert mine.identity == merge.identity and mine.warnings == merge.warnings
        assert mine.method_tasks == merge.method_tasks and len(mine.tasks) == len(merge.tasks)
        assert [(t.name, t.dtype, t.shape, t.inputs, t.key, t.digest, t.state) for t in mine.tasks.values()] == \
            [(t.name, t.dtype, t.shape, t.inputs, t.key, t.digest, t.state) for t in merge.tasks.values()]
        assert restored.recipe.nodes[name] == full.recipe.nodes[name]
