"""LoRA / LyCORIS math (mergebuild.methods.lora_formats) against explicit float64 computations,
and the checkpoint key -> LoRA module name map (mergebuild.layouts.lora_names)."""

from __future__ import annotations

import pytest
import torch

from mergebuild.layouts.lora_names import Target, extraction_targets, lora_map
from mergebuild.methods import lora_formats as lf

G = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(shape, generator=G, dtype=torch.float64)


def bake(w, tensors: dict, fmt="lora", m=1.0, rows=None):
    """Call lf.bake with one module whose tensors are `tensors` (role -> tensor), in float32."""
    roles = sorted(tensors)
    module = {"format": fmt, "tensors": {r: j for j, r in enumerate(roles)}, "multiplier": m, "rows": rows}
    out = lf.bake(w.float(), *(tensors[r].float() for r in roles), modules=[module])
    assert out.dtype == torch.float32
    return out.double()


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def test_linear_lora_is_w_plus_m_alpha_over_r_up_down():
    w, up, down = rnd(6, 5), rnd(6, 3), rnd(3, 5)
    expected = w + 0.7 * (1.5 / 3) * up @ down
    close(bake(w, {"lora_up": up, "lora_down": down, "alpha": torch.tensor(1.5)}, m=0.7), expected)


def test_alpha_missing_means_scale_one_zero_means_zero_and_scale_overrides():
    w, up, down = rnd(4, 4), rnd(4, 2), rnd(2, 4)
    close(bake(w, {"lora_up": up, "lora_down": down}), w + up @ down)
    close(bake(w, {"lora_up": up, "lora_down": down, "alpha": torch.tensor(0.0)}), w)
    close(bake(w, {"lora_up": up, "lora_down": down, "alpha": torch.tensor(2.0), "scale": torch.tensor(0.25)}),
          w + 0.25 * up @ down)


def test_conv_1x1():
    w, up, down = rnd(6, 4, 1, 1), rnd(6, 2, 1, 1), rnd(2, 4, 1, 1)
    expected = w + (1.0 / 2) * (up[:, :, 0, 0] @ down[:, :, 0, 0]).reshape(6, 4, 1, 1)
    close(bake(w, {"lora_up": up, "lora_down": down, "alpha": torch.tensor(1.0)}), expected)


def test_conv_3x3_locon_sums_over_the_rank():
    w, up, down = rnd(5, 4, 3, 3), rnd(5, 2, 1, 1), rnd(2, 4, 3, 3)
    delta = torch.zeros(5, 4, 3, 3, dtype=torch.float64)
    for o in range(5):
        for i in range(4):
            for r in range(2):
                delta[o, i] += up[o, r, 0, 0] * down[r, i]
    close(bake(w, {"lora_up": up, "lora_down": down, "alpha": torch.tensor(3.0)}, m=-0.5), w - 0.5 * 1.5 * delta)


def test_cp_mid():
    w, up, mid, down = rnd(5, 4, 3, 3), rnd(5, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
    delta = torch.zeros(5, 4, 3, 3, dtype=torch.float64)
    for o in range(5):
        for i in range(4):
            for n in range(2):
                for m in range(2):
                    delta[o, i] += up[o, n, 0, 0] * mid[n, m] * down[m, i, 0, 0]
    t = {"lora_up": up, "lora_mid": mid, "lora_down": down, "alpha": torch.tensor(1.0)}
    close(bake(w, t), w + 0.5 * delta)


def test_loha_linear_and_conv():
    w1a, w1b, w2a, w2b = rnd(6, 2), rnd(2, 5), rnd(6, 2), rnd(2, 5)
    w = rnd(6, 5)
    t = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.0)}
    close(bake(w, t, "loha"), w + (w1a @ w1b) * (w2a @ w2b) * 0.5)
    wc = rnd(6, 4, 3, 3)
    w1b, w2b = rnd(2, 36), rnd(2, 36)
    t.update(hada_w1_b=w1b, hada_w2_b=w2b)
    close(bake(wc, t, "loha", m=2.0), wc + 2.0 * 0.5 * ((w1a @ w1b) * (w2a @ w2b)).reshape(6, 4, 3, 3))


def test_loha_tucker():
    w = rnd(5, 4, 3, 3)
    t1, t2, w1a, w1b, w2a, w2b = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3), rnd(2, 5), rnd(2, 4), rnd(2, 5), rnd(2, 4)

    def rebuild(t, a, b):
        out = torch.zeros(5, 4, 3, 3, dtype=torch.float64)
        for o in range(5):
            for i in range(4):
                for x in range(2):
                    for y in range(2):
                        out[o, i] += t[x, y] * a[x, o] * b[y, i]
        return out

    tensors = {"hada_t1": t1, "hada_t2": t2, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a,
               "hada_w2_b": w2b, "alpha": torch.tensor(4.0)}
    close(bake(w, tensors, "loha"), w + 2.0 * rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b))


def test_lokr_kron_scales():
    w = rnd(6, 8)
    w1, w2a, w2b = rnd(2, 2), rnd(3, 2), rnd(2, 4)
    t = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    close(bake(w, t, "lokr"), w + torch.kron(w1, w2a @ w2b) * 0.5)  # r = w2_b.shape[0] = 2
    full = {"lokr_w1": w1, "lokr_w2": rnd(3, 4), "alpha": torch.tensor(1.0)}
    close(bake(w, full, "lokr"), w + torch.kron(w1, full["lokr_w2"]))  # both full: scale 1


def test_lokr_conv_elementwise():
    w, w1, w2 = rnd(6, 4, 3, 3), rnd(2, 2), rnd(3, 2, 3, 3)
    delta = torch.zeros_like(w)
    for i in range(2):
        for j in range(2):
            for p in range(3):
                for q in range(2):
                    delta[i * 3 + p, j * 2 + q] = w1[i, j] * w2[p, q]
    close(bake(w, {"lokr_w1": w1, "lokr_w2": w2}, "lokr"), w + delta)


def test_dora_column_norm_and_multiplier():
    w, up, down = rnd(6, 5), rnd(6, 2), rnd(2, 5)
    mag = rnd(1, 5).abs() + 0.5
    merged = w + 1.0 * up @ down  # alpha 2 / r 2
    col = torch.sqrt((merged ** 2).sum(dim=0, keepdim=True))
    w2 = merged * mag / col
    t = {"lora_up": up, "lora_down": down, "alpha": torch.tensor(2.0), "dora_scale": mag}
    close(bake(w, t), w2)
    close(bake(w, t, m=0.3), w + 0.3 * (w2 - w))
    # PEFT's magnitude vector [out]: a norm per output row
    rowmag = rnd(6).abs() + 0.5
    row = torch.sqrt((merged ** 2).sum(dim=1, keepdim=True))
    t["dora_scale"] = rowmag
    close(bake(w, t), merged * rowmag[:, None] / row)


def test_dora_conv_column_norm():
    w, up, down, mag = rnd(5, 4, 3, 3), rnd(5, 2, 1, 1), rnd(2, 4, 3, 3), rnd(1, 4, 1, 1).abs() + 0.5
    merged = w + 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    norm = torch.sqrt((merged ** 2).sum(dim=(0, 2, 3), keepdim=True))
    t = {"lora_up": up, "lora_down": down, "alpha": torch.tensor(1.0), "dora_scale": mag}
    close(bake(w, t), merged * mag / norm)


def test_row_slices_touch_only_their_rows():
    w, up, down = rnd(12, 4), rnd(4, 2), rnd(2, 4)
    out = bake(w, {"lora_up": up, "lora_down": down}, rows=[4, 8])
    expected = w.clone()
    expected[4:8] += up @ down
    close(out, expected)


def test_modules_of_several_loras_add_up():
    w, up1, down1, up2, down2 = rnd(4, 4), rnd(4, 1), rnd(1, 4), rnd(4, 2), rnd(2, 4)
    mods = [{"format": "lora", "tensors": {"lora_up": 0, "lora_down": 1}, "multiplier": 0.5},
            {"format": "lora", "tensors": {"lora_up": 2, "lora_down": 3}, "multiplier": -1.0}]
    out = lf.bake(w.float(), up1.float(), down1.float(), up2.float(), down2.float(), modules=mods)
    close(out, w + 0.5 * up1 @ down1 - up2 @ down2)


def test_concat_reproduces_the_weighted_sum_and_svd_truncates():
    up1, down1, up2, down2 = rnd(6, 2), rnd(2, 5), rnd(6, 3), rnd(3, 5)
    ts = [up1.float(), down1.float(), torch.tensor(1.0), up2.float(), down2.float()]
    mods = [{"tensors": {"lora_up": 0, "lora_down": 1, "alpha": 2}, "multiplier": 0.7, "rank": 2},
            {"tensors": {"lora_up": 3, "lora_down": 4}, "multiplier": -0.4, "rank": 3}]
    up = lf.concat_up(*ts, modules=mods, shape=[6, 5])
    down = lf.concat_down(*ts, modules=mods, shape=[5, 5])
    target = 0.7 * 0.5 * up1 @ down1 - 0.4 * up2 @ down2
    close(up.double() @ down.double(), target)
    for rank in (5, 6):  # the sum has rank 5: truncating at 5 or more is exact
        u = lf.svd_part(*ts, part="up", modules=mods, shape=[6, min(rank, 5)], rank=rank)
        d = lf.svd_part(*ts, part="down", modules=mods, shape=[min(rank, 5), 5], rank=rank)
        close(u.double() @ d.double(), target, 1e-4)
    u = lf.svd_part(*ts, part="up", modules=mods, shape=[6, 2], rank=2)
    d = lf.svd_part(*ts, part="down", modules=mods, shape=[2, 5], rank=2)
    s = torch.linalg.svdvals(target)
    assert abs(torch.linalg.matrix_norm(u.double() @ d.double() - target) - s[2:].norm()) < 1e-4  # Eckart-Young


def test_extract_part_rows():
    base, low = rnd(12, 6), rnd(12, 2) @ rnd(2, 6)
    tuned = base + low
    u = lf.extract_part(tuned.float(), base.float(), part="up", shape=[4, 2], rank=2, rows=[8, 12])
    d = lf.extract_part(tuned.float(), base.float(), part="down", shape=[2, 6], rank=2, rows=[8, 12])
    close(u.double() @ d.double(), low[8:12], 1e-4)


def test_split_key_and_format():
    assert lf.split_key("lora_unet_a_b.lora_up.weight") == ("lora_unet_a_b", "lora_up")
    assert lf.split_key("base_model.model.x.q_proj.lora_A.weight") == ("base_model.model.x.q_proj", "lora_down")
    assert lf.split_key("m.hada_w1_a") == ("m", "hada_w1_a")
    assert lf.split_key("m.diff") is None
    assert lf.module_format({"lora_up", "lora_down", "alpha"}) == "lora"
    assert lf.module_format({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}) == "lokr"
    assert lf.module_format({"lokr_w1", "lokr_w2_a"}) is None
    assert lf.module_format({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}) == "loha"
    assert lf.module_format({"lora_up", "alpha"}) is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="values"):
        lf.delta("lora", {"lora_up": torch.ones(3, 2), "lora_down": torch.ones(2, 5)}, (4, 5))


# key -> module names ----------------------------------------------------------------------------

SD1 = {
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (16, 8),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
    "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": (16, 8, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (16, 8, 1, 1),
    "model.diffusion_model.input_blocks.4.0.emb_layers.1.weight": (16, 16),
    "model.diffusion_model.input_blocks.6.0.op.weight": (16, 16, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (64, 16),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (16, 16, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (16, 16, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (16, 16, 3, 3),
    "model.diffusion_model.output_blocks.7.1.transformer_blocks.0.attn2.to_out.0.weight": (8, 8),
    "model.diffusion_model.out.2.weight": (4, 8, 3, 3),
    "model.diffusion_model.input_blocks.1.1.norm.weight": (8,),
    "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight": (8, 8),
    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight": (8, 32),
}
D = "model.diffusion_model."


def test_sd1_names_follow_the_ldm_diffusers_rules():
    m = lora_map(SD1, "sd1")
    expected = {
        "lora_unet_conv_in": D + "input_blocks.0.0.weight",
        "lora_unet_time_embedding_linear_1": D + "time_embed.0.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            D + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in": D + "input_blocks.1.1.proj_in.weight",
        "lora_unet_down_blocks_1_resnets_0_conv1": D + "input_blocks.4.0.in_layers.2.weight",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": D + "input_blocks.4.0.skip_connection.weight",
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj": D + "input_blocks.4.0.emb_layers.1.weight",
        "lora_unet_down_blocks_1_downsamplers_0_conv": D + "input_blocks.6.0.op.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
            D + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "lora_unet_mid_block_resnets_1_conv2": D + "middle_block.2.out_layers.3.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": D + "output_blocks.2.1.conv.weight",
        "lora_unet_up_blocks_1_upsamplers_0_conv": D + "output_blocks.5.2.conv.weight",
        "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0":
            D + "output_blocks.7.1.transformer_blocks.0.attn2.to_out.0.weight",
        "lora_unet_conv_out": D + "out.2.weight",
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight",
        "lora_te_text_model_encoder_layers_3_mlp_fc2":
            "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight",
        # LDM-named kohya modules and Diffusers-PEFT names also match
        "lora_unet_input_blocks_1_1_proj_in": D + "input_blocks.1.1.proj_in.weight",
        "unet.down_blocks.0.attentions.0.proj_in": D + "input_blocks.1.1.proj_in.weight",
    }
    for name, key in expected.items():
        assert m.get(name) == Target(key), name
    assert not any(t.key.endswith("norm.weight") for t in m.values())  # 1-D weights: no module


def test_sd1_extraction_targets_attention_and_te_then_resnets_with_conv():
    plain = {t.target.key for t in extraction_targets(SD1, "sd1", conv=False)}
    assert D + "input_blocks.1.1.proj_in.weight" in plain
    assert D + "input_blocks.4.0.in_layers.2.weight" not in plain
    conv = {t.target.key for t in extraction_targets(SD1, "sd1", conv=True)}
    assert {D + "input_blocks.4.0.in_layers.2.weight", D + "output_blocks.2.1.conv.weight"} <= conv
    assert D + "input_blocks.0.0.weight" not in conv and D + "time_embed.0.weight" not in conv
    names = {t.name for t in extraction_targets(SD1, "sd1", conv=True)}
    assert "lora_unet_down_blocks_1_resnets_0_conv1" in names  # kohya writes Diffusers names for SD1


def test_sd2_fused_qkv_are_row_slices_in_q_k_v_order():
    key = "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"
    shapes = {key: (48, 16), "cond_stage_model.model.transformer.resblocks.5.attn.out_proj.weight": (16, 16),
              "cond_stage_model.model.transformer.resblocks.5.mlp.c_fc.weight": (64, 16),
              "cond_stage_model.model.transformer.resblocks.5.mlp.c_proj.weight": (16, 64)}
    m = lora_map(shapes, "sd2")
    p = "lora_te_text_model_encoder_layers_5_"
    assert m[p + "self_attn_q_proj"] == Target(key, (0, 16))
    assert m[p + "self_attn_k_proj"] == Target(key, (16, 32))
    assert m[p + "self_attn_v_proj"] == Target(key, (32, 48))
    assert m[p + "self_attn_out_proj"].key.endswith("attn.out_proj.weight")
    assert m[p + "mlp_fc1"].key.endswith("mlp.c_fc.weight")
    assert m[p + "mlp_fc2"].key.endswith("mlp.c_proj.weight")


def test_sdxl_names_are_sgm_and_te1_te2():
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0."
    shapes = {
        D + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 16),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight": (8, 8),
        te2 + "attn.in_proj_weight": (24, 8), te2 + "mlp.c_fc.weight": (32, 8),
    }
    m = lora_map(shapes, "sdxl")
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # kohya's SDXL names
    assert m[sgm] == Target(D + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    assert m["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] == m[sgm]
    assert m["lora_te1_text_model_encoder_layers_0_self_attn_v_proj"].key.startswith("conditioner.embedders.0.")
    assert m["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"] == Target(te2 + "attn.in_proj_weight", (16, 24))
    assert m["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == Target(te2 + "mlp.c_fc.weight")
    preferred = {t.name for t in extraction_targets(shapes, "sdxl", conv=False)}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in preferred


def test_generic_peft_names():
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.embed_tokens.weight": (32, 8),
              "model.norm.weight": (8,), "lm_head.weight": (32, 8)}
    m = lora_map(shapes, "generic")
    assert m["base_model.model.model.layers.0.self_attn.q_proj"] == Target("model.layers.0.self_attn.q_proj.weight")
    assert m["model.layers.0.self_attn.q_proj"] == Target("model.layers.0.self_attn.q_proj.weight")
    # extraction keeps the layers' linear weights, not embeddings or the head
    keys = [t.target.key for t in extraction_targets(shapes, "generic", conv=True)]
    assert keys == ["model.layers.0.self_attn.q_proj.weight"]


def test_lora_block_weight_forms():
    from mergebuild.layouts.blocks import architectures
    from mergebuild.methods.lora import lbw_table

    sd1, sdxl = architectures()["sd1"], architectures()["sdxl"]
    t = lbw_table([float(i) for i in range(17)], sd1)
    assert (t["BASE"], t["IN01"], t["IN08"], t["M00"], t["OUT03"], t["OUT11"]) == (0, 1, 6, 7, 8, 16)
    assert t["IN00"] == t["IN03"] == t["OUT02"] == 0.0  # left out of the short form: 0, as LoRA Block Weight
    assert lbw_table(list(range(26)), sd1)["OUT11"] == 25
    t = lbw_table([float(i) for i in range(12)], sdxl)
    assert (t["BASE"], t["IN04"], t["IN08"], t["M00"], t["OUT00"], t["OUT05"], t["OUT08"]) == (0, 1, 4, 5, 6, 11, 0)
    assert lbw_table(list(range(20)), sdxl)["OUT08"] == 19
    with pytest.raises(ValueError, match="17, 26"):
        lbw_table([1.0] * 12, sd1)
    with pytest.raises(ValueError, match="generic"):
        lbw_table([1.0] * 17, architectures()["generic"])
