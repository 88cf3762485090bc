"""passthrough's pure parts: what `slices` may be as written, and the output's config.json (layer
count and per-layer lists in the slices' order, Gemma's attention pattern made explicit)."""

from __future__ import annotations

import pytest
import torch

from mergebuild.layouts.blocks import architectures
from mergebuild.methods.passthrough import Slice, check_slices, output_config, passthrough
from mergebuild.methods.registry import get_method
from mergebuild.testing.llms import family_config


@pytest.mark.parametrize("value,where,words", [
    ("a", "", "expected a list of slices"),
    ([3], "[0]", "expected a slice"),
    ([{"input": "a", "layers": [0, 2]}], "[0].layers", "did you mean 'layer_range'"),
    ([{"input": "a", "layer_range": [0, 2], "parameters": {}}], "[0].parameters", "per-slice parameters"),
    ([{"input": "", "layer_range": [0, 2]}], "[0].input", "expected the name"),
    ([{"input": "a"}], "[0].layer_range", "missing"),
    ([{"layer_range": [0, 2]}, {"layer_range": [0, 2.5]}], "[1].layer_range", "two whole numbers"),
    ([{"layer_range": [True, 2]}], "[0].layer_range", "two whole numbers"),
    ([{"layer_range": [3, 3]}], "[0].layer_range", "0 <= start < end"),
    ([{"layer_range": [-1, 3]}], "[0].layer_range", "0 <= start < end"),
])
def test_malformed_slices_say_where(value, where, words):
    found = check_slices(value)
    assert found is not None and found[0] == where and words in found[1], found


def test_wellformed_slices_pass_and_the_param_accepts_them():
    value = [{"input": "a", "layer_range": [0, 16]}, {"layer_range": [8, 24]}]
    assert check_slices(value) is None and check_slices([]) is None
    param = get_method("passthrough").param("slices")
    assert param.accepts(value) and not param.accepts([{"layer_range": [2, 1]}])
    assert get_method("passthrough").param("slices").as_dict()["type"] == "list"


def test_the_function_is_the_tensor_scaled():
    x = torch.randn(5)
    assert torch.equal(passthrough(x), x) and torch.equal(passthrough(x, scale=0.5), x * 0.5)


def llm_config(family: str):
    return architectures()[family].llm["config"]


def test_layer_count_and_lists_follow_the_slices():
    a = family_config("qwen3", layers=4, layer_types=[f"a{i}" for i in range(4)])
    b = family_config("qwen3", layers=6, layer_types=[f"b{i}" for i in range(6)])
    slices = [Slice(0, 0, 3), Slice(1, 2, 6), Slice(0, 3, 4)]
    out, warnings = output_config(a, llm_config("qwen3"), slices, {0: a, 1: b}, {0: 4, 1: 6})
    assert out["num_hidden_layers"] == 8 and warnings == []
    assert out["layer_types"] == ["a0", "a1", "a2", "b2", "b3", "b4", "b5", "a3"]
    assert a["num_hidden_layers"] == 4 and len(a["layer_types"]) == 4  # the input's own is left alone
    assert {k: v for k, v in out.items() if k not in ("num_hidden_layers", "layer_types")} == \
           {k: v for k, v in a.items() if k not in ("num_hidden_layers", "layer_types")}


def test_gemma_writes_each_layers_attention_type():
    # Gemma 2 alternates sliding and full attention by index: moved layers keep theirs
    cfg = family_config("gemma2", layers=4)
    out, _ = output_config(cfg, llm_config("gemma2"), [Slice(0, 0, 3), Slice(0, 1, 4)], {0: cfg}, {0: 4})
    s, f = "sliding_attention", "full_attention"
    assert out["layer_types"] == [s, f, s, f, s, f] and out["num_hidden_layers"] == 6
    # Gemma 3: every sliding_window_pattern-th layer is full (the config's value, else 6)
    cfg = family_config("gemma3", layers=8, sliding_window_pattern=3)
    out, _ = output_config(cfg, llm_config("gemma3"), [Slice(0, 4, 8), Slice(0, 0, 3)], {0: cfg}, {0: 8})
    assert out["layer_types"] == [s, f, s, s, s, s, f]


def test_a_vlm_changes_its_text_config_only():
    cfg = family_config("gemma3-vl", layers=4, vision_layers=3)
    out, warnings = output_config(cfg, llm_config("gemma3-vl"), [Slice(0, 0, 4), Slice(0, 2, 4)], {0: cfg}, {0: 4})
    assert out["text_config"]["num_hidden_layers"] == 6 and len(out["text_config"]["layer_types"]) == 6
    assert out["vision_config"] == cfg["vision_config"] and "num_hidden_layers" not in out and warnings == []
    # Qwen2-VL keeps the count at the top (before transformers 4.52) and in text_config (after)
    cfg = {**family_config("qwen2-vl", layers=4), "text_config": {"num_hidden_layers": 4}}
    out, _ = output_config(cfg, llm_config("qwen2-vl"), [Slice(0, 0, 2)], {0: cfg}, {0: 4})
    assert out["num_hidden_layers"] == 2 and out["text_config"]["num_hidden_layers"] == 2
    assert out["vision_config"] == {"depth": 3}


def test_a_list_some_input_lacks_is_left_out_with_a_warning():
    a = family_config("qwen3", layers=4, layer_types=["full_attention"] * 4)
    b = family_config("qwen3", layers=4)
    out, warnings = output_config(a, llm_config("qwen3"), [Slice(0, 0, 2), Slice(1, 2, 4)], {0: a, 1: b},
                                  {0: 4, 1: 4})
    assert "layer_types" not in out and out["num_hidden_layers"] == 4
    assert len(warnings) == 1 and "layer_types" in warnings[0]
    out, warnings = output_config({"model_type": "x"}, llm_config("qwen3"), [Slice(0, 0, 2)], {0: {}}, {0: 4})
    assert out == {"model_type": "x"} and "no num_hidden_layers" in warnings[0]
