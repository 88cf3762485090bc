"""Flux and SD3 LoRAs through the real CLI on fabricated, shrunk checkpoints (full, transformer-only
with and without "model.diffusion_model."): kohya and Diffusers namings of the same LoRA bake to
the same bytes, against W + m (alpha/r) up @ down written here in float64 on the right rows; the
adaLN swap; block weights; unmatched modules; merge; extract-then-bake.

The LoRAs are made here, from key names by the rules the trainers follow (kohya: the BFL module
path, '.' -> '_'; diffusers: the table below), not by mergebuild's name maps."""

from __future__ import annotations

import math

import pytest
import torch

from mergebuild.testing.fabricate import layout_keys, make_base
from tests.conftest import load, mergefile, run_cli, write_model

P = "model.diffusion_model."
CLIP = "text_encoders.clip_l.transformer."
T5 = "text_encoders.t5xxl.transformer."
RANK, ALPHA = 4, 2.0  # alpha / r = 0.5: a power of two, so folding it into up changes no bit

# BFL module (without prefix) -> its Diffusers modules and their relative heights
FLUX_DIFFUSERS = {
    "double_blocks.0.img_attn.qkv": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                      "transformer_blocks.0.attn.to_v"], [1, 1, 1]),
    "double_blocks.0.txt_attn.qkv": (["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                      "transformer_blocks.0.attn.add_v_proj"], [1, 1, 1]),
    "double_blocks.0.img_mod.lin": (["transformer_blocks.0.norm1.linear"], [1]),
    "double_blocks.0.img_mlp.2": (["transformer_blocks.0.ff.net.2"], [1]),
    "double_blocks.0.txt_attn.proj": (["transformer_blocks.0.attn.to_add_out"], [1]),
    "single_blocks.1.linear1": (["single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
                                 "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp"], [1, 1, 1, 4]),
    "single_blocks.1.linear2": (["single_transformer_blocks.1.proj_out"], [1]),
    "single_blocks.1.modulation.lin": (["single_transformer_blocks.1.norm.linear"], [1]),
    "img_in": (["x_embedder"], [1]),
    "time_in.in_layer": (["time_text_embed.timestep_embedder.linear_1"], [1]),
    "final_layer.linear": (["proj_out"], [1]),
    "final_layer.adaLN_modulation.1": (["norm_out.linear"], "swap"),
}
SD3_DIFFUSERS = {
    "joint_blocks.2.x_block.attn.qkv": (["transformer_blocks.2.attn.to_q", "transformer_blocks.2.attn.to_k",
                                         "transformer_blocks.2.attn.to_v"], [1, 1, 1]),
    "joint_blocks.2.context_block.attn.qkv": (["transformer_blocks.2.attn.add_q_proj", "transformer_blocks.2.attn.add_k_proj",
                                               "transformer_blocks.2.attn.add_v_proj"], [1, 1, 1]),
    "joint_blocks.2.context_block.adaLN_modulation.1": (["transformer_blocks.2.norm1_context.linear"], [1]),
    "joint_blocks.23.context_block.adaLN_modulation.1": (["transformer_blocks.23.norm1_context.linear"], "swap"),
    "joint_blocks.23.x_block.mlp.fc1": (["transformer_blocks.23.ff.net.0.proj"], [1]),
    "y_embedder.mlp.0": (["time_text_embed.text_embedder.linear_1"], [1]),
    "final_layer.adaLN_modulation.1": (["norm_out.linear"], "swap"),
}
TE_DIFFUSERS = {CLIP: "text_encoder.", T5: "text_encoder_2."}
FLUX_TE = [CLIP + "text_model.encoder.layers.0.self_attn.q_proj.weight", CLIP + "text_model.encoder.layers.1.mlp.fc1.weight",
           T5 + "encoder.block.0.layer.0.SelfAttention.q.weight", T5 + "encoder.block.1.layer.1.DenseReluDense.wo.weight"]


# making LoRAs ----------------------------------------------------------------------------------

def module_path(key: str) -> tuple[str, str]:
    """(the part the key is in, its module path): "unet", "clip" or "t5"."""
    for prefix, part in ((CLIP, "clip"), (T5, "t5"), (P, "unet"), ("", "unet")):
        if key.startswith(prefix):
            return part, key[len(prefix):].removesuffix(".weight")
    raise AssertionError(key)


def kohya_name(key: str) -> str:
    part, path = module_path(key)
    return {"unet": "lora_unet_", "clip": "lora_te1_", "t5": "lora_te3_"}[part] + path.replace(".", "_")


def kohya_lora(base: dict, keys, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        rows, cols = base[key].shape[0], math.prod(base[key].shape[1:])
        name = kohya_name(key)
        out[f"{name}.lora_up.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
        out[f"{name}.lora_down.weight"] = torch.randn(RANK, cols, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


def swap(t):
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def as_diffusers(kohya: dict, base: dict, table: dict) -> dict:
    """The same LoRA under Diffusers (PEFT) names: ai-toolkit's conversion of a fused module
    (every part gets the down, the up is split by rows), alpha / r folded into the up."""
    out = {}
    for key in base:
        name = kohya_name(key)
        if f"{name}.alpha" not in kohya:
            continue
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        up = up * (kohya[f"{name}.alpha"].item() / RANK)
        part, path = module_path(key)
        if part != "unet":
            prefix = CLIP if part == "clip" else T5
            pieces = [(TE_DIFFUSERS[prefix] + path, up)]
        else:
            names, split = table[path]
            if split == "swap":
                pieces = [(names[0], swap(up))]
            else:
                unit = up.shape[0] // sum(split)
                bounds = [0, *(unit * sum(split[:i + 1]) for i in range(len(split)))]
                pieces = [(n, up[bounds[i]:bounds[i + 1]]) for i, n in enumerate(names)]
        for module, part_up in pieces:
            out[f"transformer.{module}.lora_B.weight" if part == "unet" else f"{module}.lora_B.weight"] = part_up.clone()
            out[f"transformer.{module}.lora_A.weight" if part == "unet" else f"{module}.lora_A.weight"] = down.clone()
    return out


def expected(base: dict, kohya: dict, m: float = 1.0, factor=lambda key: 1.0) -> dict:
    """W + m * factor(key) * (alpha / r) * up @ down, float64, for the kohya LoRA's modules."""
    out = {k: v.double().clone() for k, v in base.items()}
    for key, w in base.items():
        name = kohya_name(key)
        if f"{name}.alpha" in kohya:
            up, down = kohya[f"{name}.lora_up.weight"].double(), kohya[f"{name}.lora_down.weight"].double()
            out[key] += m * factor(key) * (kohya[f"{name}.alpha"].item() / RANK) * (up @ down).reshape(w.shape)
    return out


def assert_close(got: dict, want: dict, tol=1e-5):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=tol, atol=tol, msg=k)


# the fabricated models ------------------------------------------------------------------------------

def flux_model(variant: str) -> dict:
    """"full" (the transformer, CLIP-L and T5 under their prefixes), "transformer" (the
    transformer alone, prefixed), "bare" (the transformer alone, BFL's own key names)."""
    parts = {"diffuser", "clip_l", "t5xxl"} if variant == "full" else {"diffuser"}
    base = make_base(layout_keys("flux-flux", 32, components=parts), seed=0, dtype=torch.float32)
    return {k.removeprefix(P): v for k, v in base.items()} if variant == "bare" else base


@pytest.fixture(scope="module")
def fluxes(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for variant in ("full", "transformer", "bare"):
        base = flux_model(variant)
        out[variant] = (base, write_model(root / f"{variant}.safetensors", base))
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    base = make_base(layout_keys("sd3-comfyui", 32, components={"diffuser", "clip_l", "clip_g", "t5xxl"}), seed=3,
                     dtype=torch.float32)
    return base, write_model(tmp_path_factory.mktemp("sd3") / "sd3.safetensors", base)


def unet_keys(base: dict, table: dict) -> list[str]:
    p = P if any(k.startswith(P) for k in base) else ""
    return [p + path + ".weight" for path in table]


def project(tmp_path, base_path, merges: str, **loras) -> None:
    text = f'[models.base]\npath = "{base_path}"\n'
    for name, tensors in loras.items():
        write_model(tmp_path / f"{name}.safetensors", tensors, {"ss_network_module": "networks.lora"})
        text += f'[models.{name}]\npath = "{name}.safetensors"\n'
    mergefile(tmp_path / "mergefile.toml", text + merges)


def bake(name: str, lora: str, extra: str = "") -> str:
    return f'[merges.{name}]\nmethod = "lora"\ninputs = ["base", "{lora}"]\n{extra}output = "{name}.safetensors"\n'


# bake --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["full", "transformer", "bare"])
def test_flux_kohya_and_diffusers_namings_bake_the_same_bytes(fluxes, tmp_path, variant):
    base, path = fluxes[variant]
    keys = unet_keys(base, FLUX_DIFFUSERS) + (FLUX_TE if variant == "full" else [])
    kohya = kohya_lora(base, keys, seed=1)
    diffusers = as_diffusers(kohya, base, FLUX_DIFFUSERS)
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in diffusers
    project(tmp_path, path, bake("k", "kohya", "strength = 0.7\n") + bake("d", "diffusers", "strength = 0.7\n"),
            kohya=kohya, diffusers=diffusers)
    proc = run_cli(cwd=tmp_path, check=True)
    assert f"k: kohya: applied {len(keys)} LoRA modules" in proc.stderr
    k, d = load(tmp_path / "k.safetensors"), load(tmp_path / "d.safetensors")
    assert_close(k, expected(base, kohya, 0.7))
    assert all(torch.equal(k[key], d[key]) for key in base)  # the same file's tensors, bit for bit
    untouched = [key for key in base if key not in keys]
    assert all(torch.equal(k[key], base[key]) for key in untouched)


def test_onetrainer_lycoris_and_diffsynth_spellings_bake_as_diffusers(fluxes, tmp_path):
    base, path = fluxes["bare"]
    diffusers = as_diffusers(kohya_lora(base, unet_keys(base, FLUX_DIFFUSERS), seed=9), base, FLUX_DIFFUSERS)

    def spelled(prefix: str, sep: str) -> dict:  # kohya's tensor names, no alpha (scale 1)
        out = {}
        for name, t in diffusers.items():
            module, role = name.removeprefix("transformer.").rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            out[f"{prefix}{module.replace('.', sep)}.{'lora_up' if role == 'lora_B' else 'lora_down'}.weight"] = t
        return out

    loras = {"d": diffusers, "ot": spelled("lora_transformer_", "_"), "ly": spelled("lycoris_", "_"), "ds": spelled("", ".")}
    assert "lora_transformer_single_transformer_blocks_1_proj_mlp.lora_up.weight" in loras["ot"]
    project(tmp_path, path, "".join(bake(f"b_{n}", n) for n in loras), **loras)
    run_cli(cwd=tmp_path, check=True)
    want = load(tmp_path / "b_d.safetensors")
    for name in ("ot", "ly", "ds"):
        got = load(tmp_path / f"b_{name}.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in base), name


def test_diffusers_modules_change_only_their_rows_and_norm_out_swaps(fluxes, tmp_path):
    base, path = fluxes["full"]
    qkv, final = P + "double_blocks.0.img_attn.qkv.weight", P + "final_layer.adaLN_modulation.1.weight"
    h = base[qkv].shape[1]
    g = torch.Generator().manual_seed(5)
    b_k, b_n, a_k, a_n = (torch.randn(s, generator=g) for s in ((h, 2), (2 * h, 2), (2, h), (2, h)))
    lora = {"transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b_k, "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a_k,
            "transformer.norm_out.linear.lora_B.weight": b_n, "transformer.norm_out.linear.lora_A.weight": a_n}
    project(tmp_path, path, bake("m", "l"), l=lora)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")
    dq = out[qkv].double() - base[qkv].double()
    assert torch.equal(out[qkv][:h], base[qkv][:h]) and torch.equal(out[qkv][2 * h:], base[qkv][2 * h:])
    torch.testing.assert_close(dq[h:2 * h], b_k.double() @ a_k.double(), rtol=1e-5, atol=1e-5)
    # diffusers' norm_out.linear is [scale; shift]; BFL's final adaLN is [shift; scale]
    dn = out[final].double() - base[final].double()
    scale, shift = b_n.double()[:h] @ a_n.double(), b_n.double()[h:] @ a_n.double()
    torch.testing.assert_close(dn[:h], shift, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dn[h:], scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bare", [False, True])
def test_sd3_kohya_and_diffusers_namings_and_the_last_context_block(sd3, tmp_path, bare):
    base, path = sd3
    if bare:
        base = {k[len(P):]: v for k, v in base.items() if k.startswith(P)}
        path = write_model(tmp_path / "bare.safetensors", base)
    te = [] if bare else [CLIP + "text_model.encoder.layers.0.self_attn.v_proj.weight", T5 + "encoder.block.2.layer.0.SelfAttention.k.weight"]
    keys = unet_keys(base, SD3_DIFFUSERS) + te
    kohya = kohya_lora(base, keys, seed=2)
    diffusers = as_diffusers(kohya, base, SD3_DIFFUSERS)
    diffusers = {k.replace("text_encoder_2.", "text_encoder_3."): v for k, v in diffusers.items()}  # SD3: T5 is the third
    assert "transformer.transformer_blocks.23.norm1_context.linear.lora_B.weight" in diffusers
    project(tmp_path, path, bake("k", "kohya") + bake("d", "diffusers"), kohya=kohya, diffusers=diffusers)
    run_cli(cwd=tmp_path, check=True)
    k, d = load(tmp_path / "k.safetensors"), load(tmp_path / "d.safetensors")
    assert_close(k, expected(base, kohya))
    assert all(torch.equal(k[key], d[key]) for key in base)


def test_flux_block_weights_reach_their_blocks(fluxes, tmp_path):
    base, path = fluxes["full"]
    blocks = {FLUX_TE[0]: ("CLIP", 0, 0.9), FLUX_TE[2]: ("T5", 1, 0.8), P + "img_in.weight": ("IN", 2, 0.7),
              P + "double_blocks.0.img_attn.qkv.weight": ("D00", 3, -0.5), P + "single_blocks.1.linear1.weight": ("S01", 23, 0.3),
              P + "final_layer.linear.weight": ("OUT", 60, 0.2), P + "double_blocks.0.img_mod.lin.weight": ("D00", 3, -0.5),
              P + "single_blocks.1.linear2.weight": ("S01", 23, 0.3)}
    values = [0.0] * 61
    for _, index, value in blocks.values():
        values[index] = value
    keys = list(blocks) + [P + "double_blocks.1.img_mlp.0.weight"]  # D01: 0
    kohya = kohya_lora(base, keys, seed=3)
    project(tmp_path, path, bake("m", "l", f"block_weights = {values}\n") + bake("short", "l", f"block_weights = {[1.0] * 17}\n"),
            l=kohya)
    proc = run_cli("m", cwd=tmp_path, check=True)
    assert proc.returncode == 0
    got = load(tmp_path / "m.safetensors")
    assert_close(got, expected(base, kohya, factor=lambda key: blocks[key][2] if key in blocks else 0.0))
    assert torch.equal(got[P + "double_blocks.1.img_mlp.0.weight"], base[P + "double_blocks.1.img_mlp.0.weight"])
    proc = run_cli("short", cwd=tmp_path)
    assert proc.returncode == 2 and "flux-dev takes 61 values, got 17" in proc.stderr


def test_unmatched_modules_are_listed(fluxes, tmp_path):
    base, path = fluxes["bare"]  # a transformer-only file: text-encoder modules match nothing
    full = fluxes["full"][0]
    kohya = {**kohya_lora(base, ["double_blocks.0.img_attn.qkv.weight"], seed=4), **kohya_lora(full, FLUX_TE[:1], seed=5)}
    kohya["lora_unet_double_blocks_99_img_attn_qkv.lora_up.weight"] = torch.zeros(8, RANK)
    kohya["lora_unet_double_blocks_99_img_attn_qkv.lora_down.weight"] = torch.zeros(RANK, 8)
    project(tmp_path, path, bake("m", "l"), l=kohya)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "2 LoRA modules match no key" in proc.stderr and "(flux-dev)" in proc.stderr
    assert "lora_unet_double_blocks_99_img_attn_qkv" in proc.stderr and "lora_te1_text_model_encoder_layers_0" in proc.stderr
    project(tmp_path, path, bake("m", "l", "allow_unmatched = true\n"), l=kohya)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "warning" in proc.stderr and "applied 1 LoRA modules" in proc.stderr
    assert_close(load(tmp_path / "m.safetensors"), expected(base, kohya))


# merge and extract ------------------------------------------------------------------------------------

def test_lora_merge_of_a_kohya_and_a_diffusers_lora_bakes_as_both(fluxes, tmp_path):
    base, path = fluxes["full"]
    a = kohya_lora(base, unet_keys(base, FLUX_DIFFUSERS)[:6] + FLUX_TE[:2], seed=6)
    b = as_diffusers(kohya_lora(base, unet_keys(base, FLUX_DIFFUSERS)[3:], seed=7), base, FLUX_DIFFUSERS)
    merges = ('[merges.ab]\nmethod = "lora_merge"\ninputs = ["a", "b"]\nstrengths = [0.5, -1.0]\noutput = "ab.safetensors"\n'
              + bake("back", "ab") + bake("only_a", "a", "strength = 0.5\n") + bake("only_b", "b", "strength = -1.0\n"))
    project(tmp_path, path, merges, a=a, b=b)
    run_cli(cwd=tmp_path, check=True)
    only_a, only_b = load(tmp_path / "only_a.safetensors"), load(tmp_path / "only_b.safetensors")
    both = {k: only_a[k].double() + only_b[k].double() - base[k].double() for k in base}
    assert_close(load(tmp_path / "back.safetensors"), both)


def test_extract_then_bake_gives_back_the_tuned_flux(fluxes, tmp_path):
    base, path = fluxes["full"]
    g = torch.Generator().manual_seed(8)
    changed = [P + "double_blocks.0.img_attn.qkv.weight", P + "single_blocks.2.linear1.weight", P + "double_blocks.5.txt_mod.lin.weight",
               FLUX_TE[1], FLUX_TE[3]]
    tuned = dict(base)
    for key in changed:  # exact rank-2 changes: a rank-4 extraction holds them whole
        w = base[key]
        tuned[key] = w + 0.05 * (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g))
    write_model(tmp_path / "tuned.safetensors", tuned)
    merges = ('[models.tuned]\npath = "tuned.safetensors"\n[merges.x]\nmethod = "lora_extract"\ninputs = ["tuned", "base"]\n'
              'rank = 4\noutput = "x.safetensors"\n' + bake("back", "x"))
    project(tmp_path, path, merges)
    proc = run_cli(cwd=tmp_path, check=True)
    assert "x: extracted 5 LoRA modules" in proc.stderr
    x = load(tmp_path / "x.safetensors")
    assert {k.split(".")[0] for k in x} == {kohya_name(key) for key in changed}
    assert all(x[kohya_name(key) + ".alpha"].item() == 4 for key in changed)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"].endswith("/lora")  # ModelSpec's id of a LoRA
    # rank(tuned - base) = 2 <= 4: the SVD keeps all of it, so what is left is float32 rounding
    # of values about 0.05 (below 1e-6), far inside the tolerance
    assert_close(load(tmp_path / "back.safetensors"), {k: v.double() for k, v in tuned.items()}, 1e-5)
