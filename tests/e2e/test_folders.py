"""Hugging Face model folders: sharded sources with an index, sharded outputs with config files."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from mergebuild.testing.fabricate import llama_keys, make_base, make_finetune
from tests.conftest import build_json, mergefile, run_cli


def hf_folder(path, model: dict, shards: int) -> dict:
    path.mkdir(parents=True)
    names = sorted(model)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: model[k] for k in part}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    return model


def load_folder(path) -> dict:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in set(index["weight_map"].values()):
        out.update(load_file(str(path / shard)))
    assert set(out) == set(index["weight_map"])
    return out


def test_llm_folders_in_and_out(tmp_path):
    base = make_base(llama_keys(layers=4), seed=0, dtype=torch.float32)
    a = hf_folder(tmp_path / "llama-a", make_finetune(base, seed=1), shards=2)
    b = hf_folder(tmp_path / "llama-b", make_finetune(base, seed=2), shards=3)
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "llama-a"
        [models.b]
        path = "llama-b"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = { gradient = [0.0, 1.0], default = 0.5 }
        output = "out/llama-merged"
        shard_size = "20KB"
    """)
    doc = build_json(cwd=tmp_path)
    assert doc["merges"]["m"]["architecture"] == "llama"
    out_dir = tmp_path / "out/llama-merged"
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == "llama"
    out = load_folder(out_dir)
    for key, t in out.items():
        layer = int(key.split(".")[2]) if ".layers." in key else None
        alpha = layer / 3 if layer is not None else 0.5
        torch.testing.assert_close(t, (1 - alpha) * a[key] + alpha * b[key])
    stamp = (out_dir / "model.safetensors.index.json").stat().st_mtime_ns
    assert all(m["computed"] == 0 for m in build_json(cwd=tmp_path)["merges"].values())
    assert (out_dir / "model.safetensors.index.json").stat().st_mtime_ns == stamp  # a no-op rewrites nothing
    lineage = json.loads(run_cli("lineage", out_dir, "--json", cwd=tmp_path, check=True).stdout)
    assert lineage["made_by"]["method"] == "weighted_sum"


def test_a_changed_shard_dirties_only_its_tensors(tmp_path):
    base = make_base(llama_keys(layers=2), seed=0, dtype=torch.float32)
    hf_folder(tmp_path / "a", make_finetune(base, seed=1), shards=2)
    hf_folder(tmp_path / "b", make_finetune(base, seed=2), shards=1)
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a"
        [models.b]
        path = "b"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "m.safetensors"
    """)
    build_json(cwd=tmp_path)
    shard = tmp_path / "a/model-00002-of-00002.safetensors"
    part = load_file(str(shard))
    key = sorted(part)[0]
    part[key] = part[key] + 1
    save_file(part, str(shard))
    doc = build_json(cwd=tmp_path)
    assert doc["merges"]["m"]["computed"] == 1
    proc = run_cli("-n", "-v", cwd=tmp_path, check=True)
    assert "up to date" in proc.stdout
