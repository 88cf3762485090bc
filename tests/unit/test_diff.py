"""diff_files on fabricated SD1, SDXL and Llama-shaped models, each metric checked against the
formula computed here in float64 on the state dicts loaded by safetensors itself."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.analyze import diff as diffmod
from mergebuild.analyze.diff import diff_files, metrics
from mergebuild.layouts.blocks import architectures
from mergebuild.testing.fabricate import fabricate_family, llama_keys, make_base, make_finetune


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    sd1 = fabricate_family(out, "sd1-ldm", 32, names=("base", "real"), prefix="sd1-")
    sdxl = fabricate_family(out, "sdxl-sgm", 32, names=("base", "tuned"), prefix="sdxl-")
    base = make_base(llama_keys(), seed=5, dtype=torch.float32)
    tuned = make_finetune(base, seed=6, scale=0.02)
    tuned["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"].clone()  # untouched
    tuned["model.layers.2.input_layernorm.weight"][:5] = base["model.layers.2.input_layernorm.weight"][:5]  # partly
    paths = {"sd1": sd1[0], "sd1_real": sd1[1], "sdxl": sdxl[0], "sdxl_tuned": sdxl[1],
             "llama": out / "llama.safetensors", "llama_tuned": out / "llama-tuned.safetensors"}
    save_file(base, str(paths["llama"]))
    save_file(tuned, str(paths["llama_tuned"]))
    paths["sd1_copy"] = out / "sd1-copy.safetensors"
    shutil.copyfile(paths["sd1"], paths["sd1_copy"])
    return paths


def expected(path_a: Path, path_b: Path, select) -> dict:
    """The three metrics from their definitions, over the float tensors whose key `select` keeps."""
    a, b = load_file(str(path_a)), load_file(str(path_b))
    keys = [k for k in a if select(k) and k in b and a[k].is_floating_point() and a[k].shape == b[k].shape]
    assert keys
    x = torch.cat([a[k].double().flatten() for k in keys])
    y = torch.cat([b[k].double().flatten() for k in keys])
    return {"tensors": len(keys), "elements": x.numel(),
            "cosine": float(x @ y / (x.norm() * y.norm())),
            "rel_l2": float((x - y).norm() / x.norm()),
            "changed": float((x != y).sum()) / x.numel()}


def row(rows: list[dict], name: str) -> dict:
    (found,) = [r for r in rows if r["name"] == name]
    return found


def assert_matches(got: dict, want: dict) -> None:
    assert got["tensors"] == want["tensors"] and got["elements"] == want["elements"]
    for metric in ("cosine", "rel_l2", "changed"):
        assert got[metric] == pytest.approx(want[metric], rel=1e-9, abs=1e-12), metric


def test_sd1_blocks_and_components_match_the_formula(models):
    result = diff_files(models["sd1"], models["sd1_real"])
    sd1 = architectures()["sd1"]
    assert result["architecture"]["name"] == "sd1" and result["grouping"] == "block"
    assert [r["name"] for r in result["blocks"]] == list(sd1.blocks)
    assert_matches(row(result["blocks"], "IN04"), expected(models["sd1"], models["sd1_real"],
                                                           lambda k: sd1.block_of(k) == "IN04"))
    assert_matches(row(result["components"], "vae"), expected(models["sd1"], models["sd1_real"],
                                                              lambda k: k.startswith("first_stage_model.")))
    assert_matches(result["total"], expected(models["sd1"], models["sd1_real"], lambda k: True))
    # a fine-tune is close to its base, but not equal
    assert 0.9 < result["total"]["cosine"] < 1 and 0 < result["total"]["rel_l2"] < 0.5
    assert result["not_compared"] == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert result["only_in_a"] == result["only_in_b"] == result["shape_mismatch"] == []
    top = result["top"]
    assert len(top) == diffmod.TOP and top == sorted(top, key=lambda t: -t["rel_l2"])
    json.dumps(result)


def test_identical_files(models):
    result = diff_files(models["sd1"], models["sd1_copy"])
    for r in [*result["blocks"], *result["components"], result["total"]]:
        assert (r["cosine"], r["rel_l2"], r["changed"]) == (pytest.approx(1.0, abs=1e-12), 0.0, 0.0), r["name"]
    assert result["top"] == []


def test_sdxl(models):
    result = diff_files(models["sdxl"], models["sdxl_tuned"])
    sdxl = architectures()["sdxl"]
    assert result["architecture"]["name"] == "sdxl"
    assert [r["name"] for r in result["blocks"]] == list(sdxl.blocks)
    assert_matches(row(result["blocks"], "M00"), expected(models["sdxl"], models["sdxl_tuned"],
                                                          lambda k: sdxl.block_of(k) == "M00"))
    assert_matches(row(result["components"], "text_encoder"), expected(
        models["sdxl"], models["sdxl_tuned"], lambda k: k.startswith("conditioner.embedders.")))


def test_generic_layers(models):
    result = diff_files(models["llama"], models["llama_tuned"])
    assert result["architecture"]["name"] == "llama" and result["grouping"] == "layer"
    assert [r["name"] for r in result["blocks"]] == ["0", "1", "2", "3", "other"]
    for layer in ("0", "1", "2"):
        assert_matches(row(result["blocks"], layer), expected(models["llama"], models["llama_tuned"],
                                                              lambda k: k.startswith(f"model.layers.{layer}.")))
    assert_matches(row(result["blocks"], "other"), expected(models["llama"], models["llama_tuned"],
                                                            lambda k: not k.startswith("model.layers.")))
    assert_matches(row(result["components"], "lm_head"), expected(models["llama"], models["llama_tuned"],
                                                                  lambda k: k.startswith("lm_head.")))
    # one tensor of layer 1 is untouched and five elements of one in layer 2: fewer changed
    assert 0.5 < row(result["blocks"], "1")["changed"] < 1
    assert row(result["blocks"], "0")["changed"] == 1.0
    assert "model.layers.1.mlp.up_proj.weight" not in [t["key"] for t in result["top"]]


def test_small_chunks_give_the_same_sums(models, monkeypatch):
    whole = diff_files(models["llama"], models["llama_tuned"])
    monkeypatch.setattr(diffmod, "CHUNK_ELEMENTS", 7)  # slices cross rows and tensor ends
    sliced = diff_files(models["llama"], models["llama_tuned"])
    for got, want in zip([*sliced["blocks"], sliced["total"]], [*whole["blocks"], whole["total"]]):
        assert got["changed"] == want["changed"]
        assert got["cosine"] == pytest.approx(want["cosine"], rel=1e-12)
        assert got["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-12)


def test_missing_extra_and_mismatched_keys(models, tmp_path):
    a = load_file(str(models["llama"]))
    b = dict(a)
    del b["model.layers.0.self_attn.q_proj.weight"]
    b["model.layers.9.extra.weight"] = torch.ones(3)
    b["lm_head.weight"] = torch.zeros(65, 16)
    b["model.norm.weight"] = a["model.norm.weight"].half()  # another dtype: still compared
    save_file(b, str(tmp_path / "b.safetensors"))
    result = diff_files(models["llama"], tmp_path / "b.safetensors")
    assert result["only_in_a"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert result["only_in_b"] == ["model.layers.9.extra.weight"]
    assert result["shape_mismatch"] == [{"key": "lm_head.weight", "a": [64, 16], "b": [65, 16]}]
    assert row(result["blocks"], "0")["tensors"] == 8
    norm = expected(models["llama"], tmp_path / "b.safetensors", lambda k: k == "model.norm.weight")
    assert [t for t in result["top"] if t["key"] == "model.norm.weight"][0]["rel_l2"] == pytest.approx(norm["rel_l2"])
    assert 0 < norm["rel_l2"] < 1e-3  # float16 rounding only


def test_metrics_of_zero_vectors():
    assert metrics(0.0, 0.0, 0.0, 0.0, 0, 10) == {"cosine": 1.0, "rel_l2": 0.0, "changed": 0.0}
    assert metrics(0.0, 0.0, 4.0, 4.0, 10, 10) == {"cosine": None, "rel_l2": None, "changed": 1.0}
    assert metrics(-2.0, 1.0, 4.0, 9.0, 1, 1) == {"cosine": -1.0, "rel_l2": 3.0, "changed": 1.0}
    assert math.isclose(metrics(1.0, 1.0, 2.0, 1.0, 1, 2)["cosine"], 1 / math.sqrt(2))
