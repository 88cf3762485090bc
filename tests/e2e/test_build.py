"""End to end: the real CLI on real safetensors files; formulas checked against plain torch."""

from __future__ import annotations

import pytest

import json
import shutil

import torch
from safetensors import safe_open

from tests.conftest import build_json, chain, load, mergefile, run_cli, small_model, write_model

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

A_ONLY = "model.diffusion_model.only_in_a.weight"
B_ONLY = "model.diffusion_model.only_in_b.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def close(actual: torch.Tensor, expected64: torch.Tensor) -> None:
    """Equal up to the rounding of the output dtype (the reference is computed in float64)."""
    torch.testing.assert_close(actual.double(), expected64.to(actual.dtype).double(), rtol=2e-3, atol=2e-3)


def test_weighted_sum_and_add_difference_match_torch(project):
    mergefile(project / "mergefile.toml", """
        [models.a]
        path = "models/real.safetensors"
        [models.b]
        path = "models/anime.safetensors"
        [models.c]
        path = "models/base.safetensors"
        [merges.ws]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.3
        output = "out/ws.safetensors"
        [merges.ad]
        method = "add_difference"
        inputs = ["a", "b", "c"]
        alpha = 0.7
        output = "out/ad.safetensors"
        dtype = "float32"
    """)
    run_cli(cwd=project, check=True)
    a, b, c = (load(project / "models" / f"{n}.safetensors") for n in ("real", "anime", "base"))
    ws, ad = load(project / "out/ws.safetensors"), load(project / "out/ad.safetensors")
    for key in a:
        if a[key].is_floating_point() and "model" in key:
            close(ws[key], (1 - 0.3) * a[key].double() + 0.3 * b[key].double())
            assert ad[key].dtype == torch.float32
            close(ad[key], a[key].double() + 0.7 * (b[key].double() - c[key].double()))
    # integer tensors and keys without "model" (scheduler buffers) are copied from A
    assert torch.equal(ws[POS], a[POS]) and torch.equal(ws["alphas_cumprod"], a["alphas_cumprod"])
    assert ad[POS].dtype == torch.int64


def test_copy_casts_and_discards(project):
    mergefile(project / "mergefile.toml", """
        [models.a]
        path = "models/real.safetensors"
        [merges.half]
        method = "copy"
        inputs = ["a"]
        dtype = "bfloat16"
        discard = "^first_stage_model\\\\."
        output = "out/half.safetensors"
    """)
    run_cli(cwd=project, check=True)
    a, out = load(project / "models/real.safetensors"), load(project / "out/half.safetensors")
    assert not any(k.startswith("first_stage_model.") for k in out)
    assert set(out) == {k for k in a if not k.startswith("first_stage_model.")}
    for key, t in out.items():
        if a[key].is_floating_point():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, a[key].to(torch.bfloat16))
        else:
            assert torch.equal(t, a[key])


def test_keys_only_in_a_kept_only_in_b_dropped(tmp_path):
    write_model(tmp_path / "a.safetensors", small_model(1, extra={A_ONLY: torch.ones(3)}))
    write_model(tmp_path / "b.safetensors", small_model(2, extra={B_ONLY: torch.ones(3)}))
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "m.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")
    assert torch.equal(out[A_ONLY], torch.ones(3)) and B_ONLY not in out


def test_a_slow_zero_byte_tensor_is_written_before_the_commit(tmp_path, monkeypatch):
    """A marker key (v_pred: zero bytes) copied last, after every other tensor came from the
    cache: the build waited for the writes by their bytes left, none, and committed while the
    copy still ran ("tensor 'v_pred' was never written")."""
    import time

    from mergebuild.tensors.writer import SafetensorsWriter

    write_model(tmp_path / "a.safetensors", small_model(1))
    write_model(tmp_path / "b.safetensors", small_model(2, extra={"v_pred": torch.zeros(0)}))
    text = """
        models = {a = {path = "a.safetensors"}, b = {path = "b.safetensors"}}
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = ALPHA
        output = "m.safetensors"
    """
    for alpha in ("0.5", "0.25"):
        mergefile(tmp_path / "mergefile.toml", text.replace("ALPHA", alpha))
        run_cli(cwd=tmp_path, check=True)
    copy = SafetensorsWriter.copy_into

    def slow_when_empty(writer, name, source, offset):
        if writer.slots[name].nbytes == 0:
            time.sleep(0.5)
        copy(writer, name, source, offset)

    monkeypatch.setattr(SafetensorsWriter, "copy_into", slow_when_empty)
    mergefile(tmp_path / "mergefile.toml", text.replace("ALPHA", "0.5"))
    assert build_json(cwd=tmp_path)["merges"]["m"]["computed"] == 0  # all cached: no batch written after it
    assert load(tmp_path / "m.safetensors")["v_pred"].shape == (0,)


def test_inpainting_first_channels_merged_rest_from_a(tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    a = small_model(1, extra={key: torch.randn(8, 9, 3, 3).half()})
    b = small_model(2)
    write_model(tmp_path / "inpaint.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "inpaint.safetensors"
        [models.b]
        path = "b.safetensors"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "m.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")[key]
    assert out.shape == (8, 9, 3, 3)
    close(out[:, :4], 0.5 * a[key][:, :4].double() + 0.5 * b[key].double())
    assert torch.equal(out[:, 4:], a[key][:, 4:])


def test_legacy_ckpt_source_loads_weights_only(tmp_path):
    state = small_model(3, dtype=torch.float32)
    torch.save({"state_dict": state, "global_step": 5}, tmp_path / "old.ckpt")
    write_model(tmp_path / "b.safetensors", small_model(4, dtype=torch.float32))
    mergefile(tmp_path / "mergefile.toml", """
        [models.old]
        path = "old.ckpt"
        [models.b]
        path = "b.safetensors"
        [merges.m]
        method = "weighted_sum"
        inputs = ["old", "b"]
        alpha = 0.25
        output = "m.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    out, b = load(tmp_path / "m.safetensors"), load(tmp_path / "b.safetensors")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    close(out[key], 0.75 * state[key].double() + 0.25 * b[key].double())
    assert run_cli("--json", "-q", cwd=tmp_path, check=True).stdout.count('"computed": 0') == 1


def test_chain_recomputes_only_what_a_change_reaches(project):
    mf = mergefile(project / "mergefile.toml", chain())
    cold = build_json(cwd=project)["merges"]
    merged = cold["mix1"]["computed"]
    assert merged > 0 and all(m["computed"] == merged and m["status"] == "computed" for m in cold.values())

    noop = build_json(cwd=project)["merges"]
    assert all(m["computed"] == 0 and m["status"] == "cached" for m in noop.values())

    mf.write_text(chain(a3=0.6))
    last = build_json(cwd=project)["merges"]
    assert (last["mix1"]["computed"], last["mix2"]["computed"], last["final"]["computed"]) == (0, 0, merged)

    mf.write_text(chain(a1=0.9, a3=0.6))
    first = build_json(cwd=project)["merges"]
    assert all(m["computed"] == merged for m in first.values())
    assert first["final"]["reused"] == first["final"]["tensors"] - merged


def test_early_cutoff_identical_result_leaves_readers_clean(project):
    """alpha 0.0 and -0.0 give identical tensors: the readers downstream stay cached."""
    mf = mergefile(project / "mergefile.toml", chain(a1=0.0))
    build_json(cwd=project)
    mf.write_text(chain(a1=-0.0))
    doc = build_json(cwd=project)["merges"]
    assert doc["mix1"]["computed"] > 0
    assert doc["mix2"]["computed"] == 0 and doc["final"]["computed"] == 0


def test_one_changed_tensor_upstream_dirties_only_its_readers(project):
    mergefile(project / "mergefile.toml", chain())
    build_json(cwd=project)
    real = load(project / "models/real.safetensors")
    real["model.diffusion_model.out.0.bias"] += 1
    write_model(project / "models/real.safetensors", real)
    doc = build_json(cwd=project)["merges"]
    # mix1 and final read real directly; mix2 reads mix1's one changed tensor
    assert doc["mix1"]["computed"] == 1 and doc["mix2"]["computed"] == 1 and doc["final"]["computed"] == 1


def test_deleting_the_cache_rebuilds_identical_bytes(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    first = (project / "out/final.safetensors").read_bytes()
    shutil.rmtree(project / "cache")
    (project / "out/final.safetensors").unlink()
    run_cli(cwd=project, check=True)
    assert (project / "out/final.safetensors").read_bytes() == first


def test_noop_build_does_not_rewrite_the_output(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    out = project / "out/final.safetensors"
    before = out.stat()
    run_cli(cwd=project, check=True)
    after = out.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_deleted_output_is_rewritten_from_the_cache(project):
    """A target's tensors live in its output only; deleted, they are recomputed from the cached
    intermediates (nothing upstream), and the file comes back byte for byte, date included."""
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True, env={"SOURCE_DATE_EPOCH": "1700000000"})
    first = (project / "out/final.safetensors").read_bytes()
    (project / "out/final.safetensors").unlink()
    doc = build_json(cwd=project)["merges"]  # another day: the recorded date is kept
    assert doc["mix1"]["computed"] == doc["mix2"]["computed"] == 0 and doc["final"]["computed"] > 0
    assert (project / "out/final.safetensors").read_bytes() == first


def test_lineage_metadata_a1111_keys_and_hashes(project):
    import hashlib

    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    with safe_open(str(project / "out/final.safetensors"), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    models = json.loads(meta["sd_merge_models"])
    real_sha = hashlib.sha256((project / "models/real.safetensors").read_bytes()).hexdigest()
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.25
    assert recipe["secondary_model_hash"] == real_sha
    assert models[real_sha]["name"] == "real.safetensors"
    # the intermediate mix2 is listed with its own recipe (an object, as A1111 nests it), and so
    # on down to the sources
    inner = models[recipe["primary_model_hash"]]["sd_merge_recipe"]
    assert inner["interp_method"] == "Add difference"
    mine = json.loads(meta["mergebuild.recipe"])
    assert mine["format"] == 2 and mine["target"] == "final"
    nodes = mine["nodes"]
    assert nodes["final"]["inputs"] == ["mix2", "real"] and nodes["mix2"]["inputs"][0] == "mix1"
    assert nodes["real"]["sha256"] == real_sha and nodes["real"]["autov2"] == real_sha[:10]
    assert list(nodes).index("mix1") < list(nodes).index("final")  # inputs first, each once


def test_lineage_nests_across_generations(project):
    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    gen2 = project / "gen2"
    gen2.mkdir()
    mergefile(gen2 / "mergefile.toml", """
        [models.parent]
        path = "../out/final.safetensors"
        [models.base]
        path = "../models/base.safetensors"
        [merges.child]
        method = "weighted_sum"
        inputs = ["parent", "base"]
        alpha = 0.1
        output = "child.safetensors"
    """)
    run_cli(cwd=gen2, check=True)
    doc = json.loads(run_cli("lineage", gen2 / "child.safetensors", "--json", cwd=project, check=True).stdout)
    parent = doc["made_by"]["inputs"][0]
    assert parent["file"] == "final.safetensors"
    assert parent["made_by"]["name"] == "final"
    assert parent["made_by"]["inputs"][0]["inputs"][0]["method"] == "weighted_sum"  # mix1, two files up
    text = run_cli("lineage", gen2 / "child.safetensors", cwd=project, check=True).stdout
    assert "mix1" in text and "add_difference" in text


def test_targets_on_the_command_line_build_only_what_they_need(project):
    mergefile(project / "mergefile.toml", chain())
    doc = build_json("mix1", cwd=project)
    assert list(doc["merges"]) == ["mix1"] and doc["outputs"] == {}
    assert not (project / "out/final.safetensors").exists()
