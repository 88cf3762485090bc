"""PEFT adapter configs and the LoRA-to-LoRA math, as pure functions: PEFT's pattern rule, scales
(rslora), the config mergebuild writes, TIES / DARE over modules' deltas re-factored by SVD
(against float64 references), adaptive ranks, transposed and whole-tensor modules."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mergebuild.methods import lora_formats as lf
from mergebuild.methods import peft
from mergebuild.methods.common import generator_for
from mergebuild.methods.task_vectors import dare_sparsify


def get_pattern_key(pattern_keys, key_to_match):
    """peft.utils.other.get_pattern_key as PEFT 0.21 has it (the rule mergebuild follows)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


@pytest.mark.parametrize("path", ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
                                  "model.layers.1.mlp.up_proj", "q_proj", "xq_proj", "model.layers.1.self_attn.k_proj"])
def test_pattern_rule_is_peft_s(path):
    patterns = ["layers.1.mlp.up_proj", r"layers\.1.\..*_proj", "q_proj", "model.layers.0.self_attn.q_proj"]
    matched = any(re.match(rf"(.*\.)?({k})$", path) for k in patterns)
    assert peft.pattern_key(patterns, path) == (get_pattern_key(patterns, path) if matched else None)


def test_scales_follow_patterns_and_rslora():
    config = peft.parse_config({"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4},
                                "alpha_pattern": {"layers.0.self_attn.v_proj": 2}})
    v0, v1, q = (peft.MODULE_PREFIX + f"model.layers.{i}.self_attn.{p}" for i, p in ((0, "v_proj"), (1, "v_proj"),
                                                                                       (0, "q_proj")))
    assert (config.scale(v0), config.scale(v1), config.scale(q)) == (2 / 4, 16 / 4, 16 / 8)
    rs = peft.parse_config({"r": 16, "lora_alpha": 8, "use_rslora": True})
    assert rs.scale(q) == 8 / math.sqrt(16)
    assert peft.parse_config({}).scale(q) == 1.0  # PEFT's defaults: r = 8, lora_alpha = 8


@pytest.mark.parametrize("doc, said", [
    ([], "not a JSON object"), ({"peft_type": "IA3"}, "peft_type is 'IA3'"), ({"r": 0}, "r is 0"),
    ({"r": "8"}, "r is '8'"), ({"lora_alpha": True}, "lora_alpha is True"),
    ({"rank_pattern": {"q": 2.5}}, "rank_pattern['q'] is 2.5"), ({"alpha_pattern": ["q"]}, "not an object"),
    ({"rank_pattern": {"[q": 2}}, "not a regular expression"),
])
def test_configs_refused(doc, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        peft.parse_config(doc)


def test_written_config_gives_each_module_its_rank_and_alpha():
    p = peft.MODULE_PREFIX
    modules = {p + "model.layers.0.self_attn.q_proj": (4, 4), p + "model.layers.1.self_attn.q_proj": (4, 4),
               p + "model.layers.0.mlp.down_proj": (2, 2), p + "model.layers.1.mlp.down_proj": (6, 32.5)}
    doc = peft.make_config(modules, base_model="tiny/llama", modules_to_save=["norm"])
    assert (doc["r"], doc["lora_alpha"]) == (4, 4)
    assert doc["rank_pattern"] == {"model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 6}
    assert doc["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 32.5}
    assert (doc["target_modules"], doc["modules_to_save"]) == (["down_proj", "q_proj"], ["norm"])
    back = peft.parse_config(doc)
    assert all((back.rank(n), back.alpha(n)) == ra for n, ra in modules.items())
    for name, (rank, alpha) in modules.items():  # PEFT's own rule on the written patterns
        path = name[len(p):]
        r_key, a_key = get_pattern_key(doc["rank_pattern"], path), get_pattern_key(doc["alpha_pattern"], path)
        assert (doc["rank_pattern"].get(r_key, doc["r"]), doc["alpha_pattern"].get(a_key, doc["lora_alpha"])) == \
            (rank, alpha)


def test_a_config_peft_would_misread_is_refused():
    p = peft.MODULE_PREFIX  # "q" ends "x.q" after a dot, so a pattern for q would take x.q as well
    with pytest.raises(ValueError, match="cannot tell it from another module"):
        peft.make_config({p + "q": (2, 2), p + "x.q": (4, 4), p + "y.q": (4, 4)})


# TIES / DARE over LoRA deltas ------------------------------------------------------------------

def modules_and_tensors(seed: int, ranks=(3, 2), shape=(12, 10)):
    g = torch.Generator().manual_seed(seed)
    tensors, modules, deltas = [], [], []
    for i, r in enumerate(ranks):
        up, down = torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g)
        alpha = torch.tensor(float(r + i))
        modules.append({"tensors": {"lora_up": len(tensors), "lora_down": len(tensors) + 1, "alpha": len(tensors) + 2},
                        "multiplier": [1.0, 0.5][i], "rank": r})
        tensors += [up, down, alpha]
        deltas.append((r + i) / r * up.double() @ down.double())
    return tensors, modules, deltas


def ties_reference(deltas, weights, density):
    out = []
    for d in deltas:
        k = int(density * d.numel())
        flat = d.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        out.append(torch.where(keep, flat, 0.0).reshape(d.shape))
    w = torch.tensor(weights, dtype=torch.float64)[:, None, None]
    x = torch.stack(out) * w
    sign = torch.where(x.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(x) == sign) & (x != 0)
    div = (agree * w).sum(0)
    return (x * agree).sum(0) / torch.where(div == 0, 1.0, div)


def test_ties_at_full_rank_is_the_merged_delta():
    tensors, modules, deltas = modules_and_tensors(0)
    merge = {"sparsify": "magnitude", "sign": "mass", "density": 0.3, "normalize": True, "lam": 1.0}
    want = ties_reference(deltas, [1.0, 0.5], 0.3)
    tensors64 = [t.double() for t in tensors]
    up = lf.delta_merge_part(*tensors64, part="up", modules=modules, shape=[12, 10], rank=10, merge=merge)
    down = lf.delta_merge_part(*tensors64, part="down", modules=modules, shape=[10, 10], rank=10, merge=merge)
    torch.testing.assert_close(up @ down, want, atol=1e-10, rtol=1e-10)
    low_up = lf.delta_merge_part(*tensors64, part="up", modules=modules, shape=[12, 4], rank=4, merge=merge)
    low_down = lf.delta_merge_part(*tensors64, part="down", modules=modules, shape=[4, 10], rank=4, merge=merge)
    s = torch.linalg.svdvals(want)  # Eckart-Young: the error of rank 4 is the rest of the spectrum
    torch.testing.assert_close(torch.linalg.matrix_norm(low_up @ low_down - want), s[4:].norm(), atol=1e-9, rtol=1e-9)


def test_dare_draws_the_module_s_mask():
    tensors, modules, deltas = modules_and_tensors(1)
    merge = {"sparsify": "random", "sign": "none", "density": 0.5, "normalize": False, "lam": 2.0, "seed": 7,
             "key": "m"}
    tensors64 = [t.double() for t in tensors]
    up = lf.delta_merge_part(*tensors64, part="up", modules=modules, shape=[12, 10], rank=10, merge=merge)
    down = lf.delta_merge_part(*tensors64, part="down", modules=modules, shape=[10, 10], rank=10, merge=merge)
    g = generator_for(7, "m")
    want = 2.0 * sum(w * dare_sparsify(d, 0.5, g) for w, d in zip([1.0, 0.5], deltas))
    torch.testing.assert_close(up @ down, want, atol=1e-10, rtol=1e-10)


def test_adaptive_ranks():
    s = [4.0, 2.0, 1.0, 0.5]
    total = sum(v * v for v in s)
    assert [lf.energy_rank(total, s, e) for e in (0.5, 16 / total, 0.96, 1.0)] == [1, 1, 3, 4]
    assert lf.energy_rank(total + 10, s, 1.0) == 4  # capped: the rest lies past the values kept
    assert lf.energy_rank(0.0, [0.0], 0.9) == 0
    assert [lf.epsilon_rank(s, e) for e in (0, 0.5, 3.9, 5)] == [4, 3, 1, 0]


def test_transposed_and_whole_modules_bake():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, generator=g)
    a, b = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)  # lora_embedding_A [r, V], _B [D, r]
    saved = torch.randn(6, 4, generator=g)
    mods = [{"format": "lora", "tensors": {"lora_up": 0, "lora_down": 1}, "multiplier": 0.5, "rows": None,
             "scale": 3.0, "transpose": True}]
    torch.testing.assert_close(lf.bake(w, b, a, modules=mods), w + 0.5 * 3.0 * (b @ a).T)
    full = [{"format": "full", "tensors": {"full": 0}, "multiplier": 0.25, "rows": None}]
    torch.testing.assert_close(lf.bake(w, saved, modules=full), w + 0.25 * (saved - w))
