"""Methods that say they may run on the files' own float16 / bfloat16 (Method.stored_dtype,
execute/native.py) must give, on the halves, the bits they give on the same values in float32,
cast back: the float32 path is what every digest in a cache was made with. Held here over long
random inputs full of the values that tell roundings apart, for every parameter setting users
reach for; and the executor's probe must catch a method that says so wrongly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mergebuild.execute import native
from mergebuild.methods.registry import all_methods, get_method

DTYPES = (torch.float16, torch.bfloat16)
CODES = {torch.float16: "F16", torch.bfloat16: "BF16"}
ALPHAS = (0.0, 0.3, 0.5, 0.7, 1.0, -0.5, 1.5, 1 / 3)
# parameter settings of each method that says it can, and which it must refuse
SETTINGS = {
    "weighted_sum": ([{"alpha": a} for a in ALPHAS] + [{"alpha": a, "arithmetic": "a1111"} for a in ALPHAS], []),
    "add_difference": ([{"alpha": a, "arithmetic": "a1111"} for a in ALPHAS], [{"alpha": 0.7}]),
}
NATIVE = [m for m in all_methods() if m.stored_dtype is not None]
LENGTH = 64 * native.ALIGN  # aligned, as the executor's prefixes are


def _inputs(dtype, n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.max, -info.max,
                            info.tiny, info.tiny / 8, -info.tiny / 8, info.eps])
    xs = []
    for _ in range(n):
        x = torch.randn(LENGTH, generator=g) * 10.0 ** torch.randint(-6, 4, (LENGTH,), generator=g)
        where = torch.randint(LENGTH, (LENGTH // 16,), generator=g)
        x[where] = special[torch.randint(len(special), (LENGTH // 16,), generator=g)]
        xs.append(x.to(dtype))
    return xs


def _params(method, params: dict, dtype, n: int) -> dict:
    if method.input_dtypes is not None and method.input_dtypes(params):
        return {**params, "dtypes": [CODES[dtype]] * n}  # as the planner adds them
    return params


def test_every_method_that_says_it_can_is_listed():
    assert sorted(m.name for m in NATIVE) == sorted(SETTINGS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", NATIVE, ids=lambda m: m.name)
def test_the_halves_give_the_float32_paths_bits(method, dtype):
    allowed, refused = SETTINGS[method.name]
    n = len(method.inputs)
    for seed, setting in enumerate(allowed):
        assert method.stored_dtype(setting), setting
        params = _params(method, setting, dtype, n)
        xs = _inputs(dtype, n, seed)
        halves = method.fn(*xs, **params)
        wide = method.fn(*(x.float() for x in xs), **params).to(dtype)
        assert halves.dtype == dtype
        assert torch.equal(halves.view(torch.int16), wide.view(torch.int16)), (setting, dtype)
        assert native.same_bits(method, params, dtype, n)
    for setting in refused:
        assert not method.stored_dtype(setting), setting


def test_the_probe_catches_a_method_that_rounds_twice():
    """add_difference's exact arithmetic rounds B - C to float16 before adding: it must not be
    let through, even by a method that wrongly says it can."""
    liar = dataclasses.replace(get_method("add_difference"), name="liar", stored_dtype=lambda params: True)
    assert not native.same_bits(liar, {"alpha": 0.7}, torch.float16, 3)
    xs = [torch.zeros(LENGTH, dtype=torch.float16) for _ in range(3)]
    out = torch.empty(LENGTH, dtype=torch.float16)
    assert not native.eligible(liar, {"alpha": 0.7}, xs, out, torch.float32)


def test_only_when_every_input_is_the_outputs_half_and_one_thread_computes():
    method = get_method("weighted_sum")
    half = [torch.zeros(8, dtype=torch.float16)] * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert native.eligible(method, {"alpha": 0.3}, half, torch.empty(8, dtype=torch.float16), torch.float32)
        mixed = [half[0], torch.zeros(8, dtype=torch.bfloat16)]
        assert not native.eligible(method, {"alpha": 0.3}, mixed, torch.empty(8, dtype=torch.float16), torch.float32)
        assert not native.eligible(method, {"alpha": 0.3}, half, torch.empty(8, dtype=torch.float32), torch.float32)
        assert not native.eligible(method, {"alpha": 0.3}, half, torch.empty(8, dtype=torch.float16), torch.float64)
        assert not native.eligible(get_method("copy"), {}, half[:1], torch.empty(8, dtype=torch.float16), torch.float32)
        torch.set_num_threads(2)
        assert not native.eligible(method, {"alpha": 0.3}, half, torch.empty(8, dtype=torch.float16), torch.float32)
    finally:
        torch.set_num_threads(threads)


def test_a_prefix_is_a_multiple_of_the_alignment():
    assert native.aligned_end(0, 5000) == 4096
    assert native.aligned_end(1 << 20, (1 << 20) + 1023) == 1 << 20
    assert native.aligned_end(7, 7 + 3 * native.ALIGN) == 7 + 3 * native.ALIGN


def test_the_finite_check_on_the_halves_is_not_fooled_by_a_float16_sum_past_65504():
    method = get_method("weighted_sum")
    a = torch.full((LENGTH,), 1000.0, dtype=torch.float16)
    b, out = a.clone(), torch.empty(LENGTH, dtype=torch.float16)
    assert native.compute(method.fn, {"alpha": 0.3}, [a, b], out) == pytest.approx(1000.0 * LENGTH)
    assert torch.equal(out, a)
    for bad in (float("inf"), -float("inf"), float("nan")):
        b[LENGTH // 3] = bad
        total = native.compute(method.fn, {"alpha": 0.3}, [a, b], out)
        assert total != total or abs(total) == float("inf")
