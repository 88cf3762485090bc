"""inspect_file on fabricated SD1, SDXL and Llama-shaped models, checked against the files
themselves (safetensors' own loader and hashlib)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.analyze import inspect as inspection
from mergebuild.analyze.inspect import file_hashes, inspect_file
from mergebuild.layouts.blocks import architectures
from mergebuild.testing.fabricate import fabricate_family, llama_keys, make_base

RECIPE = {"kind": "merge", "name": "mix", "tool": "mergebuild", "method": "weighted_sum", "params": {"alpha": 0.5},
          "inputs": [{"kind": "model", "name": "a", "sha256": "ab" * 32, "autov2": "ab" * 5}]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    sd1 = fabricate_family(out, "sd1-ldm", 32, names=("base",), prefix="sd1-")[0]
    sdxl = fabricate_family(out, "sdxl-sgm", 32, names=("base",), prefix="sdxl-")[0]
    llama = out / "llama.safetensors"
    metadata = {"mergebuild.recipe": json.dumps(RECIPE), "sd_merge_recipe": '{"type": "webui"}', "format": "pt"}
    save_file(make_base(llama_keys(), seed=3, dtype=torch.float32), str(llama), metadata=metadata)
    return {"sd1": sd1, "sdxl": sdxl, "llama": llama}


def expected_hashes(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    sha = hashlib.sha256(raw).hexdigest()
    return {"autov1": hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8], "autov2": sha[:10], "sha256": sha,
            "tensor_data_sha256": hashlib.sha256(raw[8 + header_len:]).hexdigest()}


def test_sd1_counts_match_the_file(models):
    info = inspect_file(models["sd1"])
    tensors = load_file(str(models["sd1"]))
    assert info["architecture"]["name"] == "sd1" and "input_blocks.11" in info["architecture"]["how"]
    assert info["grouping"] == "block"
    assert [b["name"] for b in info["blocks"]] == list(architectures()["sd1"].blocks)
    totals = info["totals"]
    assert totals["tensors"] == len(tensors)
    assert totals["params"] == sum(t.numel() for t in tensors.values())
    assert totals["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert totals["dtypes"] == {"F16": len(tensors) - 1, "I64": 1}  # position_ids
    assert info["file_size"] == models["sd1"].stat().st_size
    assert info["header_size"] == 8 + int.from_bytes(models["sd1"].read_bytes()[:8], "little")
    for field in ("tensors", "params", "bytes"):
        assert sum(b[field] for b in info["blocks"]) == totals[field]
        assert sum(c[field] for c in info["components"].values()) == totals[field]
    unet = [t for k, t in tensors.items() if k.startswith("model.diffusion_model.")]
    assert info["components"]["unet"] == {"tensors": len(unet), "params": sum(t.numel() for t in unet),
                                          "bytes": 2 * sum(t.numel() for t in unet)}
    assert list(info["components"]) == ["text_encoder", "unet", "vae", "other"]  # scheduler buffers: other
    in00 = [t for k, t in tensors.items()  # supermerger counts the time embedding in IN00
            if k.startswith(("model.diffusion_model.input_blocks.0.", "model.diffusion_model.time_embed."))]
    row = info["blocks"][1]
    assert row["name"] == "IN00" and row["tensors"] == len(in00) and row["params"] == sum(t.numel() for t in in00)
    assert row["dtypes"] == {"F16": len(in00)}
    json.dumps(info)


def test_hashes_match_hashlib(models):
    for path in models.values():
        assert inspect_file(path)["hashes"] == expected_hashes(path)


def test_hashes_are_streamed_in_chunks(models, monkeypatch):
    # chunks smaller than the header, so one chunk straddles the start of the tensor data
    monkeypatch.setattr(inspection, "CHUNK", 1000)
    assert file_hashes(models["sd1"]) == expected_hashes(models["sd1"])
    assert file_hashes(models["llama"]) == expected_hashes(models["llama"])


def test_a_file_under_one_mib_has_the_legacy_hash_of_nothing(models):
    # A1111 reads 64 KiB at 1 MiB, which is empty for a small file
    assert models["llama"].stat().st_size < 0x100000
    assert inspect_file(models["llama"])["hashes"]["autov1"] == hashlib.sha256(b"").hexdigest()[:8]


def test_without_hashes(models):
    assert inspect_file(models["sd1"], hashes=False)["hashes"] is None


def test_sdxl_blocks(models):
    info = inspect_file(models["sdxl"], hashes=False)
    assert info["architecture"]["name"] == "sdxl"
    names = [b["name"] for b in info["blocks"]]
    assert names == list(architectures()["sdxl"].blocks) and len(names) == 20
    assert info["components"]["text_encoder"]["tensors"] == sum(
        1 for k in load_file(str(models["sdxl"])) if k.startswith("conditioner.embedders."))


def test_generic_layers_metadata_and_lineage(models):
    info = inspect_file(models["llama"])
    assert info["architecture"]["name"] == "llama" and "4 layers" in info["architecture"]["how"]
    assert info["grouping"] == "layer"
    assert [b["name"] for b in info["blocks"]] == ["0", "1", "2", "3", "other"]
    assert all(b["tensors"] == 9 and b["dtypes"] == {"F32": 9} for b in info["blocks"][:4])
    assert info["blocks"][4]["tensors"] == 3  # embed_tokens, norm, lm_head
    assert info["blocks"][0]["params"] == 4 * 16 * 16 + 3 * 40 * 16 + 2 * 16
    assert info["components"]["embeddings"]["params"] == 64 * 16
    assert info["components"]["lm_head"]["tensors"] == 1
    assert info["components"]["layers"]["tensors"] == 4 * 9 and info["components"]["norm"]["tensors"] == 1
    # metadata comes back exactly as stored, recipes as strings; the lineage is parsed
    assert info["metadata"]["mergebuild.recipe"] == json.dumps(RECIPE)
    assert info["metadata"]["sd_merge_recipe"] == '{"type": "webui"}'
    assert info["lineage"] == RECIPE
    json.dumps(info)
