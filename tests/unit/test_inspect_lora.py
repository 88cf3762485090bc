"""inspect on LoRA / LyCORIS files fabricated for shrunk SD1 and SDXL checkpoints: the "lora"
section checked against what was made, and the text the CLI prints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebuild.analyze.inspect import inspect_file
from mergebuild.layouts.lora_names import module_names
from mergebuild.testing.fabricate import layout_keys, llama_keys, make_base
from mergebuild.testing.lora import FORMATS, SD1_TE, SDXL_TE1, SDXL_TE2, UNET, lora_modules, make_lora, save_lora
from tests.conftest import run_cli

LAYOUTS = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}
# the component of the checkpoint key each module targets, as inspect names them
PREFIXES = {"sd1": ((UNET, "unet"), (SD1_TE, "text_encoder")),
            "sdxl": ((UNET, "unet"), (SDXL_TE1, "clip_l"), (SDXL_TE2, "clip_g"))}
HEADLINE = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA", "peft": "PEFT"}
RECIPE = json.dumps({"format": 2, "target": "final", "nodes": {f"n{i}": {"method": "lora", "inputs": ["base", f"l{i}"]}
                                                              for i in range(40)}})


@pytest.fixture(scope="module")
def keys() -> dict[str, dict]:
    return {arch: layout_keys(layout, shrink=64) for arch, layout in LAYOUTS.items()}


def expected_components(checkpoint: dict, arch: str, fmt: str) -> dict[str, int]:
    counts = Counter()
    for _, key, _ in lora_modules(checkpoint, arch, fmt):
        counts[next(name for prefix, name in PREFIXES[arch] if key.startswith(prefix))] += 1
    return dict(counts)


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_section_describes_what_was_made(tmp_path, keys, arch, fmt):
    sd = make_lora(keys[arch], arch, rank=8, fmt=fmt, alpha=4)
    path = save_lora(tmp_path / f"{fmt}.safetensors", sd)
    info = inspect_file(path, hashes=False)
    lora = info["lora"]
    made = lora_modules(keys[arch], arch, fmt)
    assert lora["format"] == HEADLINE[fmt]
    assert lora["naming"] == ("peft" if fmt == "peft" else "kohya")
    assert lora["modules"] == len(made) == sum(lora["module_formats"].values())
    assert lora["ranks"] == [8] and lora["rank"] == 8 and lora["modules_without_rank"] == 0
    if fmt == "peft":  # PEFT files store no alpha: alpha = rank, a scale of 1
        assert lora["alphas"] == [] and lora["alpha"] is None and lora["modules_without_alpha"] == len(made)
    else:
        assert lora["alphas"] == [4.0] and lora["alpha"] == 4.0 and lora["modules_without_alpha"] == 0
    assert lora["target"]["name"] == arch and f"{len(made)} of {len(made)}" in lora["target"]["how"]
    assert {k: v["modules"] for k, v in lora["components"].items()} == expected_components(keys[arch], arch, fmt)
    assert sum(row["modules"] for row in lora["blocks"]) == len(made)
    assert sum(row["tensors"] for row in lora["blocks"]) == len(sd) == info["totals"]["tensors"]
    assert sum(row["params"] for row in lora["components"].values()) == sum(t.numel() for t in sd.values())
    assert lora["unmatched"] == [] and lora["stray_tensors"] == []
    assert lora["kohya"] == {"ss_network_module": "networks.lora"}
    # the existing fields stay what they were: a LoRA's keys are those of no known checkpoint
    assert info["architecture"]["name"] == "generic" and info["architecture"]["kind"] == "lora"
    json.dumps(info, allow_nan=False)


def test_module_kinds_of_a_locon(tmp_path, keys):
    sd = make_lora(keys["sd1"], "sd1", rank=4, fmt="locon", cp=True)
    lora = inspect_file(save_lora(tmp_path / "cp.safetensors", sd), hashes=False)["lora"]
    convs = sum(1 for k, v in sd.items() if k.endswith(".lora_mid.weight"))
    assert lora["format"] == "LoCon" and lora["module_formats"]["LoCon-CP"] == convs > 0
    assert lora["module_formats"]["LoRA"] == lora["modules"] - convs  # linear and 1x1 modules


def test_mixed_ranks_and_alphas(tmp_path, keys):
    te = make_lora(keys["sd1"], "sd1", rank=4, alpha=2, targets=r"^cond_stage_model\.")
    unet = make_lora(keys["sd1"], "sd1", rank=8, alpha=8, targets=r"^model\.diffusion_model\.")
    lora = inspect_file(save_lora(tmp_path / "mixed.safetensors", {**te, **unet}), hashes=False)["lora"]
    n_te, n_unet = (sum(k.endswith(".alpha") for k in part) for part in (te, unet))
    assert lora["ranks"] == [4, 8] and lora["alphas"] == [2.0, 8.0]
    assert lora["rank"] == (8 if n_unet > n_te else 4) and lora["alpha"] == (8.0 if n_unet > n_te else 2.0)
    assert {k: v["modules"] for k, v in lora["components"].items()} == {"text_encoder": n_te, "unet": n_unet}


def test_alphas_in_half_precision_and_missing(tmp_path, keys):
    sd = make_lora(keys["sd1"], "sd1", rank=4, alpha=3, dtype=torch.bfloat16)
    first = sorted(k for k in sd if k.endswith(".alpha"))[0]
    del sd[first]
    lora = inspect_file(save_lora(tmp_path / "bf16.safetensors", sd), hashes=False)["lora"]
    assert lora["alphas"] == [3.0] and lora["modules_without_alpha"] == 1


def test_lokr_with_full_factors_has_no_rank(tmp_path, keys):
    sd = make_lora(keys["sd1"], "sd1", fmt="lokr", decompose_w2=False)
    lora = inspect_file(save_lora(tmp_path / "lokr.safetensors", sd), hashes=False)["lora"]
    assert lora["format"] == "LoKr" and lora["ranks"] == [] and lora["rank"] is None
    assert lora["modules_without_rank"] == lora["modules"]


def test_ldm_module_names_are_recognised_too(tmp_path, keys):
    # kohya writes Diffusers names for SD1 and SGM (LDM-style) names for SDXL; each file also
    # turns up under the other scheme
    sd = make_lora(keys["sd1"], "sd1", rank=4)
    assert any(k.startswith("lora_unet_down_blocks_") for k in sd)
    ldm = {m.target: m.name for m in module_names(keys["sd1"], "sd1")
           if m.name.startswith("lora_unet_") and not m.preferred}
    preferred = {m.name: m.target for m in module_names(keys["sd1"], "sd1") if m.preferred}
    renamed = {}
    for name, tensor in sd.items():
        module, _, suffix = name.partition(".")
        target = preferred[module]
        renamed[f"{ldm.get(target, module)}.{suffix}"] = tensor
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    lora = inspect_file(save_lora(tmp_path / "ldm.safetensors", renamed), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd1" and lora["unmatched"] == []
    assert lora["components"]["unet"]["modules"] == sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in sd)
    xl = make_lora(keys["sdxl"], "sdxl", rank=4)
    assert any(k.startswith("lora_unet_input_blocks_") for k in xl) and any(k.startswith("lora_te2_") for k in xl)


def test_sd2_from_metadata_or_text_encoder_depth(tmp_path, keys):
    sd = make_lora(keys["sd1"], "sd1", rank=4)
    meta = {"ss_base_model_version": "sd_v2_768_v", "ss_network_dim": "4", "ss_network_alpha": "2", "other": "x"}
    lora = inspect_file(save_lora(tmp_path / "v2.safetensors", sd, meta), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd2" and "sd_v2_768_v" in lora["target"]["how"]
    assert lora["kohya"] == {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v2_768_v"}
    # SD2's OpenCLIP text encoder has 23 layers, SD1's 12: layer 12 is SD2's
    deeper = {k.replace("_layers_0_", "_layers_12_"): v.clone() for k, v in sd.items() if "lora_te_text_model_encoder_layers_0_" in k}
    lora = inspect_file(save_lora(tmp_path / "deep.safetensors", {**sd, **deeper}, {}), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd2" and "layer 12" in lora["target"]["how"]
    assert lora["unmatched"] == [] and lora["components"]["text_encoder"]["modules"] == 72 + 6


def test_modules_no_checkpoint_has_are_listed(tmp_path, keys):
    sd = make_lora(keys["sdxl"], "sdxl", rank=4)
    sd["lora_unet_nowhere.lora_up.weight"], sd["lora_unet_nowhere.lora_down.weight"] = torch.ones(4, 4), torch.ones(4, 4)
    sd["bundle_emb.token.string_to_param.*"] = torch.ones(2, 8)
    lora = inspect_file(save_lora(tmp_path / "odd.safetensors", sd), hashes=False)["lora"]
    assert lora["target"]["name"] == "sdxl" and lora["unmatched"] == ["lora_unet_nowhere"]
    assert lora["components"]["other"]["modules"] == 1 and lora["blocks"][-1]["name"] == "other"
    assert lora["stray_tensors"] == ["bundle_emb.token.string_to_param.*"]


def test_a_peft_lora_of_an_llm(tmp_path):
    sd = make_lora(llama_keys(), "generic", rank=4, fmt="peft")
    lora = inspect_file(save_lora(tmp_path / "llm.safetensors", sd), hashes=False)["lora"]
    assert lora["format"] == "PEFT" and lora["target"]["name"] == "generic" and lora["unmatched"] is None
    assert [row["name"] for row in lora["blocks"]] == ["0", "1", "2", "3"]
    assert lora["components"] == {"layers": {"modules": 28, "tensors": 56, "params": sum(t.numel() for t in sd.values()),
                                             "bytes": 4 * sum(t.numel() for t in sd.values())}}


def test_a_checkpoint_is_no_lora(tmp_path, keys):
    path = tmp_path / "sd1.safetensors"
    save_file(make_base(keys["sd1"], seed=0), str(path))
    info = inspect_file(path, hashes=False)
    assert info["lora"] is None and info["architecture"]["kind"] == "model" and info["architecture"]["name"] == "sd1"


def test_cli_text_names_the_lora_and_cuts_the_recipe(tmp_path, keys):
    sd = make_lora(keys["sdxl"], "sdxl", rank=8, fmt="locon", alpha=4)
    meta = {"mergebuild.recipe": RECIPE, "ss_network_module": "lycoris.kohya", "ss_network_dim": "8"}
    path = save_lora(tmp_path / "xl-locon.safetensors", sd, meta)
    proc = run_cli("inspect", path, "--no-hashes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    modules = len(lora_modules(keys["sdxl"], "sdxl", "locon"))
    assert lines[0] == f"{path}: LoRA (LoCon) for sdxl: {modules} modules, rank 8, alpha 4"
    assert "modules by block" in proc.stdout and "any other model" not in proc.stdout
    recipe = next(line for line in lines if line.startswith("  mergebuild.recipe: "))
    value = recipe.removeprefix("  mergebuild.recipe: ")
    assert value.startswith(RECIPE[:20]) and value.endswith(f"... ({len(RECIPE):,} chars)") and len(value) <= 60
    assert "  ss_network_module: lycoris.kohya" in lines and "  ss_network_dim: 8" in lines
    doc = json.loads(run_cli("inspect", path, "--no-hashes", "--json", cwd=tmp_path).stdout)
    assert doc["metadata"]["mergebuild.recipe"] == RECIPE  # the JSON keeps it whole
    assert doc["lora"]["format"] == "LoCon" and doc["lora"]["kohya"]["ss_network_dim"] == "8"


def test_a_checkpoints_text_only_gains_metadata_values(tmp_path, keys):
    path = tmp_path / "sd1.safetensors"
    save_file(make_base(keys["sd1"], seed=0), str(path), metadata={"format": "pt", "sd_merge_recipe": "{\n  \"type\": 1\n}"})
    text = run_cli("inspect", path, "--no-hashes", cwd=tmp_path).stdout
    head, _, listing = text.partition("metadata:\n")
    assert head.startswith(f"{path}: Stable Diffusion 1.x (LDM key names) (sd1)\n")
    assert "by block" in head and "│ OUT11 " in head and "\ncomponents: text_encoder " in head and "LoRA" not in head
    assert listing.splitlines() == ["  format: pt", '  sd_merge_recipe: { "type": 1 }']  # one line each


def test_sd2_from_the_cross_attention_width(tmp_path):
    # SD2's cross-attention reads 1024-wide context (SD1: 768), under the same module names
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = {f"{module}.lora_up.weight": torch.zeros(320, 4), f"{module}.lora_down.weight": torch.zeros(4, 1024),
          f"{module}.alpha": torch.tensor(4.0)}
    lora = inspect_file(save_lora(tmp_path / "v2.safetensors", sd, {}), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd2" and "1024 features" in lora["target"]["how"]
    assert lora["blocks"] == [{"name": "IN01", "modules": 1, "tensors": 3, "params": 320 * 4 + 4 * 1024 + 1,
                               "bytes": 4 * (320 * 4 + 4 * 1024 + 1)}]
