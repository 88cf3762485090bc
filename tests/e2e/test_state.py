"""Status tells the truth: for each kind of edit, `status --check` says stale exactly when the
next build changes the output's bytes, and `status`, `-n -v` and `explain` name the real cause
in one format (`mbw.alpha IN01: 0.6 -> 0.65`)."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap

import pytest

from mergebuild.methods import registry
from tests.conftest import load, write_model
from tests.faults.conftest import mb

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

SETTINGS = ""
TEXT = """
[settings]
cache = "cache"
{settings}
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
{rules}

[merges.final]
method = "add_difference"
inputs = ["mbw", "anime", "base"]
alpha = 0.5
output = "{output}"
{final}
"""
BASE = {"settings": "", "a1": "0.4", "in01": "0.6", "output": "out/final.safetensors", "final": "",
        "rules": '[[merges.mbw.rules]]\nmatch = "proj_in"\nalpha = 0.2'}


def write(project, **changes):
    (project / "mergefile.toml").write_text(textwrap.dedent(TEXT.format(**{**BASE, **changes})))


def _source_content(project):
    real = load(project / "models/real.safetensors")
    real["model.diffusion_model.out.0.bias"] += 1
    write_model(project / "models/real.safetensors", real)


def _touch(project):
    os.utime(project / "models/real.safetensors")  # same bytes, new mtime


def _other_mergefile(project):
    other = TEXT.format(**{**BASE, "a1": "0.9", "output": "out/other.safetensors"})
    (project / "other.toml").write_text(textwrap.dedent(other))
    assert mb(project, "-f", "other.toml", "-q").code == 0


def _intermediate_alone(project):
    write(project, a1="0.45")
    assert mb(project, "mix1", "-q").code == 0


def _flip_output(project):
    out = project / "out/final.safetensors"
    data = bytearray(out.read_bytes())
    data[-3] ^= 1
    out.write_bytes(bytes(data))


def _gc(project):
    assert mb(project, "cache", "gc", "--keep", "0").code == 0


# edit, what it does, stale?, the reason's words (status and -n -v), bytes after the next build
EDITS = {
    "a parameter": (lambda p: write(p, a1="0.45"), True, "mix1.alpha: 0.4 -> 0.45", "changed"),
    "one block of a block table": (lambda p: write(p, in01="0.65"), True, "mbw.alpha IN01: 0.6 -> 0.65", "changed"),
    "a rule": (lambda p: write(p, rules=BASE["rules"].replace("0.2", "0.3")), True, "mbw.rules[0].alpha: 0.2 -> 0.3",
               "changed"),
    "compute_dtype": (lambda p: write(p, settings='compute_dtype = "float64"'), True,
                      "[settings] compute_dtype: float32 -> float64", "changed"),
    "time_embed, with a block table": (lambda p: write(p, settings='time_embed = "BASE"'), True,
                                       "[settings] time_embed: IN00 -> BASE", "changed"),
    "the output dtype": (lambda p: write(p, final='dtype = "bfloat16"'), True, "final.dtype: unset -> bfloat16",
                         "changed"),
    "a source's content": (_source_content, True, "models.real: content changed (sha256 ", "changed"),
    "the method's version": ("version", True, "mix1: method weighted_sum version 1 -> 2", "changed"),
    "an intermediate built alone": (_intermediate_alone, True, "mix1.alpha: 0.4 -> 0.45", "changed"),
    "the output deleted": (lambda p: (p / "out/final.safetensors").unlink(), True, "out/final.safetensors is missing",
                           "same"),
    "the output edited": (_flip_output, True, "out/final.safetensors changed on disk", "same"),
    "touching a source": (_touch, False, None, "same"),
    "another Mergefile on the cache": (_other_mergefile, False, None, "same"),
    "cache gc --keep 0": (_gc, False, None, "same"),
    "settings that reach no tensor": (lambda p: write(p, settings='staging = "64MB"\nkeep_builds = 1\n'
                                                      'device = "cpu"\ncache_limit = "20GB"'), False, None, "same"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_status_is_stale_exactly_when_the_bytes_change(project, edit, monkeypatch):
    change, stale, reason, after = EDITS[edit]
    write(project)
    assert mb(project, "-q").code == 0
    out = project / "out/final.safetensors"
    before = out.read_bytes()
    if change == "version":
        method = registry.get_method("weighted_sum")
        monkeypatch.setitem(registry._REGISTRY, "weighted_sum", dataclasses.replace(method, version=2))
    else:
        change(project)

    status = mb(project, "status", "--check")
    assert status.code == (1 if stale else 0), status.out + status.err
    dry = mb(project, "-n", "-v")
    explained = json.loads(mb(project, "explain", "--json").out)["merges"]["final"]
    if stale:
        assert f"final: out of date\n  {reason}" in status.out, status.out
        assert any(reason in line for line in dry.out.splitlines() if line.startswith("  because")), dry.out
        assert any(reason in r for r in explained["reasons"]), explained
    else:
        assert status.out.strip() == "final: up to date" and dry.out.endswith("final: up to date\n"), dry.out
        assert explained["reasons"] == [] and explained["state"] == "up to date"

    built = json.loads(mb(project, "--json", "-q").out)["merges"]["final"]
    assert built["written"] == stale
    now = out.read_bytes()
    assert (now != before) == (after == "changed")
    assert mb(project, "status", "--check").code == 0
    assert json.loads(mb(project, "--json", "-q").out)["merges"]["final"]["ran"] is False  # a no-op after


def test_a_shard_size_change_reshards_a_folder_output(project):
    write(project, output="out/final")
    assert mb(project, "-q").code == 0
    assert sorted(p.name for p in (project / "out/final").iterdir()) == [".mergebuild-manifest.json",
                                                                         "model.safetensors"]
    write(project, output="out/final", final="shard_size = 1000")
    status = mb(project, "status")
    assert "final.output: {name = final} -> {name = final, shard_size = 1000}" in status.out or \
        "final.output" in status.out, status.out
    assert mb(project, "-q").code == 0
    shards = sorted(p.name for p in (project / "out/final").iterdir() if p.name.startswith("model-"))
    assert len(shards) > 1 and (project / "out/final/model.safetensors.index.json").exists()
    assert not (project / "out/final/model.safetensors").exists()
    assert mb(project, "status", "--check").code == 0  # the re-sharded folder is current
    assert json.loads(mb(project, "--json", "-q").out)["merges"]["final"]["ran"] is False


def test_verify_reports_a_deleted_output_as_such_not_as_corruption(project):
    write(project)
    assert mb(project, "-q").code == 0
    (project / "out/final.safetensors").unlink()
    text = mb(project, "cache", "verify").out
    assert "1 outputs were moved, edited or deleted since they were written" in text and "0 missing" in text
    assert mb(project, "-q").code == 0
    (project / "out/final.safetensors").unlink()
    doc = json.loads(mb(project, "cache", "verify", "--json").out)
    assert doc["outputs_changed"] == 1 and doc["output_tensors_dropped"] > 0
    assert doc["missing"] == doc["bad_removed"] == 0
    again = json.loads(mb(project, "cache", "verify", "--json").out)  # forgotten: nothing more to say
    assert again["outputs_changed"] == again["missing"] == 0
