"""LoRA / LyCORIS through the real CLI on fabricated SD1, SD2, SDXL and Llama-shaped models: bake-in
against dW computed here (float64), exact and SVD merges, extraction, recomputation, errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from mergebuild.testing.fabricate import layout_keys, llama_keys, make_base
from mergebuild.testing.lora import lora_modules, make_lora, save_lora
from tests.conftest import build_json, load, mergefile, run_cli, write_model

D = "model.diffusion_model."
Q1 = D + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
PROJ_IN = D + "input_blocks.1.1.proj_in.weight"  # a 1x1 conv in SD1
CONV = D + "input_blocks.1.0.in_layers.2.weight"  # a 3x3 conv
TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


# dW written out here, independently of mergebuild.methods.lora_formats ---------------------------

def _d(t):
    return t.double()


def expected_delta(lora: dict, module: str, shape) -> torch.Tensor:
    """The scaled update of one module, float64, in the target's shape."""
    t = {k[len(module) + 1:]: _d(v) for k, v in lora.items() if k.startswith(module + ".")}
    alpha = t.get("alpha")
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return d.reshape(shape) * (alpha.item() / r)
    if "lokr_w1" in t:
        w1, r = t["lokr_w1"], t["lokr_w2_b"].shape[0]
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
        w1 = w1.reshape(*w1.shape, *([1] * (len(shape) - 2)))
        return torch.kron(w1, w2) * (alpha.item() / r)
    up = t.get("lora_up.weight", t.get("lora_B.weight"))
    down = t.get("lora_down.weight", t.get("lora_A.weight"))
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r)
    if "lora_mid.weight" in t:  # dW[o,i] = sum_nm up[o,n] mid[n,m] down[m,i]
        d = torch.einsum("on,nmkl,mi->oikl", up2, t["lora_mid.weight"], down.reshape(r, -1))
    else:
        d = (up2 @ down.reshape(r, -1)).reshape(shape)
    return d * (alpha.item() / r if alpha is not None else 1.0)


def expected_bake(base: dict, lora: dict, arch: str, fmt: str, m: float = 1.0, targets=None) -> dict:
    out = {k: _d(v).clone() for k, v in base.items()}
    for module, key, rows in lora_modules(base, arch, fmt, targets):
        w = _d(base[key])[rows[0]:rows[1]] if rows else _d(base[key])
        d = expected_delta(lora, module, w.shape)
        if fmt == "dora":  # (W + dW) * m / column norm of (W + dW)
            merged = w + d
            dims = [0, *range(2, w.dim())]
            w2 = merged * _d(lora[module + ".dora_scale"]) / merged.pow(2).sum(dim=dims, keepdim=True).sqrt()
            d = w2 - w
        (out[key][rows[0]:rows[1]] if rows else out[key]).add_(m * d)
    return out


def assert_model(got: dict, want: dict, tol=1e-5):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=tol, atol=tol, msg=k)


# fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    base = make_base(layout_keys("sd1-ldm", 32, components={"clip_l", "diffuser"}), seed=0, dtype=torch.float32)
    path = write_model(tmp_path_factory.mktemp("sd1") / "base.safetensors", base)
    return base, path


def project(tmp_path, text: str, **loras) -> None:
    for name, tensors in loras.items():
        save_lora(tmp_path / f"{name}.safetensors", tensors)
    mergefile(tmp_path / "mergefile.toml", text)


def bake_l(extra: str = "") -> str:
    """A merge m baking LoRA l into base."""
    return f'[merges.m]\nmethod = "lora"\ninputs = ["base", "l"]\n{extra}output = "m.safetensors"\n'


def models(base_path, *names) -> str:
    text = f'[models.base]\npath = "{base_path}"\n'
    return text + "".join(f'[models.{n}]\npath = "{n}.safetensors"\n' for n in names)


# bake-in ------------------------------------------------------------------------------------------

# linear, 1x1 and 3x3 layers of the UNet, the text encoder's first layer
SOME = r"input_blocks\.[14]\.|middle_block\.1\.|output_blocks\.(2|11)\.|encoder\.layers\.0\."
SD1_FORMATS = {"lora": {}, "locon": {}, "cp": {"cp": True}, "loha": {}, "lokr": {}, "dora": {}}


def test_bake_every_format_into_sd1(sd1, tmp_path):
    base, path = sd1
    loras = {name: make_lora(base, "sd1", 4, "locon" if name == "cp" else name, targets=SOME, seed=i, **kw)
             for i, (name, kw) in enumerate(SD1_FORMATS.items())}
    merges = "".join(f'[merges.b_{n}]\nmethod = "lora"\ninputs = ["base", "{n}"]\nstrength = 0.8\n'
                     f'output = "b_{n}.safetensors"\n' for n in loras)
    project(tmp_path, models(path, *loras) + merges, **loras)
    proc = run_cli(cwd=tmp_path, check=True)
    modules = lora_modules(base, "sd1", "locon", SOME)
    kxk = sum(1 for _, key, _ in modules if base[key].dim() == 4 and base[key].shape[2] > 1)
    assert 0 < kxk < len(modules)
    assert f"b_locon: locon: applied {len(modules)} LoRA modules (LoCon {kxk}, LoRA {len(modules) - kxk})" in proc.stderr
    assert f"b_cp: cp: applied {len(modules)} LoRA modules (LoCon-CP {kxk}, LoRA {len(modules) - kxk})" in proc.stderr
    # the names of the modules are kohya's Diffusers names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in loras["lora"]
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in loras["locon"]
    for name, lora in loras.items():
        fmt = "locon" if name == "cp" else name
        out = load(tmp_path / f"b_{name}.safetensors")
        assert_model(out, expected_bake(base, lora, "sd1", fmt, 0.8, SOME))
        for key in (Q1, PROJ_IN, TE_Q, CONV):
            assert not torch.equal(out[key], base[key]), (name, key)  # linear, 1x1 and 3x3 all changed


def test_strength_unet_te_block_weights_and_block_tables(sd1, tmp_path):
    base, path = sd1
    lora = make_lora(base, "sd1", 4, "lora", seed=7)
    lbw = [0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6]
    text = models(path, "l") + f"""
[merges.lbw]
method = "lora"
inputs = ["base", "l"]
block_weights = {lbw}
output = "lbw.safetensors"
[merges.split]
method = "lora"
inputs = ["base", "l"]
unet = 0.5
te = 2.0
strengths = [0.5]
output = "split.safetensors"
[merges.table]
method = "lora"
inputs = ["base", "l"]
strength = {{ default = 1.0, M00 = 0.0 }}
output = "table.safetensors"
"""
    project(tmp_path, text, l=lora)
    run_cli(cwd=tmp_path, check=True)
    full = expected_bake(base, lora, "sd1", "lora")

    def scaled(key, m):
        return _d(base[key]) + m * (full[key] - _d(base[key]))

    got = load(tmp_path / "lbw.safetensors")
    mid = D + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    out11 = D + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    for key, m in ((TE_Q, 0.5), (Q1, 0.9), (mid, 0.3), (out11, -0.6)):  # BASE, IN01, M00, OUT11
        torch.testing.assert_close(got[key].double(), scaled(key, m), msg=key)
    got = load(tmp_path / "split.safetensors")
    torch.testing.assert_close(got[Q1].double(), scaled(Q1, 0.25))
    torch.testing.assert_close(got[TE_Q].double(), scaled(TE_Q, 1.0))
    got = load(tmp_path / "table.safetensors")
    assert torch.equal(got[mid], base[mid]) and not torch.equal(got[Q1], base[Q1])


def test_strength_change_recomputes_only_the_targeted_keys(sd1, tmp_path):
    base, path = sd1
    lora = make_lora(base, "sd1", 4, "lora", targets="attn2", seed=3)
    targeted = {key for _, key, _ in lora_modules(base, "sd1", "lora", "attn2")}
    assert 0 < len(targeted) < len(base) // 4
    project(tmp_path, models(path, "l") + bake_l("strength = 1.0\n"), l=lora)
    first = build_json(cwd=tmp_path)["merges"]["m"]
    assert first["computed"] == len(targeted) and first["tensors"] == len(base)
    mergefile(tmp_path / "mergefile.toml", models(path, "l") + bake_l("strength = 0.5\n"))
    again = build_json(cwd=tmp_path)["merges"]["m"]
    assert again["computed"] == len(targeted)
    assert_model(load(tmp_path / "m.safetensors"), expected_bake(base, lora, "sd1", "lora", 0.5, "attn2"))


def test_unmatched_modules_are_an_error_or_with_allow_unmatched_a_warning(sd1, tmp_path):
    base, path = sd1
    lora = make_lora(base, "sd1", 2, "lora", targets="attn2", seed=4)
    lora["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.ones(4, 2)
    lora["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.ones(2, 4)
    lora["lora_unet_x.diff"] = torch.ones(3)
    text = models(path, "l") + bake_l()
    project(tmp_path, text, l=lora)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "[merges.m]" in proc.stderr and "lora_unet_down_blocks_9_attentions_0_proj_in" in proc.stderr
    assert "lora_unet_x.diff" in proc.stderr and "allow_unmatched" in proc.stderr
    assert not (tmp_path / "m.safetensors").exists()
    mergefile(tmp_path / "mergefile.toml", text + "allow_unmatched = true\n")
    proc = run_cli(cwd=tmp_path, check=True)
    assert "warning" in proc.stderr and "lora_unet_down_blocks_9_attentions_0_proj_in" in proc.stderr
    assert_model(load(tmp_path / "m.safetensors"), expected_bake(base, lora, "sd1", "lora", 1.0, "attn2"))


def test_sdxl_sgm_names_te1_and_te2_fused_slices(tmp_path):
    base = make_base(layout_keys("sdxl-sgm", 32, components={"clip_l", "clip_g", "diffuser"}), seed=1,
                     dtype=torch.float32)
    path = write_model(tmp_path / "base.safetensors", base)
    targets = r"input_blocks\.4\.|output_blocks\.0\.0\.|embedders\.0\..*layers\.0\.|resblocks\.[01]\."
    lora = make_lora(base, "sdxl", 4, "locon", targets=targets, seed=2)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in lora
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in lora
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in lora
    project(tmp_path, models(path, "l") + bake_l("strength = 0.6\n"), l=lora)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")
    assert_model(out, expected_bake(base, lora, "sdxl", "locon", 0.6, targets))
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    d = out[fused].double() - base[fused].double()
    third = base[fused].shape[0] // 3
    v = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
    want = 0.6 * expected_delta(lora, v, (third, base[fused].shape[1]))
    torch.testing.assert_close(d[2 * third:], want, rtol=1e-5, atol=1e-5)


def test_sd2_openclip_q_k_v_slices(tmp_path):
    p = "cond_stage_model.model.transformer.resblocks.0."
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g) for k, s in {
        p + "attn.in_proj_weight": (24, 8), p + "attn.out_proj.weight": (8, 8), p + "mlp.c_fc.weight": (32, 8),
        p + "mlp.c_proj.weight": (8, 32), D + "input_blocks.11.0.in_layers.0.weight": (8,),
        D + "input_blocks.1.1.proj_in.weight": (8, 8, 1, 1)}.items()}
    path = write_model(tmp_path / "base.safetensors", base)
    lora = make_lora(base, "sd2", 2, "lora", seed=6)
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in lora
    project(tmp_path, models(path, "l") + bake_l(), l=lora)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")
    assert_model(out, expected_bake(base, lora, "sd2", "lora"))
    d = out[p + "attn.in_proj_weight"].double() - base[p + "attn.in_proj_weight"].double()
    for i, part in enumerate(("q", "k", "v")):  # PyTorch MHA order: rows q, then k, then v
        want = expected_delta(lora, f"lora_te_text_model_encoder_layers_0_self_attn_{part}_proj", (8, 8))
        torch.testing.assert_close(d[8 * i:8 * (i + 1)], want, rtol=1e-5, atol=1e-5)


# merging and extracting ------------------------------------------------------------------------------

def test_lora_merge_concat_is_exact_and_svd_at_full_rank_too(sd1, tmp_path):
    base, path = sd1
    l1 = make_lora(base, "sd1", 4, "lora", targets=r"input_blocks\.[12]\.1\.|layers\.0\.", seed=8)
    l2 = make_lora(base, "sd1", 4, "locon", targets=r"input_blocks\.1\.|layers\.[01]\.", seed=9, cp=True)
    text = models(path, "l1", "l2") + """
[merges.m]
method = "lora_merge"
inputs = ["l1", "l2"]
strengths = [0.7, -0.4]
output = "m.safetensors"
[merges.s]
method = "lora_merge"
inputs = ["l1", "l2"]
strengths = [0.7, -0.4]
mode = "svd"
rank = 8
output = "s.safetensors"
[merges.b_m]
method = "lora"
inputs = ["base", "m"]
output = "b_m.safetensors"
[merges.b_s]
method = "lora"
inputs = ["base", "s"]
output = "b_s.safetensors"
[merges.b1]
method = "lora"
inputs = ["base", "l1"]
strength = 0.7
output = "b1.safetensors"
[merges.b2]
method = "lora"
inputs = ["base", "l2"]
strength = -0.4
output = "b2.safetensors"
"""
    project(tmp_path, text, l1=l1, l2=l2)
    run_cli(cwd=tmp_path, check=True)
    b1, b2 = load(tmp_path / "b1.safetensors"), load(tmp_path / "b2.safetensors")
    both = {k: b1[k].double() + b2[k].double() - base[k].double() for k in base}
    assert_model(load(tmp_path / "b_m.safetensors"), both)
    assert_model(load(tmp_path / "b_s.safetensors"), both, 1e-4)
    m = load(tmp_path / "m.safetensors")
    shared = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert m[shared + ".lora_up.weight"].shape[1] == 8 and m[shared + ".alpha"].item() == 8  # ranks 4 + 4
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # CP in l2 only: folded into a 3x3 down
    assert m[conv + ".lora_down.weight"].shape[2:] == (3, 3) and conv + ".lora_mid.weight" not in m
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"


def test_extract_then_bake_gives_back_the_tuned_model(sd1, tmp_path):
    base, path = sd1
    g = torch.Generator().manual_seed(11)
    tuned = dict(base)
    for key in (Q1, PROJ_IN, CONV, TE_Q):  # exact low-rank changes: rank 2 (3 for the 3x3 conv)
        w = base[key]
        r = 3 if w.dim() == 4 and w.shape[2] == 3 else 2
        low = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, math.prod(w.shape[1:]), generator=g)
        tuned[key] = w + 0.05 * low.reshape(w.shape)
    write_model(tmp_path / "tuned.safetensors", tuned)
    text = models(path) + """[models.tuned]
path = "tuned.safetensors"
[merges.x]
method = "lora_extract"
inputs = ["tuned", "base"]
rank = 4
output = "x.safetensors"
[merges.back]
method = "lora"
inputs = ["base", "x"]
output = "back.safetensors"
"""
    project(tmp_path, text)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "x: extracted 4 LoRA modules" in proc.stderr
    x = load(tmp_path / "x.safetensors")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in x}
    assert names == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1",
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    assert x["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    assert all(x[n + ".alpha"].item() == 4 for n in names)
    assert_model(load(tmp_path / "back.safetensors"), {k: v.double() for k, v in tuned.items()}, 1e-5)


def test_llama_peft_bake_and_extract(tmp_path):
    base = make_base(llama_keys(layers=2), seed=2, dtype=torch.float32)
    path = write_model(tmp_path / "base.safetensors", base)
    lora = make_lora(base, "generic", 4, "peft", targets=r"self_attn\.(q|v)_proj", seed=3)
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight" in lora
    g = torch.Generator().manual_seed(4)
    tuned = dict(base)
    key = "model.layers.0.mlp.down_proj.weight"
    out, inn = base[key].shape
    tuned[key] = base[key] + torch.randn(out, 2, generator=g) @ torch.randn(2, inn, generator=g)
    write_model(tmp_path / "tuned.safetensors", tuned)
    text = models(path, "l") + """[models.tuned]
path = "tuned.safetensors"
[merges.b]
method = "lora"
inputs = ["base", "l"]
strength = 1.5
output = "b.safetensors"
[merges.x]
method = "lora_extract"
inputs = ["tuned", "base"]
rank = 2
output = "x.safetensors"
[merges.back]
method = "lora"
inputs = ["base", "x"]
output = "back.safetensors"
"""
    project(tmp_path, text, l=lora)
    run_cli(cwd=tmp_path, check=True)
    want = expected_bake(base, lora, "generic", "peft", 1.5, r"self_attn\.(q|v)_proj")
    assert_model(load(tmp_path / "b.safetensors"), want)
    x = load(tmp_path / "x.safetensors")
    assert set(x) == {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
                      "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"}
    assert_model(load(tmp_path / "back.safetensors"), {k: v.double() for k, v in tuned.items()}, 1e-4)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")


def test_lineage_records_the_lora_file_hashes_and_strengths(sd1, tmp_path):
    import hashlib
    import json

    base, base_path = sd1
    project(tmp_path, models(base_path, "l") + bake_l("strength = 0.7\n"), l=make_lora(base, "sd1", targets=SOME))
    run_cli(cwd=tmp_path, check=True)
    tree = json.loads(run_cli("lineage", tmp_path / "m.safetensors", "--json", cwd=tmp_path, check=True).stdout)
    merge = tree["made_by"]
    assert merge["method"] == "lora" and merge["params"] == {"strength": 0.7}
    lora_node = merge["inputs"][1]
    raw = (tmp_path / "l.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert lora_node["file"] == "l.safetensors"
    assert lora_node["sha256"] == hashlib.sha256(raw).hexdigest() and lora_node["autov2"] == lora_node["sha256"][:10]
    assert lora_node["addnet_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
