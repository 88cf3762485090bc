"""PEFT adapter folders through the real CLI, on a tiny Llama-shaped Hugging Face folder: baked
against W + s B A computed here in float64 (rank_pattern, alpha_pattern, rslora, embeddings,
modules_to_save, DoRA), written by lora_extract and lora_merge (round trips, alpha != rank,
energy ranks, TIES over adapters' deltas against the reference formula), and refused when broken."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.testing.fabricate import layout_keys, llama_keys, make_base
from mergebuild.testing.lora import lora_modules, make_lora, save_lora
from tests.conftest import build_json, mergefile, run_cli

P = "base_model.model."
Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
DOWN0, EMBED = "model.layers.0.mlp.down_proj", "model.embed_tokens"


# fabricated folders -------------------------------------------------------------------------------

def hf_model(path, tensors: dict) -> dict:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "num_hidden_layers": 2, "_name_or_path": "tiny/llama"}))
    return tensors


@pytest.fixture
def base(tmp_path):
    return hf_model(tmp_path / "base", make_base(llama_keys(layers=2, vocab=32), seed=0, dtype=torch.float32))


def adapter(path, tensors: dict, config: dict) -> dict:
    """A PEFT adapter folder: adapter_config.json and adapter_model.safetensors."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return tensors


def factors(base: dict, modules: dict[str, int], seed: int) -> dict:
    """lora_A [r, in] and lora_B [out, r] of each module (embeddings: lora_embedding_A [r, V],
    lora_embedding_B [D, r]), random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, r in modules.items():
        rows, cols = base[module + ".weight"].shape
        if module == EMBED:
            out[f"{P}{module}.lora_embedding_A"] = torch.randn(r, rows, generator=g) * 0.3
            out[f"{P}{module}.lora_embedding_B"] = torch.randn(cols, r, generator=g) * 0.3
        else:
            out[f"{P}{module}.lora_A.weight"] = torch.randn(r, cols, generator=g) * 0.3
            out[f"{P}{module}.lora_B.weight"] = torch.randn(rows, r, generator=g) * 0.3
    return out


def peft_rule(patterns: dict, path: str, default):
    """PEFT's get_pattern_key, written out again: the first key k with (.*\\.)?(k)$."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", path)), default)


def delta(lora: dict, module: str, config: dict) -> torch.Tensor:
    """s B A (embeddings: (B A)^T) in float64, s from the config as PEFT computes it."""
    r = peft_rule(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = peft_rule(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    s = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    if module == EMBED:
        return s * (lora[f"{P}{module}.lora_embedding_B"].double() @ lora[f"{P}{module}.lora_embedding_A"].double()).T
    d = s * (lora[f"{P}{module}.lora_B.weight"].double() @ lora[f"{P}{module}.lora_A.weight"].double())
    return d.T if config.get("fan_in_fan_out") else d


def baked(base: dict, lora: dict, config: dict, strength: float = 1.0) -> dict:
    out = {k: v.double().clone() for k, v in base.items()}
    for k, v in lora.items():  # modules_to_save and saved embedding layers: the tensor itself
        if ".lora_" not in k:
            out[k[len(P):].replace(".base_layer.", ".")] = v.double()
    modules = {k[len(P):].rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    for module in modules:
        out[module + ".weight"] += strength * delta(lora, module, config)
    return out


def close(got: dict, want: dict, tol=1e-5):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=tol, atol=tol, msg=k)


def build(tmp_path, text: str):
    mergefile(tmp_path / "mergefile.toml", text)
    return run_cli(cwd=tmp_path, check=True)


def models(*names) -> str:
    return "".join(f'[models.{n}]\npath = "{n}"\n' for n in names)


# bake-in ---------------------------------------------------------------------------------------

def test_bake_follows_rank_and_alpha_patterns_embeddings_and_modules_to_save(tmp_path, base):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
              # first match wins; a key matches a whole name or its end after a dot
              "rank_pattern": {"layers.1.self_attn.q_proj": 6, "v_proj": 2, "mlp.down_proj": 3},
              "alpha_pattern": {r"model\.layers\.0\..*q_proj": 5, "q_proj": 12, "embed_tokens": 16},
              "modules_to_save": ["lm_head"]}
    ranks = {Q0: 4, "model.layers.1.self_attn.q_proj": 6, "model.layers.0.self_attn.v_proj": 2, V1: 2,
             DOWN0: 3, EMBED: 4}
    lora = factors(base, ranks, seed=1)
    g = torch.Generator().manual_seed(2)
    lora[P + "lm_head.weight"] = torch.randn(base["lm_head.weight"].shape, generator=g)
    lora[f"{P}{EMBED}.base_layer.weight"] = torch.randn(base[EMBED + ".weight"].shape, generator=g)  # PEFT's
    adapter(tmp_path / "ad", lora, config)
    proc = build(tmp_path, models("base", "ad") + """
        [merges.m]
        method = "lora"
        inputs = ["base", "ad"]
        output = "m.safetensors"
    """)
    assert "ad: applied 8 LoRA modules (LoRA 6, full 2)" in proc.stderr
    close(load_file(str(tmp_path / "m.safetensors")), baked(base, lora, config))
    assert delta(lora, Q0, config).abs().max() > 0.1  # the patterns matter: s = 5/4, 12/6, 8/2, 8/3, 16/4


def test_rslora_and_fan_in_fan_out(tmp_path, base):
    config = {"r": 4, "lora_alpha": 6, "use_rslora": True, "fan_in_fan_out": True}
    lora = factors(base, {Q0: 4, V1: 4}, seed=3)  # square weights: their transposes fit
    adapter(tmp_path / "ad", lora, config)
    build(tmp_path, models("base", "ad") + """
        [merges.m]
        method = "lora"
        inputs = ["base", "ad"]
        strength = 0.5
        output = "m.safetensors"
    """)
    want = baked(base, lora, config, 0.5)
    close(load_file(str(tmp_path / "m.safetensors")), want)
    assert not torch.allclose(want[Q0 + ".weight"], base[Q0 + ".weight"].double() + 0.5 * 6 / 4 *
                              (lora[f"{P}{Q0}.lora_B.weight"] @ lora[f"{P}{Q0}.lora_A.weight"]).double().T)


def test_peft_dora_decomposes_per_output_row(tmp_path, base):
    config = {"r": 2, "lora_alpha": 4, "use_dora": True}
    lora = factors(base, {Q0: 2}, seed=4)
    g = torch.Generator().manual_seed(5)
    lora[f"{P}{Q0}.lora_magnitude_vector"] = torch.rand(16, generator=g) + 0.5
    adapter(tmp_path / "ad", lora, config)
    build(tmp_path, models("base", "ad") + """
        [merges.m]
        method = "lora"
        inputs = ["base", "ad"]
        output = "m.safetensors"
    """)
    w = base[Q0 + ".weight"].double()
    merged = w + delta(lora, Q0, config)  # PEFT: m * (W + s B A) / ||W + s B A|| per output row
    want = {k: v.double() for k, v in base.items()}
    want[Q0 + ".weight"] = merged * (lora[f"{P}{Q0}.lora_magnitude_vector"].double() / merged.norm(dim=1)).unsqueeze(1)
    close(load_file(str(tmp_path / "m.safetensors")), want)


# adapters written -------------------------------------------------------------------------------

def low_rank_tune(base: dict, ranks: dict[str, int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    for module, r in ranks.items():
        out, inn = base[module + ".weight"].shape
        tuned[module + ".weight"] = base[module + ".weight"] + torch.randn(out, r, generator=g) @ torch.randn(
            r, inn, generator=g) * 0.2
    return tuned


def test_extract_to_an_adapter_folder_and_back(tmp_path, base):
    tuned = hf_model(tmp_path / "tuned", low_rank_tune(base, {Q0: 2, V1: 3, DOWN0: 3}, seed=6))
    proc = build(tmp_path, models("base", "tuned") + """
        [merges.x]
        method = "lora_extract"
        inputs = ["tuned", "base"]
        rank = 3
        output = "adapter"
        [merges.back]
        method = "lora"
        inputs = ["base", "x"]
        output = "back.safetensors"
    """)
    assert "x: extracted 3 LoRA modules" in proc.stderr
    folder = tmp_path / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == [".mergebuild-manifest.json", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (3, 3, {}, {})
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (config["base_model_name_or_path"], config["task_type"], config["peft_type"]) == \
        ("tiny/llama", "CAUSAL_LM", "LORA")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights[f"{P}{Q0}.lora_A.weight"].shape == (3, 16)
    close(load_file(str(tmp_path / "back.safetensors")), {k: v.double() for k, v in tuned.items()}, 1e-4)
    # the folder read back as a source bakes to the same tensors
    build(tmp_path, models("base", "adapter") + """
        [merges.again]
        method = "lora"
        inputs = ["base", "adapter"]
        output = "again.safetensors"
    """)
    close(load_file(str(tmp_path / "again.safetensors")), {k: v.double() for k, v in tuned.items()}, 1e-4)
    assert all(m["computed"] == 0 for m in build_json(cwd=tmp_path)["merges"].values())


def test_a_truncated_extraction_is_the_rank_s_best(tmp_path, base):
    """Round trip at a rank below the difference's: the baked error is the Eckart-Young optimum."""
    g = torch.Generator().manual_seed(13)
    tuned = dict(base)
    tuned[DOWN0 + ".weight"] = base[DOWN0 + ".weight"] + 0.05 * torch.randn(16, 40, generator=g)
    hf_model(tmp_path / "tuned", tuned)
    build(tmp_path, models("base", "tuned") + """
        [merges.x]
        method = "lora_extract"
        inputs = ["tuned", "base"]
        rank = 4
        output = "adapter"
        [merges.back]
        method = "lora"
        inputs = ["base", "x"]
        output = "back.safetensors"
    """)
    d = (tuned[DOWN0 + ".weight"] - base[DOWN0 + ".weight"]).double()
    err = load_file(str(tmp_path / "back.safetensors"))[DOWN0 + ".weight"].double() - tuned[DOWN0 + ".weight"].double()
    torch.testing.assert_close(err.norm(), torch.linalg.svdvals(d)[4:].norm(), rtol=1e-4, atol=1e-6)


def test_extract_alpha_energy_and_full_tensors(tmp_path, base, monkeypatch):
    tuned = low_rank_tune(base, {Q0: 2, V1: 5}, seed=7)
    g = torch.Generator().manual_seed(8)
    for key in ("model.norm.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"):
        tuned[key] = base[key] + 0.1 * torch.randn(base[key].shape, generator=g)
    hf_model(tmp_path / "tuned", tuned)
    proc = build(tmp_path, models("base", "tuned") + """
        [merges.x]
        method = "lora_extract"
        inputs = ["tuned", "base"]
        rank = 8
        energy = 0.999999
        alpha = 32
        save_full = true
        output = "adapter"
        [merges.back]
        method = "lora"
        inputs = ["base", "x"]
        output = "back.safetensors"
        [merges.k]
        method = "lora_extract"
        inputs = ["tuned", "base"]
        rank = 8
        sv_epsilon = 1e-3
        alpha = 32
        format = "kohya"
        output = "k.safetensors"
    """)
    # the 3 changed, and the other modules PEFT takes for "norm" (it matches names by their ends)
    assert "x: extracted 2 LoRA modules, saved 6 tensors whole" in proc.stderr
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    # energy found each layer's own rank; alpha 32 everywhere
    assert (config["r"], config["lora_alpha"], config["alpha_pattern"]) == (5, 32, {})
    assert config["rank_pattern"] == {Q0: 2}
    assert config["modules_to_save"] == ["input_layernorm", "lm_head", "norm"]
    weights = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert P + "lm_head.weight" in weights and weights[f"{P}{Q0}.lora_B.weight"].shape == (16, 2)
    assert P + "model.layers.0.post_attention_layernorm.weight" in weights
    s = 32 / 2  # alpha / r: the factors were scaled so that s B A is the difference
    torch.testing.assert_close(s * weights[f"{P}{Q0}.lora_B.weight"] @ weights[f"{P}{Q0}.lora_A.weight"],
                               tuned[Q0 + ".weight"] - base[Q0 + ".weight"], atol=1e-5, rtol=1e-5)
    close(load_file(str(tmp_path / "back.safetensors")), {k: v.double() for k, v in tuned.items()}, 1e-4)
    kohya = load_file(str(tmp_path / "k.safetensors"))
    assert kohya[f"{P}{V1}.lora_down.weight"].shape == (5, 16) and kohya[f"{P}{V1}.alpha"].item() == 32

    def boom(*_):
        raise AssertionError("the singular values were computed again")

    monkeypatch.setattr(torch.linalg, "svdvals", boom)  # a no-op build reads the ranks back
    assert all(m["computed"] == 0 for m in build_json(cwd=tmp_path)["merges"].values())


# LoRA-to-LoRA merges --------------------------------------------------------------------------

def ties_reference(deltas: list, weights: list, density: float) -> torch.Tensor:
    """TIES (Yadav et al.): trim each delta to its top int(density * n) magnitudes, elect the sign
    of the weighted sum per element, average the agreeing weighted deltas by their weights."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().argsort(descending=True)[:k]] = True
        trimmed.append(torch.where(keep.reshape(d.shape), d, 0.0))
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1, 1)
    stacked = torch.stack(trimmed) * w
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    divisor = (agree * w).sum(0)
    return (stacked * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def test_ties_over_two_adapters_against_the_reference(tmp_path, base):
    ca = {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}}
    cb = {"r": 3, "lora_alpha": 3, "use_rslora": True}
    a = adapter(tmp_path / "a", factors(base, {Q0: 4, V1: 2}, seed=9), ca)
    b = adapter(tmp_path / "b", factors(base, {Q0: 3, DOWN0: 3}, seed=10), cb)
    build(tmp_path, models("base", "a", "b") + """
        [merges.t]
        method = "lora_merge"
        inputs = ["a", "b"]
        strengths = [1.0, 0.6]
        mode = "ties"
        density = 0.4
        rank = 16
        output = "ties"
        [merges.baked]
        method = "lora"
        inputs = ["base", "t"]
        output = "baked.safetensors"
        [merges.cat]
        method = "lora_merge"
        inputs = ["a", "b"]
        strengths = [1.0, 0.6]
        output = "cat"
    """)
    weights = load_file(str(tmp_path / "ties/adapter_model.safetensors"))
    config = json.loads((tmp_path / "ties/adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 16 and config["rank_pattern"] == config["alpha_pattern"]
    want = {k: v.double() for k, v in base.items()}
    for module in (Q0, V1, DOWN0):
        deltas = [delta(lora, module, c) if f"{P}{module}.lora_A.weight" in lora else
                  torch.zeros(base[module + ".weight"].shape, dtype=torch.float64) for lora, c in ((a, ca), (b, cb))]
        merged = ties_reference(deltas, [1.0, 0.6], 0.4)
        r = config["rank_pattern"].get(module, config["r"])  # full rank: exact
        got = weights[f"{P}{module}.lora_B.weight"].double() @ weights[f"{P}{module}.lora_A.weight"].double()
        assert got.shape == merged.shape and r == min(merged.shape)
        torch.testing.assert_close(got, merged, atol=1e-5, rtol=1e-5)
        want[module + ".weight"] += merged
    close(load_file(str(tmp_path / "baked.safetensors")), want)
    cat = json.loads((tmp_path / "cat/adapter_config.json").read_text())
    assert (cat["r"], cat["rank_pattern"]) == (7, {V1: 2, DOWN0: 3})  # exact: ranks add up, scales folded in


def test_ties_over_kohya_loras_keeps_kohya_names(tmp_path):
    sd = make_base(layout_keys("sd1-ldm", 32, components={"clip_l", "diffuser"}), seed=0, dtype=torch.float32)
    save_file(sd, str(tmp_path / "sd.safetensors"))
    targets = r"attn1\.to_(q|k)"
    loras = [make_lora(sd, "sd1", r, "lora", targets=targets, seed=20 + r, alpha=a) for r, a in ((4, 2.0), (2, 8.0))]
    for name, lora in zip("ab", loras):
        save_lora(tmp_path / f"{name}.safetensors", lora)
    build(tmp_path, """
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        [merges.t]
        method = "lora_merge"
        inputs = ["a", "b"]
        strengths = [0.7, 1.0]
        mode = "ties"
        rank = 64
        output = "t.safetensors"
    """)
    got = load_file(str(tmp_path / "t.safetensors"))
    modules = [name for name, _, _ in lora_modules(sd, "sd1", "lora", targets)]
    assert modules and set(got) == {f"{m}.{s}" for m in modules for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    for m in modules:
        deltas = [lora[f"{m}.alpha"].double() / lora[f"{m}.lora_down.weight"].shape[0] *
                  lora[f"{m}.lora_up.weight"].double() @ lora[f"{m}.lora_down.weight"].double() for lora in loras]
        want = ties_reference(deltas, [0.7, 1.0], 0.2)  # ties' default density
        rank = got[f"{m}.lora_down.weight"].shape[0]
        assert got[f"{m}.alpha"].item() == rank == min(want.shape)
        torch.testing.assert_close(got[f"{m}.lora_up.weight"].double() @ got[f"{m}.lora_down.weight"].double(), want,
                                   atol=1e-6, rtol=1e-5)


# refusals ---------------------------------------------------------------------------------------

BAKE = """
    [merges.m]
    method = "lora"
    inputs = ["base", "ad"]
    output = "m.safetensors"
"""


@pytest.mark.parametrize("case", ["not_json", "no_weights", "bin_weights", "loha", "wrong_rank", "bad_pattern"])
def test_broken_adapters_are_one_line_errors(tmp_path, base, case):
    folder = tmp_path / "ad"
    lora = factors(base, {Q0: 4}, seed=11)
    adapter(folder, lora, {"r": 4, "lora_alpha": 4})
    if case == "not_json":
        (folder / "adapter_config.json").write_text("{r: 4,")
    elif case in ("no_weights", "bin_weights"):
        (folder / "adapter_model.safetensors").unlink()
        if case == "bin_weights":
            (folder / "adapter_model.bin").write_bytes(b"pickle")
    elif case == "loha":
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4}))
    elif case == "wrong_rank":
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    else:
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "rank_pattern": {"q_proj(": 2}}))
    mergefile(tmp_path / "mergefile.toml", models("base", "ad") + BAKE)
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    said = {"not_json": "not a usable PEFT adapter config", "no_weights": "no adapter_model.safetensors",
            "bin_weights": "safe_serialization=True", "loha": "peft_type is 'LOHA'",
            "wrong_rank": "gives it rank 8 (r / rank_pattern), and its lora_A has 4 rows",
            "bad_pattern": "is not a regular expression"}[case]
    assert said in lines[0]


@pytest.mark.parametrize("merge, said", [
    ('format = "peft"\noutput = "x.safetensors"', "format = 'peft' writes a PEFT adapter folder"),
    ('format = "kohya"\noutput = "x"', "format = 'kohya' writes one .safetensors file"),
    ('alpha = 8\noutput = "x.safetensors"', "alpha: module base_model.model."),
    ('energy = 1.5\noutput = "x"', "energy is 1.5"),
])
def test_extraction_options_that_cannot_be_written(tmp_path, base, merge, said):
    hf_model(tmp_path / "tuned", low_rank_tune(base, {Q0: 2}, seed=12))
    mergefile(tmp_path / "mergefile.toml", models("base", "tuned") +
              f'[merges.x]\nmethod = "lora_extract"\ninputs = ["tuned", "base"]\n{merge}\n')
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_peft_itself_reads_and_writes_the_same_adapters(tmp_path):
    """Where PEFT and transformers are installed (not a dependency): an adapter PEFT writes
    (patterns, rslora, an embedding, modules_to_save) bakes as PEFT's merge_and_unload merges it,
    and PEFT loads the adapter lora_extract writes and merges it back into the fine-tune."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=32, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    fresh = lambda: LlamaForCausalLM.from_pretrained(tmp_path / "base")  # noqa: E731
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                    rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"q_proj": 3},
                    use_rslora=True, modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(fresh(), lc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "ad")
    want = model.merge_and_unload().state_dict()
    sd = fresh().state_dict()
    tuned = low_rank_tune(sd, {Q0: 2, "model.layers.1.mlp.down_proj": 3}, seed=1)
    tuned["model.norm.weight"] = sd["model.norm.weight"] + 0.1
    model = fresh()
    model.load_state_dict(tuned)
    model.save_pretrained(tmp_path / "tuned")
    build(tmp_path, models("base", "ad", "tuned") + """
        [merges.m]
        method = "lora"
        inputs = ["base", "ad"]
        output = "m.safetensors"
        [merges.x]
        method = "lora_extract"
        inputs = ["tuned", "base"]
        rank = 8
        energy = 0.99999
        alpha = 16
        save_full = true
        output = "xad"
    """)
    got = load_file(str(tmp_path / "m.safetensors"))
    assert max((got[k].double() - want[k].double()).abs().max().item() for k in got) < 1e-6
    back = PeftModel.from_pretrained(fresh(), tmp_path / "xad").merge_and_unload().state_dict()
    assert max((back[k].double() - tuned[k].double()).abs().max().item() for k in tuned) < 1e-5
