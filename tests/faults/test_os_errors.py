"""5. Every failure is one line naming the file and what to do: full and read-only disks, a
broken cache, impossible paths, deep TOML, untrusted lineage metadata."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import write_model
from tests.faults.conftest import big_sources, leftovers, mb, model, recovers, write_mergefile


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (skips where this machine cannot mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _read_only(path: Path) -> None:
    """Make a mounted tmpfs read-only (as root, permission bits would not stop writes)."""
    if subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount read-only here")


@pytest.mark.slow
def test_an_output_disk_that_fills_up(tmp_path):
    big_sources(tmp_path, tensors=8)  # 8 MB per model
    with small_disk(tmp_path / "out", "2m"):
        write_mergefile(tmp_path)
        r = mb(tmp_path, "-q")
        r.one_line_error(1, "No space left on device", "the disk is full", str(tmp_path / "out"))
        assert not leftovers(tmp_path) and not any((tmp_path / "out").iterdir())
        write_mergefile(tmp_path, "elsewhere/m.safetensors")
        assert mb(tmp_path, "cache", "verify").code == 0
    recovers(tmp_path, "elsewhere/m.safetensors")


@pytest.mark.slow
def test_a_cache_disk_that_fills_up(tmp_path):
    big_sources(tmp_path, tensors=8)
    (tmp_path / "mergefile.toml").write_text(
        '[settings]\ncache = "cache"\n[models.a]\npath = "models/a.safetensors"\n[models.b]\npath = "models/b.safetensors"\n'
        '[merges.mid]\nmethod = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.5\n'
        '[merges.m]\nmethod = "add_difference"\ninputs = ["mid", "a", "b"]\nalpha = 0.3\noutput = "out/m.safetensors"\n')
    with small_disk(tmp_path / "cache", "3m"):
        r = mb(tmp_path, "-q")
        r.one_line_error(1, "the disk is full")
        assert not (tmp_path / "out/m.safetensors").exists() and not leftovers(tmp_path)
        verify = json.loads(mb(tmp_path, "cache", "verify", "--json").out)
        assert verify["bad_removed"] == 0 and verify["missing"] == 0  # no entry without its bytes
    recovers(tmp_path)


def test_a_read_only_cache_still_answers_dry_runs_and_status(two):
    with small_disk(two / "cache", "20m"):
        assert mb(two, "-q").code == 0
        _read_only(two / "cache")
        assert mb(two, "-n").code == 0
        status = mb(two, "status", "--check")
        assert status.code == 0 and "up to date" in status.out
        assert mb(two, "cache", "stats").code == 0
        write_mergefile(two, alpha="0.6")
        assert mb(two, "-n").out.startswith("m: ")
        r = mb(two, "-q")
        r.one_line_error(1, str(two / "cache"), "read-only")
    assert not leftovers(two)


def test_a_corrupt_index_is_one_line_with_what_to_do(two):
    assert mb(two, "-q").code == 0
    (two / "cache/index.sqlite").write_bytes(b"this is not a database" * 100)
    for f in two.glob("cache/index.sqlite-*"):
        f.unlink()
    for args in (("-q",), ("-n",), ("status",), ("cache", "stats"), ("cache", "verify")):
        mb(two, *args).one_line_error(1, "cache index", "delete index.sqlite")
    for f in two.glob("cache/index.sqlite*"):
        f.unlink()
    recovers(two)


@pytest.mark.parametrize("where", ["cache", "cache/objects", "cache/tmp"])
def test_a_file_where_the_cache_expects_a_folder(two, where):
    assert mb(two, "-q").code == 0 if where != "cache" else True
    target = two / where
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    target.write_text("in the way")
    write_mergefile(two, alpha="0.6")
    r = mb(two, "-q")
    r.one_line_error(1, str(target))
    assert target.read_text() == "in the way"


@pytest.mark.parametrize("field, value, words", [
    ("output", "out/nul\\u0000.safetensors", "NUL character"),
    ("output", "out/" + "x" * 300 + ".safetensors", "too long"),
    ("path", "models/" + "y" * 5000, "too long"),
])
def test_impossible_paths_are_refused_by_field(two, field, value, words):
    text = (two / "mergefile.toml").read_text()
    if field == "output":
        text = text.replace('output = "out/m.safetensors"', f'output = "{value}"')
    else:
        text = text.replace('path = "models/a.safetensors"', f'path = "{value}"')
    (two / "mergefile.toml").write_text(text)
    mb(two, "-q").one_line_error(2, field, words)


def test_very_deep_toml(two):
    (two / "mergefile.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    mb(two, "-q").one_line_error(2, "mergefile.toml", "invalid TOML")


BAD_LINEAGE = {
    "recipe is a list": {"mergebuild.recipe": "[1, 2, 3]"},
    "recipe not JSON": {"mergebuild.recipe": "{nope"},
    "nodes of the wrong types": {"mergebuild.recipe": json.dumps({"format": 2, "target": "x", "nodes": {
        "x": {"kind": "merge", "method": 7, "params": "alpha", "inputs": "y"}, "y": [1]}})},
    "old nested tree of the wrong shape": {"mergebuild.recipe": json.dumps(
        {"kind": "merge", "inputs": [{"kind": 5}, "str", None, {"kind": "model", "made_by": [1]}]})},
    "A1111 recipe a string": {"sd_merge_recipe": '"just text"', "sd_merge_models": "[]"},
    "A1111 hashes of the wrong type": {"sd_merge_recipe": json.dumps({"primary_model_hash": 5, "model_b": ["x"]}),
                                       "sd_merge_models": json.dumps({"5": "not an object"})},
    "A1111 nested recipe loops": {"sd_merge_recipe": json.dumps({"primary_model_hash": "aa"}),
                                  "sd_merge_models": json.dumps({"aa": {"name": "a", "sd_merge_recipe": json.dumps(
                                      {"primary_model_hash": "aa"})}})},
    "ModelSpec merged_from odd": {"modelspec.merged_from": ",,, ,", "modelspec.title": "t"},
}


@pytest.mark.parametrize("case", list(BAD_LINEAGE))
def test_foreign_lineage_that_does_not_fit_is_dropped_never_a_crash(two, case):
    write_model(two / "models/b.safetensors", model(2), metadata=BAD_LINEAGE[case])
    r = mb(two, "-q")
    assert r.code == 0 and "Traceback" not in r.err, r.err
    for args in (("lineage", "out/m.safetensors"), ("lineage", "models/b.safetensors"),
                 ("inspect", "models/b.safetensors", "--no-hashes"), ("lineage", "out/m.safetensors", "--json")):
        got = mb(two, *args)
        assert got.code == 0 and "Traceback" not in got.err, (args, got.err)
    recovers(two)
