"""The cache stays bounded: a one-block tweak adds about the bytes of the tensors it changed (not
a whole model), `cache_limit` holds the cache under it without user action, and `cache stats`
counts what `du` counts."""

from __future__ import annotations

import pytest

import json
import os
import textwrap

from mergebuild.testing.fabricate import layout_keys, make_base
from tests.conftest import write_model
from tests.faults.conftest import mb

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

TEXT = """
[settings]
cache = "cache"
{settings}
[models.real]
path = "real.safetensors"
[models.anime]
path = "anime.safetensors"
[merges.mix]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = {{ default = 0.5, IN07 = {v} }}
[merges.final]
method = "add_difference"
inputs = ["mix", "anime", "real"]
alpha = 0.3
output = "out/final.safetensors"
dtype = "float16"
"""


def du(folder) -> int:
    """Bytes on disk, as `du` counts them (SQLite's write-ahead log comes and goes: left out)."""
    total = 0
    for root, dirs, files in os.walk(folder):
        total += sum(os.lstat(os.path.join(root, f)).st_blocks * 512 for f in files if not f.endswith(("-wal", "-shm")))
        total += sum(os.lstat(os.path.join(root, d)).st_blocks * 512 for d in dirs)
    return total


def sdxl_project(tmp_path):
    keys = layout_keys("sdxl-sgm", shrink=16)
    base = make_base(keys, seed=1)
    for seed, name in ((2, "real"), (3, "anime")):
        tuned = make_base(keys, seed=seed)
        write_model(tmp_path / f"{name}.safetensors", {k: (base[k] + 0.05 * tuned[k]) if v.is_floating_point() else v
                                                       for k, v in tuned.items()})
    return base


def write(tmp_path, v, settings=""):
    (tmp_path / "mergefile.toml").write_text(textwrap.dedent(TEXT.format(v=v, settings=settings)))


def test_one_block_tweaks_grow_the_cache_by_about_what_they_changed(tmp_path):
    base = sdxl_project(tmp_path)
    write(tmp_path, 0.1)
    assert mb(tmp_path, "-q").code == 0
    model = (tmp_path / "out/final.safetensors").stat().st_size
    in07 = [k for k in base if ".input_blocks.7." in k and base[k].is_floating_point()]
    dirty = 2 * sum(base[k].numel() * 2 for k in in07)  # IN07 in mix and in final, fp16
    growth = []
    for v in (0.2, 0.3, 0.4, 0.5, 0.6):
        before = du(tmp_path / "cache")
        write(tmp_path, v)
        doc = json.loads(mb(tmp_path, "--json", "-q").out)
        assert doc["merges"]["mix"]["computed"] == len(in07) and doc["merges"]["final"]["written"]
        growth.append(du(tmp_path / "cache") - before)
    assert max(growth) <= 2 * dirty + (1 << 20), (growth, dirty, model)  # not a model per tweak

    stats = json.loads(mb(tmp_path, "cache", "stats", "--json").out)
    assert abs(stats["bytes"] - du(tmp_path / "cache")) <= 0.05 * du(tmp_path / "cache") + (64 << 10)

    # a limit below what the cache holds: the next build brings it under, the one after does nothing
    limit = du(tmp_path / "cache") * 2 // 3
    write(tmp_path, 0.7, settings=f"cache_limit = {limit}")
    doc = json.loads(mb(tmp_path, "--json", "-q").out)
    assert doc["cache"]["bytes"] <= limit == doc["cache"]["limit"] and doc["warnings"] == []
    assert du(tmp_path / "cache") <= limit * 1.05
    again = json.loads(mb(tmp_path, "--json", "-q").out)
    assert all(m["computed"] == 0 for m in again["merges"].values())

    # undoing a tweak costs nothing while its tensors are still kept
    write(tmp_path, 0.6, settings=f"cache_limit = {limit}")
    undo = json.loads(mb(tmp_path, "--json", "-q").out)
    assert undo["merges"]["mix"]["computed"] + undo["merges"]["final"]["computed"] <= 2 * len(in07)


def test_a_limit_smaller_than_what_the_targets_need_is_kept_with_one_warning(tmp_path):
    sdxl_project(tmp_path)
    write(tmp_path, 0.1, settings="cache_limit = 1000")
    r = mb(tmp_path, "-q")
    assert r.code == 0 and r.err.count("warning:") == 1 and "over its limit" in r.err, r.err
    assert json.loads(mb(tmp_path, "--json", "-q").out)["merges"]["mix"]["computed"] == 0  # kept what it needs


def test_the_smaller_limit_of_two_mergefiles_wins_and_env_overrides(tmp_path):
    sdxl_project(tmp_path)
    write(tmp_path, 0.1, settings='cache_limit = "900GB"')
    (tmp_path / "other.toml").write_text(textwrap.dedent(TEXT.format(v=0.9, settings='cache_limit = "800GB"'))
                                         .replace("out/final", "out/other"))
    assert mb(tmp_path, "-f", "other.toml", "-q").code == 0
    doc = json.loads(mb(tmp_path, "--json", "-q").out)
    assert doc["cache"]["limit"] == 800 * 10**9
    doc = json.loads(mb(tmp_path, "--json", "-q", env={"MERGEBUILD_CACHE_LIMIT": "700GB"}).out)
    assert doc["cache"]["limit"] == 700 * 10**9
    (tmp_path / "other.toml").unlink()  # a Mergefile that is gone limits and protects nothing
    assert json.loads(mb(tmp_path, "--json", "-q").out)["cache"]["limit"] == 900 * 10**9


def test_gc_protects_every_mergefile_that_uses_the_cache(tmp_path):
    sdxl_project(tmp_path)
    write(tmp_path, 0.1)
    assert mb(tmp_path, "-q").code == 0
    (tmp_path / "other.toml").write_text(textwrap.dedent(TEXT.format(v=0.9, settings="")).replace("out/final", "out/o"))
    assert mb(tmp_path, "-f", "other.toml", "-q").code == 0
    assert mb(tmp_path, "cache", "gc", "--keep", "0").code == 0
    (tmp_path / "out/o.safetensors").unlink()
    doc = json.loads(mb(tmp_path, "-f", "other.toml", "--json", "-q").out)["merges"]
    assert doc["mix"]["computed"] == 0  # the other Mergefile's intermediate survived gc run from here
