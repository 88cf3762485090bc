"""The make-like surface: dry runs with reasons, graph formats, clean, cache commands."""

from __future__ import annotations

import json

from tests.conftest import build_json, chain, mergefile, run_cli


def test_dry_run_says_what_and_why_and_computes_nothing(project):
    mf = mergefile(project / "mergefile.toml", chain())
    proc = run_cli("-n", cwd=project, check=True)
    assert "mix1: 7 of 7 tensors dirty" not in proc.stdout  # some tensors are copied, not merged
    assert "mix1:" in proc.stdout and "tensors dirty" in proc.stdout
    assert "final: depends on a dirty input" in proc.stdout
    assert not (project / "out").exists()
    run_cli(cwd=project, check=True)
    assert run_cli("-n", cwd=project, check=True).stdout.splitlines() == [
        "mix1: up to date", "mix2: up to date", "final: up to date"]
    mf.write_text(chain(a2=0.8))
    proc = run_cli("-n", "-v", cwd=project, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "mix1: up to date"
    assert lines[1].startswith("mix2: ") and "tensors dirty" in lines[1]
    assert lines[1:3] == [lines[1], "  because mix2.alpha: 0.5 -> 0.8"]
    assert lines[-2].startswith("final: depends on a dirty input")
    assert lines[-1] == "  because mix2.alpha: 0.5 -> 0.8"  # the cause, named where it is


def test_dry_run_json(project):
    mergefile(project / "mergefile.toml", chain())
    doc = json.loads(run_cli("-n", "--json", cwd=project, check=True).stdout)
    assert doc["merges"]["mix1"]["dirty"] > 0 and doc["merges"]["final"]["pending"] > 0
    assert doc["merges"]["mix1"]["reasons"] == ["never built from this Mergefile"]


def test_json_summary_contract(project):
    mergefile(project / "mergefile.toml", chain())
    doc = build_json(cwd=project)
    # the keys of the first release stay; later ones only add
    assert {"merges", "outputs"} <= set(doc) and set(doc) <= {"merges", "outputs", "cache", "warnings"}
    for entry in doc["merges"].values():
        assert {"status", "tensors", "computed", "reused", "seconds", "architecture"} <= set(entry)
        assert entry["status"] in ("computed", "partial", "cached") and entry["ran"] is True
        assert entry["computed"] + entry["reused"] == entry["tensors"]
    assert doc["outputs"] == {"final": str(project / "out/final.safetensors")}
    assert 0 < doc["cache"]["bytes"] < doc["cache"]["limit"] and doc["warnings"] == []


def test_force_recomputes_everything(project):
    mergefile(project / "mergefile.toml", chain())
    cold = build_json(cwd=project)["merges"]
    forced = build_json("--force", cwd=project)["merges"]
    assert all(forced[n]["computed"] == cold[n]["computed"] > 0 for n in cold)


def test_graph_formats(project):
    mergefile(project / "mergefile.toml", chain())
    text = run_cli("graph", cwd=project, check=True).stdout
    assert text.splitlines()[0].startswith("final = weighted_sum(alpha=0.25) -> final.safetensors  [")
    assert "mix1 = weighted_sum(alpha=0.4)  [" in text and "tensors dirty]" in text
    run_cli(cwd=project, check=True)
    assert "final.safetensors  [up to date]" in run_cli("graph", cwd=project, check=True).stdout
    dot = run_cli("graph", "--format", "dot", cwd=project, check=True).stdout
    assert dot.startswith("digraph") and '"mix1" -> "mix2";' in dot and "#b7e1b0" in dot
    mermaid = run_cli("graph", "--format", "mermaid", cwd=project, check=True).stdout
    assert mermaid.startswith("graph LR") and "n_mix2 --> n_final" in mermaid


def test_clean_removes_declared_outputs(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    assert (project / "out/final.safetensors").exists()
    proc = run_cli("clean", cwd=project, check=True)
    assert "removed" in proc.stdout and not (project / "out/final.safetensors").exists()


def test_cache_stats_and_gc_keep_what_current_targets_need(project):
    mf = mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    stats = json.loads(run_cli("cache", "stats", "--json", cwd=project, check=True).stdout)
    assert stats["blobs"] > 0 and stats["bytes"] > 0 and stats["builds"] == 1
    mf.write_text(chain(a1=0.9))
    run_cli(cwd=project, check=True)
    gc = json.loads(run_cli("cache", "gc", "--keep", "1", "--json", cwd=project, check=True).stdout)
    # the old alpha's three merges are no longer needed by anything
    assert gc["entries_removed"] > 0 and gc["blobs_removed"] > 0 and gc["bytes_freed"] > 0
    (project / "out/final.safetensors").unlink()
    doc = build_json(cwd=project)["merges"]
    # nothing current was collected: only the target's own tensors, which lived in its output
    assert doc["mix1"]["computed"] == doc["mix2"]["computed"] == 0 and doc["final"]["computed"] > 0


def test_cache_env_and_flag_override(project, tmp_path_factory):
    mergefile(project / "mergefile.toml", chain())
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    run_cli(cwd=project, env={"MERGEBUILD_CACHE": str(elsewhere / "env-cache")}, check=True)
    assert (elsewhere / "env-cache/index.sqlite").exists() and not (project / "cache").exists()
    run_cli("--cache-dir", elsewhere / "flag-cache", cwd=project, env={"MERGEBUILD_CACHE": str(elsewhere / "x")}, check=True)
    assert (elsewhere / "flag-cache/index.sqlite").exists() and not (elsewhere / "x").exists()


def test_lineage_of_a_file_without_lineage(project):
    proc = run_cli("lineage", project / "models/base.safetensors", cwd=project, check=True)
    assert "no lineage recorded" in proc.stdout


def test_methods_list(project):
    doc = json.loads(run_cli("methods", "--json", cwd=project, check=True).stdout)
    assert doc["add_difference"] == {"version": 1, "inputs": ["A", "B", "C"],
                                     "params": {"alpha": None, "arithmetic": "exact"}}


def test_inspect_and_diff_commands(project):
    import hashlib

    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    out = project / "out/final.safetensors"
    doc = json.loads(run_cli("inspect", out, "--json", cwd=project, check=True).stdout)
    assert doc["architecture"]["name"] == "sd1" and doc["lineage"]["name"] == "final"
    assert doc["hashes"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert "modelspec.hash_sha256" in doc["metadata"]
    assert doc["metadata"]["modelspec.hash_sha256"] == "0x" + doc["hashes"]["tensor_data_sha256"]
    text = run_cli("inspect", out, cwd=project, check=True).stdout
    assert "AutoV2 " + doc["hashes"]["autov2"] in text and "OUT11" in text

    same = json.loads(run_cli("diff", out, out, "--json", cwd=project, check=True).stdout)
    assert same["total"]["cosine"] == 1.0 and same["total"]["changed"] == 0.0
    proc = run_cli("diff", project / "models/base.safetensors", out, "--plot", project / "d.png", cwd=project, check=True)
    assert "by block" in proc.stdout and "by component" in proc.stdout
    from matplotlib.image import imread

    image = imread(project / "d.png")
    assert image.shape[0] > 200 and image.shape[1] > 200


def test_graph_png(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli("graph", "--format", "png", "-o", project / "g.png", cwd=project, check=True)
    from matplotlib.image import imread

    image = imread(project / "g.png")
    assert image.shape[0] > 100 and image.shape[1] > 200


def test_graph_json(project):
    mergefile(project / "mergefile.toml", chain())
    doc = json.loads(run_cli("graph", "--json", cwd=project, check=True).stdout)
    assert ["mix1", "mix2"] in doc["edges"] and ["real", "final"] in doc["edges"]
    states = {n["name"]: n["state"] for n in doc["nodes"]}
    assert states["real"] == "source" and "dirty" in states["mix1"] and states["final"].startswith("depends")
