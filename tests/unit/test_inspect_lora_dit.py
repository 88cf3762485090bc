"""inspect on Flux and SD3 LoRAs (kohya and Diffusers names) fabricated for shrunk checkpoints:
the format, the architecture it was made for (dev or schnell, SD3 or SD3.5 by metadata and by
evidence), ranks, modules by block, and the text the CLI prints."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mergebuild.analyze.inspect import inspect_file
from mergebuild.layouts.blocks import architectures
from mergebuild.testing.fabricate import layout_keys
from mergebuild.testing.lora import chosen_modules, make_lora, save_lora
from tests.conftest import run_cli

P = "model.diffusion_model."


@pytest.fixture(scope="module")
def flux():
    return layout_keys("flux-flux", 64)


@pytest.fixture(scope="module")
def sd3():
    return layout_keys("sd3-comfyui", 64)


def blocks_of(arch: str, checkpoint, fmt: str) -> dict[str, int]:
    """Modules per block, from the checkpoint keys the fabricated modules target."""
    a = architectures()[arch]
    return dict(Counter(a.block_of(m.target.key) for m in chosen_modules(checkpoint, arch, fmt)))


@pytest.mark.parametrize("fmt, naming, headline", [("lora", "kohya", "LoRA"), ("peft", "diffusers", "PEFT")])
def test_a_flux_lora_in_either_naming(tmp_path, flux, fmt, naming, headline):
    sd = make_lora(flux, "flux-dev", rank=8, fmt=fmt, alpha=4)
    lora = inspect_file(save_lora(tmp_path / f"{fmt}.safetensors", sd, {"ss_base_model_version": "flux1"}), hashes=False)["lora"]
    made = chosen_modules(flux, "flux-dev", fmt)
    assert lora["format"] == headline and lora["ranks"] == [8] and lora["modules"] == len(made)
    assert lora["target"]["name"] == "flux-dev" and f"{len(made)} of {len(made)}" in lora["target"]["how"]
    assert lora["target"]["grouping"] == "block" and lora["unmatched"] == []
    assert lora["name_styles"] == {naming: len(made)}
    rows = {row["name"]: row["modules"] for row in lora["blocks"]}
    assert rows == blocks_of("flux-dev", flux, fmt)
    # kohya: 10 fused modules per double block; diffusers: q, k, v apart, so 14
    assert rows["D00"] == (10 if fmt == "lora" else 14) and rows["S37"] == (3 if fmt == "lora" else 6)
    assert rows["CLIP"] == 72 and rows["T5"] == 24 * 7
    assert set(lora["components"]) == {"clip_l", "t5xxl", "unet"}


def test_schnell_by_modelspec_and_sd35_by_metadata_or_modules(tmp_path, flux, sd3):
    sd = make_lora(flux, "flux-dev", rank=4, targets=r"double_blocks\.0\.")
    meta = {"modelspec.architecture": "flux-1-schnell/lora", "ss_base_model_version": "flux1"}
    lora = inspect_file(save_lora(tmp_path / "schnell.safetensors", sd, meta), hashes=False)["lora"]
    assert lora["target"]["name"] == "flux-schnell" and "flux-1-schnell/lora" in lora["target"]["how"]
    xl = make_lora(sd3, "sd3-medium", rank=4, targets=r"joint_blocks\.(0|23)\.")
    meta = {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}
    lora = inspect_file(save_lora(tmp_path / "large.safetensors", xl, meta), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd3.5-large"
    # SD3.5 large has 38 joint blocks, SD3 medium 24: a module of block 30 tells it, and has its row
    deeper = {k.replace("joint_blocks_0_", "joint_blocks_30_"): v.clone() for k, v in xl.items() if "joint_blocks_0_" in k}
    lora = inspect_file(save_lora(tmp_path / "deep.safetensors", {**xl, **deeper}, {}), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd3.5-large" and "joint block 30" in lora["target"]["how"]
    assert lora["unmatched"] == [] and {"J00", "J23", "J30"} <= {row["name"] for row in lora["blocks"]}
    plain = inspect_file(save_lora(tmp_path / "sd3.safetensors", xl, {}), hashes=False)["lora"]
    assert plain["target"]["name"] == "sd3-medium" and plain["unmatched"] == []


def test_an_sd3_lora_lists_what_no_sd3_has(tmp_path, sd3):
    sd = make_lora(sd3, "sd3-medium", rank=4, fmt="peft")
    sd["transformer.nowhere.lora_A.weight"], sd["transformer.nowhere.lora_B.weight"] = torch.ones(4, 8), torch.ones(8, 4)
    lora = inspect_file(save_lora(tmp_path / "sd3.safetensors", sd, {}), hashes=False)["lora"]
    assert lora["target"]["name"] == "sd3-medium" and lora["unmatched"] == ["transformer.nowhere"]
    assert {"CLIP", "T5", "J23", "other"} <= {row["name"] for row in lora["blocks"]}
    assert set(lora["components"]) == {"clip_g", "clip_l", "t5xxl", "unet", "other"}


def test_cli_text_names_format_target_blocks_and_namings(tmp_path, flux):
    sd = make_lora(flux, "flux-dev", rank=8, alpha=4, targets=r"double_blocks\.[01]\.|single_blocks\.0\.")
    sd.update(make_lora(flux, "flux-dev", rank=8, fmt="peft", targets=r"single_blocks\.1\."))
    path = save_lora(tmp_path / "mixed.safetensors", sd, {"ss_network_dim": "8"})
    proc = run_cli("inspect", path, "--no-hashes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{path}: LoRA (PEFT) for flux-dev: 29 modules, rank 8, alpha 4 (6 modules without: alpha = rank)"
    assert "modules by block" in proc.stdout and any(line.startswith("│ D01 ") for line in lines)
    assert "module names: diffusers 6, kohya 23" in lines
