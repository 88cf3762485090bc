"""The Python API does what the demo does: load the demo's Mergefile, dry-run it, build it with
a progress callback, ask its status and its output's lineage; and a Mergefile built in code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import mergebuild
from mergebuild.errors import MergebuildError
from mergebuild.testing.fabricate import fabricate_family, fabricate_lora
from tests.conftest import ROOT, load


@pytest.fixture
def demo(tmp_path, monkeypatch) -> Path:
    shutil.copy(ROOT / "mergefile.toml", tmp_path / "mergefile.toml")
    paths = fabricate_family(tmp_path / "examples/models", "sd1-ldm", 32)
    fabricate_lora(paths[0], tmp_path / "examples/models/sd15-detail-lora.safetensors", "sd1-ldm")
    monkeypatch.delenv("MERGEBUILD_CACHE", raising=False)
    return tmp_path


def test_the_demo_through_the_api(demo):
    mf = mergebuild.load(demo / "mergefile.toml")
    before = mergebuild.dry_run(mf)
    assert [m.name for m in before] == ["mix1", "mix2", "styled", "final"]
    assert all(m.reasons == ["never built from this Mergefile"] for m in before)
    events = []
    result = mergebuild.build(mf, progress=events.append)
    assert result.merges["final"].computed > 0 and result.outputs["final"].exists()
    assert 0 < result.cache_bytes < result.cache_limit and result.warnings == []
    starts = [e for e in events if e["event"] == "start"]
    assert [e["merge"] for e in starts] == ["mix1", "mix2", "styled", "final"] and starts[-1]["steps"] == 4
    assert sum(e["tensors"] for e in events if e["event"] == "advance" and e["merge"] == "final") == starts[-1]["tensors"]
    assert mergebuild.status(mf) == {"final": []}
    tree = mergebuild.lineage(result.outputs["final"])
    assert tree["made_by"]["name"] == "final" and tree["made_by"]["method"] == "weighted_sum"

    text = (demo / "mergefile.toml").read_text().replace("alpha = 0.4", "alpha = 0.45")
    (demo / "mergefile.toml").write_text(text)
    mf = mergebuild.load(demo / "mergefile.toml")
    assert mergebuild.status(mf) == {"final": ["mix1.alpha: 0.4 -> 0.45"]}
    plan = mergebuild.plan(mf)
    assert plan.merges["mix1"].count("dirty") > 0 and not plan.merges["final"].current
    again = mergebuild.build(mf)
    assert again.merges["mix1"].computed > 0 and mergebuild.status(mf) == {"final": []}


def test_a_mergefile_built_in_code(demo):
    models = demo / "examples/models"
    mf = mergebuild.load({
        "models": {"a": {"path": str(models / "sd15-real.safetensors")}, "b": {"path": str(models / "sd15-anime.safetensors")}},
        "merges": {"m": {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 0.5, "output": "m.safetensors"}},
    }, path=demo / "code.toml")
    assert mf.path == demo / "code.toml" and (demo / "code.toml").read_text().startswith("# written by mergebuild")
    result = mergebuild.build(mf)
    assert load(result.outputs["m"]).keys() == load(models / "sd15-real.safetensors").keys()
    before = (demo / "mergefile.toml").read_text()
    with pytest.raises(MergebuildError) as info:  # a user's file is never replaced by a dict
        mergebuild.load({"models": {"a": {"path": "x.safetensors"}},
                         "merges": {"m": {"method": "copy", "inputs": ["a"]}}}, path=demo / "mergefile.toml")
    assert info.value.exit_code == 2 and "not written by mergebuild.load" in str(info.value)
    assert (demo / "mergefile.toml").read_text() == before


def test_errors_are_mergebuild_errors_with_exit_codes(demo):
    with pytest.raises(MergebuildError) as info:
        mergebuild.load(demo / "nope.toml")
    assert info.value.exit_code == 2 and "no such Mergefile" in str(info.value)
