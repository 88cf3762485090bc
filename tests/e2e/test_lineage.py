"""Lineage read back across generations of files, from A1111-written and ModelSpec metadata."""

from __future__ import annotations

import json

from safetensors import safe_open

from tests.conftest import chain, load, mergefile, run_cli, small_model, write_model


def generation(folder, parent: str, other: str, alpha: float, out: str):
    folder.mkdir()
    mergefile(folder / "mergefile.toml", f"""
        [models.parent]
        path = "{parent}"
        [models.other]
        path = "{other}"
        [merges.step]
        method = "weighted_sum"
        inputs = ["parent", "other"]
        alpha = {alpha}
        output = "{out}"
    """)
    run_cli(cwd=folder, check=True)
    return folder / out


def test_three_generations_built_by_separate_mergefiles(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    generation(project / "g2", "../out/final.safetensors", "../models/base.safetensors", 0.1, "g2.safetensors")
    g3 = generation(project / "g3", "../g2/g2.safetensors", "../models/anime.safetensors", 0.2, "g3.safetensors")
    tree = json.loads(run_cli("lineage", g3, "--json", cwd=project, check=True).stdout)
    step3 = tree["made_by"]
    assert step3["params"] == {"alpha": 0.2}
    step2 = step3["inputs"][0]["made_by"]
    assert step3["inputs"][0]["file"] == "g2.safetensors" and step2["params"] == {"alpha": 0.1}
    final = step2["inputs"][0]["made_by"]
    assert final["name"] == "final" and final["inputs"][0]["inputs"][0]["name"] == "mix1"
    text = run_cli("lineage", g3, cwd=project, check=True).stdout
    for word in ("g2.safetensors", "final", "mix1", "add_difference", "alpha=0.2"):
        assert word in text
    mermaid = run_cli("lineage", g3, "--format", "mermaid", cwd=project, check=True).stdout
    assert mermaid.startswith("graph LR") and "mix1: weighted_sum(alpha=0.4)" in mermaid
    dot = run_cli("lineage", g3, "--format", "dot", cwd=project, check=True).stdout
    assert dot.startswith("digraph lineage") and "->" in dot
    # the A1111 keys flatten the whole ancestry into sd_merge_models
    with safe_open(str(g3), "pt") as f:
        models = json.loads(f.metadata()["sd_merge_models"])
    names = {m["name"] for m in models.values()}
    assert {"g2.safetensors", "anime.safetensors", "final.safetensors", "mix2 (intermediate)"} <= names


def test_lineage_from_a_file_written_the_way_a1111_writes_it(tmp_path):
    inner = {"type": "webui", "primary_model_hash": "a" * 64, "secondary_model_hash": "b" * 64,
             "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.3,
             "save_as_half": True, "custom_name": "", "config_source": 0, "bake_in_vae": "None",
             "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    outer = dict(inner, primary_model_hash="c" * 64, secondary_model_hash="d" * 64, tertiary_model_hash="e" * 64,
                 interp_method="Add difference", multiplier=1.0, custom_name="outer")
    models = {
        "c" * 64: {"name": "mix.safetensors", "legacy_hash": "12345678", "sd_merge_recipe": json.dumps(inner)},
        "d" * 64: {"name": "x.safetensors", "legacy_hash": "23456789", "sd_merge_recipe": None},
        "e" * 64: {"name": "sd15.safetensors", "legacy_hash": "34567890", "sd_merge_recipe": None},
        "a" * 64: {"name": "realistic.safetensors", "legacy_hash": "45678901", "sd_merge_recipe": None},
        "b" * 64: {"name": "anime.safetensors", "legacy_hash": "56789012", "sd_merge_recipe": None},
    }
    path = write_model(tmp_path / "webui.safetensors", small_model(0), metadata={
        "sd_merge_recipe": json.dumps(outer), "sd_merge_models": json.dumps(models), "format": "pt"})
    tree = json.loads(run_cli("lineage", path, "--json", cwd=tmp_path, check=True).stdout)["made_by"]
    assert (tree["method"], tree["tool"], tree["params"]) == ("Add difference", "webui", {"multiplier": 1.0})
    assert [c["name"] for c in tree["inputs"]] == ["mix.safetensors", "x.safetensors", "sd15.safetensors"]
    mix = tree["inputs"][0]["made_by"]
    assert mix["method"] == "Weighted sum" and [c["name"] for c in mix["inputs"]] == ["realistic.safetensors", "anime.safetensors"]


def test_modelspec_keys_written_and_merged_from_read(project, tmp_path):
    import hashlib

    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    out = project / "out/final.safetensors"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    raw = out.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + header:]).hexdigest()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "final"
    assert meta["modelspec.merged_from"] == "mix2, real.safetensors"
    assert meta["modelspec.date"] == "2026-09-21"  # SOURCE_DATE_EPOCH, set by the tests
    only_spec = write_model(tmp_path / "spec.safetensors", load(out),
                            metadata={"modelspec.title": "t", "modelspec.merged_from": "a.safetensors, b.safetensors"})
    tree = json.loads(run_cli("lineage", only_spec, "--json", cwd=tmp_path, check=True).stdout)["made_by"]
    assert [c["name"] for c in tree["inputs"]] == ["a.safetensors", "b.safetensors"]


def test_rules_and_dtype_are_in_every_lineage_format(project):
    mergefile(project / "mergefile.toml", """
        [models.base]
        path = "models/base.safetensors"
        [models.anime]
        path = "models/anime.safetensors"
        [merges.styled]
        method = "weighted_sum"
        inputs = ["base", "anime"]
        alpha = 0.3
        dtype = "float16"
        output = "out/styled.safetensors"
        [[merges.styled.rules]]
        blocks = "IN00-IN05"
        alpha = 0.7
    """)
    run_cli(cwd=project, check=True)
    out = project / "out/styled.safetensors"
    for fmt in ("tree", "mermaid", "dot"):
        text = run_cli("lineage", out, "--format", fmt, cwd=project, check=True).stdout
        assert "dtype float16" in text, (fmt, text)
        assert "rule blocks IN00-IN05: alpha=0.7" in text, (fmt, text)
