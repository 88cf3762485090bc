"""LoRA module names of Flux and SD3 checkpoints (mergebuild.layouts.lora_names, "dit" scheme):
kohya names the fused BFL/SAI modules, Diffusers names row slices of them; the adaLN swap;
block weights; names as data. Shapes come from the shrunk layouts, so the widths are derived
here from the weights (in-features), as the code must derive them."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from mergebuild.layouts.blocks import architectures
from mergebuild.layouts.lora_names import Target, extraction_targets, lora_map, lora_spec, module_names
from mergebuild.methods import lora_formats as lf
from mergebuild.methods.lora import lbw_table
from mergebuild.testing.fabricate import layout_keys

P = "model.diffusion_model."


def shapes_of(layout: str, shrink: int = 32, bare: bool = False) -> dict[str, tuple]:
    keys = {k: shape for k, (shape, _) in layout_keys(layout, shrink).items()}
    if bare:  # a transformer-only file: no prefix, no text encoders, no VAE
        keys = {k[len(P):]: s for k, s in keys.items() if k.startswith(P)}
    return keys


@pytest.fixture(scope="module")
def flux():
    return shapes_of("flux-flux")


@pytest.fixture(scope="module")
def sd3():
    return shapes_of("sd3-comfyui")


@pytest.mark.parametrize("bare", [False, True])
def test_flux_kohya_names_the_fused_modules_and_diffusers_their_row_slices(bare):
    shapes = shapes_of("flux-flux", bare=bare)
    p = "" if bare else P
    m = lora_map(shapes, "flux-dev")
    qkv, linear1 = p + "double_blocks.3.img_attn.qkv.weight", p + "single_blocks.5.linear1.weight"
    h = shapes[qkv][1]  # the hidden width: 3072 in Flux.1, 96 here
    assert shapes[qkv][0] == 3 * h and shapes[linear1][0] == 7 * h
    assert m["lora_unet_double_blocks_3_img_attn_qkv"] == Target(qkv)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        assert m[f"transformer.transformer_blocks.3.attn.{part}"] == Target(qkv, (i * h, (i + 1) * h))
    txt = p + "double_blocks.3.txt_attn.qkv.weight"
    for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        assert m[f"transformer.transformer_blocks.3.attn.{part}"] == Target(txt, (i * h, (i + 1) * h))
    for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        assert m[f"transformer.single_transformer_blocks.5.{part}"] == Target(linear1, (i * h, (i + 1) * h))
    assert m["transformer.single_transformer_blocks.5.proj_mlp"] == Target(linear1, (3 * h, 7 * h))
    expected = {  # kohya name, diffusers name -> BFL key
        ("lora_unet_double_blocks_3_img_attn_proj", "transformer_blocks.3.attn.to_out.0"): "double_blocks.3.img_attn.proj",
        ("lora_unet_double_blocks_3_img_mlp_0", "transformer_blocks.3.ff.net.0.proj"): "double_blocks.3.img_mlp.0",
        ("lora_unet_double_blocks_3_img_mlp_2", "transformer_blocks.3.ff.net.2"): "double_blocks.3.img_mlp.2",
        ("lora_unet_double_blocks_3_img_mod_lin", "transformer_blocks.3.norm1.linear"): "double_blocks.3.img_mod.lin",
        ("lora_unet_double_blocks_3_txt_attn_proj", "transformer_blocks.3.attn.to_add_out"): "double_blocks.3.txt_attn.proj",
        ("lora_unet_double_blocks_3_txt_mlp_0", "transformer_blocks.3.ff_context.net.0.proj"): "double_blocks.3.txt_mlp.0",
        ("lora_unet_double_blocks_3_txt_mod_lin", "transformer_blocks.3.norm1_context.linear"): "double_blocks.3.txt_mod.lin",
        ("lora_unet_single_blocks_5_linear2", "single_transformer_blocks.5.proj_out"): "single_blocks.5.linear2",
        ("lora_unet_single_blocks_5_modulation_lin", "single_transformer_blocks.5.norm.linear"): "single_blocks.5.modulation.lin",
        ("lora_unet_img_in", "x_embedder"): "img_in",
        ("lora_unet_txt_in", "context_embedder"): "txt_in",
        ("lora_unet_time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"): "time_in.in_layer",
        ("lora_unet_vector_in_out_layer", "time_text_embed.text_embedder.linear_2"): "vector_in.out_layer",
        ("lora_unet_guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"): "guidance_in.in_layer",
        ("lora_unet_final_layer_linear", "proj_out"): "final_layer.linear",
    }
    for (kohya, diffusers), key in expected.items():
        assert m[kohya] == m["transformer." + diffusers] == Target(p + key + ".weight"), kohya
    final = p + "final_layer.adaLN_modulation.1.weight"
    assert m["lora_unet_final_layer_adaLN_modulation_1"] == Target(final)
    assert m["transformer.norm_out.linear"] == Target(final, None, swap=True)


def test_flux_text_encoders_and_the_other_accepted_spellings(flux):
    m = lora_map(flux, "flux-dev")
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight"
    t5 = "text_encoders.t5xxl.transformer.encoder.block.4.layer.0.SelfAttention.q.weight"
    wi = "text_encoders.t5xxl.transformer.encoder.block.4.layer.1.DenseReluDense.wi_1.weight"
    assert m["lora_te1_text_model_encoder_layers_2_self_attn_q_proj"] == Target(clip)
    assert m["lora_te3_encoder_block_4_layer_0_SelfAttention_q"] == m["lora_te2_encoder_block_4_layer_0_SelfAttention_q"] == Target(t5)
    assert m["lora_te3_encoder_block_4_layer_1_DenseReluDense_wi_1"] == Target(wi)
    assert not any("relative_attention_bias" in t.key or "shared" in t.key for t in m.values())
    qkv = P + "double_blocks.0.img_attn.qkv.weight"
    to_k = Target(qkv, (flux[qkv][1], 2 * flux[qkv][1]))
    # ComfyUI's accepted variants: LyCORIS, OneTrainer, bare Diffusers (DiffSynth), ComfyUI's own dotted names
    assert m["lycoris_transformer_blocks_0_attn_to_k"] == m["lora_transformer_transformer_blocks_0_attn_to_k"] == to_k
    assert m["transformer_blocks.0.attn.to_k"] == to_k
    assert m["diffusion_model.double_blocks.0.img_attn.qkv"] == Target(qkv)
    assert not any(t.key.startswith("vae.") for t in m.values())


def test_sd3_names_and_the_two_chunk_modulations_that_swap(sd3):
    m = lora_map(sd3, "sd3-medium")
    h = sd3[P + "joint_blocks.0.x_block.attn.qkv.weight"][1]  # depth * 64 in SD3, 48 here
    for block in ("x_block", "context_block"):
        key = P + f"joint_blocks.7.{block}.attn.qkv.weight"
        assert m[f"lora_unet_joint_blocks_7_{block}_attn_qkv"] == Target(key)
        parts = ("to_q", "to_k", "to_v") if block == "x_block" else ("add_q_proj", "add_k_proj", "add_v_proj")
        for i, part in enumerate(parts):
            assert m[f"transformer.transformer_blocks.7.attn.{part}"] == Target(key, (i * h, (i + 1) * h))
    assert m["lora_unet_joint_blocks_7_context_block_mlp_fc1"] == m["transformer.transformer_blocks.7.ff_context.net.0.proj"]
    assert m["transformer.transformer_blocks.7.attn.to_add_out"] == Target(P + "joint_blocks.7.context_block.attn.proj.weight")
    assert m["transformer.pos_embed.proj"] == Target(P + "x_embedder.proj.weight")  # a 2x2 conv
    assert m["transformer.time_text_embed.text_embedder.linear_2"] == Target(P + "y_embedder.mlp.2.weight")
    # six-chunk modulations keep their order; the last block's context adaLN (context_pre_only,
    # two chunks) and the final layer's are [shift; scale] here, [scale; shift] in diffusers
    ctx7 = P + "joint_blocks.7.context_block.adaLN_modulation.1.weight"
    last = P + "joint_blocks.23.context_block.adaLN_modulation.1.weight"
    assert sd3[ctx7][0] == 6 * h and sd3[last][0] == 2 * h
    assert m["transformer.transformer_blocks.7.norm1_context.linear"] == Target(ctx7)
    assert m["transformer.transformer_blocks.23.norm1_context.linear"] == Target(last, None, swap=True)
    assert m["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"] == Target(last)
    assert m["transformer.norm_out.linear"] == Target(P + "final_layer.adaLN_modulation.1.weight", None, swap=True)
    assert m["lora_te2_text_model_encoder_layers_0_mlp_fc1"].key.startswith("text_encoders.clip_g.")
    assert m["lora_te3_encoder_block_0_layer_0_SelfAttention_o"].key.startswith("text_encoders.t5xxl.")
    assert not any(t.key.startswith(("first_stage_model.", "model.model_sampling")) for t in m.values())


def test_mmdit_x_attn2_and_unknown_modules():
    h = 16
    shapes = {P + "joint_blocks.0.x_block.attn2.qkv.weight": (3 * h, h), P + "joint_blocks.0.x_block.attn2.proj.weight": (h, h),
              P + "distilled_guidance_layer.in_proj.weight": (h, 8)}
    names = {n.name: n for n in module_names(shapes, "sd3.5-medium")}
    assert names["transformer.transformer_blocks.0.attn2.to_v"].target == Target(P + "joint_blocks.0.x_block.attn2.qkv.weight", (2 * h, 3 * h))
    assert names["lora_unet_joint_blocks_0_x_block_attn2_proj"].target == names["transformer.transformer_blocks.0.attn2.to_out.0"].target
    other = names["lora_unet_distilled_guidance_layer_in_proj"]  # not in the table: named, never extracted
    assert other.group == "unet_other" and not any(n.startswith("transformer.distilled") for n in names)
    assert all(m.target.key != other.target.key for m in extraction_targets(shapes, "sd3.5-medium", conv=True))


@pytest.mark.parametrize("arch, layout", [("flux-dev", "flux-flux"), ("sd3-medium", "sd3-comfyui"),
                                          ("sd1", "sd1-ldm"), ("sdxl", "sdxl-sgm")])
def test_no_name_targets_two_places_and_one_name_is_written_per_target(arch, layout):
    names = module_names(shapes_of(layout), arch)
    targets = defaultdict(set)
    for m in names:
        targets[m.name].add(m.target)
    assert all(len(t) == 1 for t in targets.values())
    written = [m for m in names if m.preferred]
    assert len({m.target for m in written}) == len(written)
    assert all(m.style == "kohya" and "." not in m.name for m in written)


def test_extraction_writes_kohya_names_of_the_blocks_and_text_encoders(flux):
    names = {m.name for m in extraction_targets(flux, "flux-dev", conv=True)}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_37_linear1" in names
    assert "lora_unet_double_blocks_18_txt_mod_lin" in names and "lora_unet_single_blocks_0_modulation_lin" in names
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc2" in names and "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo" in names
    assert not names & {"lora_unet_img_in", "lora_unet_final_layer_linear", "lora_unet_time_in_in_layer"}  # as kohya trains
    assert len(names) == 19 * 10 + 38 * 3 + 12 * 6 + 24 * 7


def test_schnell_and_sd35_take_their_names_from_the_file_they_extend():
    assert lora_spec("flux-schnell")["diffusion_model"] == lora_spec("flux-dev")["diffusion_model"]
    assert lora_spec("sd3.5-large")["text_encoders"] == lora_spec("sd3-medium")["text_encoders"]
    assert lora_spec("flux-schnell")["inspect"]["like"] == "flux-dev"


def test_swapped_modules_bake_the_halves_back_in_place():
    """A module that sees [scale; shift] adds its update to BFL's [shift; scale] rows: the same as
    swapping the up matrix's rows, never the down's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, generator=g, dtype=torch.float64)
    up, down = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    out = lf.bake(w, up, down, torch.tensor(1.0), modules=[{"format": "lora", "multiplier": 0.5, "swap": True,
                                                            "tensors": {"lora_up": 0, "lora_down": 1, "alpha": 2}}])
    swapped_up = torch.cat([up[4:], up[:4]])
    want = w + 0.5 * (1.0 / 2) * (swapped_up @ down)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, w + 0.25 * (up @ down))  # the rows did move


def test_flux_block_weights_are_the_61_blocks():
    flux, sd3 = architectures()["flux-dev"], architectures()["sd3-medium"]
    t = lbw_table([float(i) for i in range(61)], flux)
    assert (t["CLIP"], t["T5"], t["IN"], t["D00"], t["D18"], t["S00"], t["S37"], t["OUT"]) == (0, 1, 2, 3, 21, 22, 59, 60)
    with pytest.raises(ValueError, match=r"flux-dev takes 61 values, got 17"):  # no padding (docs/lora.md)
        lbw_table([1.0] * 17, flux)
    assert lbw_table([0.5] * len(sd3.blocks), sd3)["J23"] == 0.5
