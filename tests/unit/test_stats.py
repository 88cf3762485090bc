"""The statistics a build records per tensor (for the report) against float64 computed here."""

from __future__ import annotations

import math

import torch

from mergebuild.execute.stats import SAMPLE, add, metrics, sample_stats


def test_sums_match_float64_on_a_small_tensor():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, generator=g), torch.randn(300, generator=g)
    r = 0.7 * x + 0.3 * y
    s = sample_stats(r, [x, y], ["a", "b"])
    assert s["n"] == 300
    m = metrics(s)
    cos = float(torch.nn.functional.cosine_similarity(r.double(), x.double(), dim=0))
    assert math.isclose(m["a"]["cosine"], cos, rel_tol=1e-12)
    assert math.isclose(m["b"]["rel_l2"], float((r.double() - y.double()).norm() / y.double().norm()), rel_tol=1e-12)


def test_a_large_tensor_is_subsampled_and_blocks_add_up():
    x = torch.randn(1000, 1000)
    s = sample_stats(x * 2, [x], ["a"])
    assert SAMPLE // 2 <= s["n"] <= 2 * SAMPLE  # a strided sample, not every element
    total = {}
    add(total, s)
    add(total, sample_stats(x[:10] * 2, [x[:10]], ["a"]))
    m = metrics(total)["a"]
    assert math.isclose(m["cosine"], 1.0, rel_tol=1e-9) and math.isclose(m["rel_l2"], 1.0, rel_tol=1e-9)


def test_inputs_of_another_shape_do_not_count():
    r = torch.ones(4, 3)
    s = sample_stats(r, [torch.ones(4, 3), torch.ones(2, 3)], ["model", "lora_down"])
    assert set(s["by"]) == {"model"}
    assert sample_stats(r, [torch.ones(2, 3)], ["x"]) is None
