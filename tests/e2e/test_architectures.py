"""Flux.1 and SD3 / SD3.5 as data: detection, every key in exactly one block (against key -> block
functions written here from supermerger's and ComfyUI's published rules), block weights reaching
the right keys, early cutoff per block, and nothing merged or dropped by accident."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from mergebuild.layouts.blocks import architectures, detect
from mergebuild.testing.fabricate import layout_keys, make_base, make_finetune
from tests.conftest import load, mergefile, run_cli

PREFIX = "model.diffusion_model."
FLUX_BLOCKS = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]


def supermerger_flux_block(key: str) -> str | None:
    """supermerger's blockfromkey for Flux (scripts/mergers/mergers.py): substring tests in
    this order; None for the VAE, which it does not merge."""
    if "vae" in key:
        return None
    if "t5xxl" in key:
        return "T5"
    if "text_encoders.clip" in key:
        return "CLIP"
    for word, letter in (("double_blocks", "D"), ("single_blocks", "S")):
        if word in key:
            index = int(re.search(r"\.(\d+)\.", key).group(1))
            return f"{letter}{index:02d}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    raise AssertionError(f"supermerger has no block for {key}")


COMFY_FLUX = ["img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in.",
              *[f"double_blocks.{i}." for i in range(19)], *[f"single_blocks.{i}." for i in range(38)], "final_layer."]


def comfy_group(key: str, groups: list[str]) -> str:
    """ComfyUI's ModelMergeBlocks: the longest group that prefixes the key without its
    diffusion_model. prefix; the first group where none does."""
    unet = key.removeprefix("model.").removeprefix("diffusion_model.")
    hits = [g for g in groups if unet.startswith(g)]
    return max(hits, key=len) if hits else groups[0]


def _family(folder, keys: dict, names=("a", "b")) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    base = make_base(keys, seed=0, dtype=torch.float32)
    paths = []
    for i, name in enumerate(names):
        model = base if i == 0 else make_finetune(base, seed=i, scale=0.05)
        save_file(model, str(folder / f"{name}.safetensors"))
        paths.append(folder / f"{name}.safetensors")
    return paths


def flux_keys(prefixed: bool = True, full: bool = True, schnell: bool = False) -> dict:
    keys = layout_keys("flux-flux", shrink=64)
    if not full:
        keys = {k: v for k, v in keys.items() if k.startswith(PREFIX)}
    if not prefixed:
        keys = {k.removeprefix(PREFIX): v for k, v in keys.items()}
    if schnell:
        keys = {k: v for k, v in keys.items() if "guidance_in" not in k}
    return keys


def sd3_keys(depth: int = 24) -> dict:
    """SD3 medium from the layout; 38 joint blocks (SD3.5 large) by repeating block 0."""
    keys = layout_keys("sd3-comfyui", shrink=64)
    block0 = {k: v for k, v in keys.items() if k.startswith(PREFIX + "joint_blocks.0.")}
    for i in range(24, depth):
        keys.update({k.replace("joint_blocks.0.", f"joint_blocks.{i}."): v for k, v in block0.items()})
    return keys


@pytest.mark.parametrize("keys, name", [
    (lambda: flux_keys(), "flux-dev"),
    (lambda: flux_keys(prefixed=False, full=False), "flux-dev"),
    (lambda: flux_keys(full=False), "flux-dev"),
    (lambda: flux_keys(schnell=True), "flux-schnell"),
    (lambda: sd3_keys(), "sd3-medium"),
    (lambda: sd3_keys(38), "sd3.5-large"),
    (lambda: layout_keys("sdxl-sgm", shrink=64), "sdxl"),
    (lambda: layout_keys("sd1-ldm", shrink=64), "sd1"),
])
def test_detection_by_key_names(keys, name):
    assert detect(list(keys()))[0].name == name


@pytest.mark.parametrize("prefixed", [True, False])
def test_every_flux_key_is_in_supermergers_block(prefixed):
    arch = architectures()["flux-dev"]
    keys = flux_keys(prefixed=prefixed, full=prefixed)
    for key in keys:
        expected = supermerger_flux_block(key)
        got = arch.block_of(key)
        assert (got if expected is not None else None) == expected or (expected is None and got == "VAE"), key
        assert expected is None or got in arch.blocks
    expected = FLUX_BLOCKS if prefixed else FLUX_BLOCKS[2:]  # a transformer-only file: no CLIP, T5
    assert sorted({arch.block_of(k) for k in keys} - {"VAE"}, key=FLUX_BLOCKS.index) == expected


def test_comfyui_group_names_are_aliases_or_groups_of_flux_blocks():
    arch = architectures()["flux-dev"]
    for key in flux_keys(full=False):
        group = comfy_group(key, COMFY_FLUX).rstrip(".")
        if group in arch.groups:
            assert arch.group_of(key) == group and arch.block_of(key) == "IN", key
        else:
            assert arch.canonical_block(group) == arch.block_of(key), key


def test_sd3_blocks_follow_comfyuis_groups():
    groups = ["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder.",
              *[f"joint_blocks.{i}." for i in range(38)], "final_layer."]
    arch = architectures()["sd3.5-large"]
    for key in sd3_keys(38):
        block = arch.block_of(key)
        if not key.startswith(PREFIX):
            assert block in {"CLIP", "T5", "VAE", "IN"}, key
            continue
        group = comfy_group(key, groups).rstrip(".")
        want = {"final_layer": "OUT"}.get(group) or (f"J{int(group.split('.')[1]):02d}" if group.startswith("joint")
                                                      else "IN")
        assert block == want, key
    assert len(arch.blocks) == 3 + 38 + 1 and len(architectures()["sd3-medium"].blocks) == 3 + 24 + 1


PAIR = """
        [models.a]
        path = "models/a.safetensors"
        [models.b]
        path = "models/b.safetensors"
"""  # the two models most tests merge


def _build(folder, body: str, *args) -> dict:
    mergefile(folder / "mergefile.toml", body)
    return json.loads(run_cli("--json", *args, cwd=folder, check=True).stdout)


def _implied_alpha(a, b, out) -> float:
    """The alpha of a weighted sum, read back from its result."""
    d = (b.double() - a.double()).flatten()
    return float(((out.double() - a.double()).flatten() @ d) / (d @ d))


def test_a_61_value_list_reaches_each_flux_block(tmp_path):
    a, b = _family(tmp_path / "models", flux_keys())
    values = [round(0.01 + i / 70, 4) for i in range(61)]
    mergefile(tmp_path / "mergefile.toml", PAIR + f"""
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = {values}
        output = "out/m.safetensors"
    """)
    proc = run_cli(cwd=tmp_path, check=True)
    A, B, out = load(a), load(b), load(tmp_path / "out/m.safetensors")
    assert set(out) == set(A)  # nothing dropped
    assert "VAE keys are in no block" in proc.stderr  # and kept from A, said once
    for key in A:
        block = supermerger_flux_block(key)
        if block is None:
            assert torch.equal(out[key], A[key]), key  # the VAE is A's, as in supermerger
        elif not torch.equal(A[key], B[key]):
            assert _implied_alpha(A[key], B[key], out[key]) == pytest.approx(values[FLUX_BLOCKS.index(block)],
                                                                            abs=1e-5), key


def test_comfyui_names_and_groups_in_a_flux_block_table(tmp_path):
    _family(tmp_path / "models", flux_keys(prefixed=False, full=False))
    _build(tmp_path, PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = { default = 0.1, IN = 0.5, img_in = 0.2, "double_blocks.3" = 0.9, S07 = 0.7, "final_layer." = 0.3 }
        output = "out/m.safetensors"
    """)
    A, B, out = (load(tmp_path / p) for p in ("models/a.safetensors", "models/b.safetensors", "out/m.safetensors"))
    for key in A:
        group = comfy_group(key, COMFY_FLUX)
        want = {"img_in.": 0.2, "double_blocks.3.": 0.9, "single_blocks.7.": 0.7, "final_layer.": 0.3}.get(group)
        if want is None:
            want = 0.5 if group in ("time_in.", "guidance_in", "vector_in.", "txt_in.") else 0.1
        assert _implied_alpha(A[key], B[key], out[key]) == pytest.approx(want, abs=1e-5), key


def test_a_block_given_twice_by_two_names_is_an_error(tmp_path):
    _family(tmp_path / "models", flux_keys(full=False))
    mergefile(tmp_path / "mergefile.toml", PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = { default = 0.1, D03 = 0.5, "double_blocks.3" = 0.9 }
        output = "out/m.safetensors"
    """)
    proc = run_cli("-n", cwd=tmp_path)
    assert proc.returncode == 2 and "D03 is given twice" in proc.stderr and "Traceback" not in proc.stderr


def test_changing_one_flux_block_recomputes_only_it_downstream(tmp_path):
    _family(tmp_path / "models", flux_keys(), names=("a", "b", "c"))
    body = PAIR + """
        [models.c]
        path = "models/c.safetensors"
        [merges.mid]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = {{ default = 0.3, D05 = {d05} }}
        [merges.top]
        method = "add_difference"
        inputs = ["mid", "c", "a"]
        alpha = 0.5
        output = "out/top.safetensors"
    """
    _build(tmp_path, body.format(d05=0.4))
    doc = _build(tmp_path, body.format(d05=0.6))
    d05 = sum(1 for k in flux_keys() if supermerger_flux_block(k) == "D05")
    assert doc["merges"]["mid"]["computed"] == d05 and doc["merges"]["top"]["computed"] == d05


def test_sd3_text_encoders_and_vae_merge_and_its_schedule_passes_through(tmp_path):
    a, b = _family(tmp_path / "models", sd3_keys())
    _build(tmp_path, PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "out/m.safetensors"
    """)
    A, B, out = load(a), load(b), load(tmp_path / "out/m.safetensors")
    assert set(out) == set(A)
    t5 = [k for k in A if k.startswith("text_encoders.t5xxl.") and not torch.equal(A[k], B[k])]
    assert t5 and all(_implied_alpha(A[k], B[k], out[k]) == pytest.approx(0.5, abs=1e-5) for k in t5)  # merged
    vae = [k for k in A if k.startswith("first_stage_model.") and not torch.equal(A[k], B[k])]
    assert vae and all(_implied_alpha(A[k], B[k], out[k]) == pytest.approx(0.5, abs=1e-5) for k in vae)
    assert torch.equal(out["model.model_sampling.sigmas"], A["model.model_sampling.sigmas"])  # a schedule


def test_a_key_only_in_a_later_input_is_named(tmp_path):
    keys = flux_keys(full=False)
    a, b = _family(tmp_path / "models", keys)
    extra = load(b)
    extra["model.diffusion_model.distilled_guidance_layer.in_proj.weight"] = torch.ones(4, 4)
    save_file(extra, str(b))
    mergefile(tmp_path / "mergefile.toml", PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "out/m.safetensors"
    """)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "distilled_guidance_layer.in_proj.weight" in proc.stderr and "only in b" in proc.stderr


def test_flux_output_carries_its_modelspec_architecture(tmp_path):
    from safetensors import safe_open

    _family(tmp_path / "models", flux_keys(schnell=True))
    _build(tmp_path, PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "out/m.safetensors"
    """)
    with safe_open(str(tmp_path / "out/m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-schnell"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"


def test_a_full_flux_checkpoint_merges_with_a_transformer_only_file(tmp_path):
    a, b = _family(tmp_path / "models", flux_keys())
    B = load(b)
    save_file({k.removeprefix(PREFIX): v for k, v in B.items() if k.startswith(PREFIX)}, str(b))
    mergefile(tmp_path / "mergefile.toml", PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "out/m.safetensors"
    """)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "left out" not in proc.stderr and "changed no tensor" not in proc.stderr
    A, out = load(a), load(tmp_path / "out/m.safetensors")
    for key in A:
        if key.startswith(PREFIX) and not torch.equal(A[key], B[key]):
            assert _implied_alpha(A[key], B[key], out[key]) == pytest.approx(0.5, abs=1e-5), key
        elif not key.startswith(PREFIX):
            assert torch.equal(out[key], A[key]), key  # b has no text encoders nor VAE


def test_flux_relatives_with_its_block_names_are_not_flux_1():
    flux2 = {**flux_keys(full=False), "model.diffusion_model.double_stream_modulation_img.lin.weight": None}
    assert detect(list(flux2))[0].name not in ("flux-dev", "flux-schnell")
    chroma = {k: v for k, v in flux_keys(schnell=True).items() if "time_in" not in k and "vector_in" not in k}
    chroma["model.diffusion_model.distilled_guidance_layer.in_proj.weight"] = None
    arch = detect(list(chroma))[0]
    assert arch.name == "chroma" and arch.modelspec["architecture"] == "chroma"


def test_a_flux_fill_model_merges_its_first_64_input_channels(tmp_path):
    keys = flux_keys(full=False)
    shape, dtype = keys[PREFIX + "img_in.weight"]
    keys[PREFIX + "img_in.weight"] = ((shape[0], 64), dtype)  # Flux's 64 latent channels, unshrunk
    fill = {**keys, PREFIX + "img_in.weight": ((shape[0], 384), dtype)}  # + mask and masked image
    (tmp_path / "models").mkdir()
    save_file(make_base(fill, seed=3, dtype=torch.float32), str(tmp_path / "models/a.safetensors"))
    save_file(make_base(keys, seed=4, dtype=torch.float32), str(tmp_path / "models/b.safetensors"))
    _build(tmp_path, PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.5
        output = "out/m.safetensors"
    """)
    A, B = load(tmp_path / "models/a.safetensors"), load(tmp_path / "models/b.safetensors")
    out = load(tmp_path / "out/m.safetensors")[PREFIX + "img_in.weight"]
    a, b = A[PREFIX + "img_in.weight"], B[PREFIX + "img_in.weight"]
    assert out.shape == a.shape and torch.equal(out[:, 64:], a[:, 64:])
    assert torch.allclose(out[:, :64], (a[:, :64] + b) / 2, atol=1e-6)


def test_comfyui_spellings_with_a_dot_and_respelled_tables_are_one_recipe(tmp_path):
    _family(tmp_path / "models", flux_keys(full=False))
    body = PAIR + """
        [settings]
        time_embed = "{te}"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = {{ default = 0.5, {names} }}
        output = "out/m.safetensors"
    """
    _build(tmp_path, body.format(te="IN00", names='D03 = 0.2, OUT = 0.1, img_in = 0.3'))
    respelled = body.format(te="BASE", names='"double_blocks.3." = 0.2, final_layer = 0.1, "img_in." = 0.3')
    mergefile(tmp_path / "mergefile.toml", respelled)
    status = json.loads(run_cli("status", "--json", cwd=tmp_path, check=True).stdout)
    assert all(t["up_to_date"] for t in status["targets"].values()), status  # Flux has no time_embed rule


def test_a_dry_run_says_which_keys_a_block_list_leaves_alone(tmp_path):
    _family(tmp_path / "models", flux_keys())
    mergefile(tmp_path / "mergefile.toml", PAIR + f"""
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = {[0.5] * 61}
        output = "out/m.safetensors"
    """)
    proc = run_cli("-n", cwd=tmp_path, check=True)
    assert "VAE keys are in no block" in proc.stderr


def test_a_block_table_entry_that_reaches_no_key_is_named(tmp_path):
    _family(tmp_path / "models", flux_keys(full=False, schnell=True))  # no guidance_in, no CLIP
    mergefile(tmp_path / "mergefile.toml", PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = { default = 0.5, guidance_in = 0.1, CLIP = 0.2, D03 = 0.4 }
        output = "out/m.safetensors"
    """)
    proc = run_cli("-n", cwd=tmp_path, check=True)
    assert "alpha: CLIP, guidance_in reach no key of this flux-schnell model" in proc.stderr
    assert "D03" not in proc.stderr


def test_an_sd_preset_on_flux_says_what_it_is(tmp_path):
    _family(tmp_path / "models", flux_keys(full=False))
    mergefile(tmp_path / "mergefile.toml", PAIR + """
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = "GRAD_V"
        output = "out/m.safetensors"
    """)
    proc = run_cli("-n", cwd=tmp_path)
    assert proc.returncode == 2 and "preset GRAD_V is a list of 26 block values" in proc.stderr
