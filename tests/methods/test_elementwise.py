"""Methods marked elementwise must give the same bits on a tensor alone as on that tensor inside
a longer one, at any offset: the executor computes them in chunks and gathers small tensors
into one call (mergebuild/execute/batching.py). A rebuild batches different neighbours than a
cold build, so anything less would make a tensor's digest depend on the cache's history."""

from __future__ import annotations

import pytest
import torch

from mergebuild.methods.registry import all_methods

# valid parameters for every elementwise method: a new one fails here until it is listed
PARAMS = {
    "weighted_sum": {"alpha": 0.3},
    "add_difference": {"alpha": 0.7},
    "copy": {},
    "sum_twice": {"alpha": 0.3, "beta": 0.6},
    "triple_sum": {"alpha": 0.3, "beta": 0.2},
    "weighted_subtraction": {"alpha": 0.5, "beta": 0.4},
    "similarity_add_difference": {"alpha": 0.4, "beta": 0.7},
    "soup": {"weights": [1.0, 2.0, 0.5]},
    "fisher": {"weights": [1.0, 3.0], "eps": 1e-6},
    "ema": {"decay": 0.9},
    "tail_average": {"k": 2},
    "swap": {},
    "attention_swap": {},
    "bake_vae": {},
    "nearswap": {"t": 0.5},
}
LENGTHS = (1, 7, 16, 17, 33, 100, 1000)
OFFSETS = (0, 1, 3, 5, 8, 13, 31)

ELEMENTWISE = [m for m in all_methods() if m.elementwise]


def arity(method) -> int:
    if method.name == "fisher":
        return 4  # two models, then their two Fisher tensors
    return len(method.inputs) + (1 if method.variadic else 0)


def inputs(method, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g) for _ in range(arity(method))]
    if method.name == "fisher":
        xs[2:] = [x.abs() for x in xs[2:]]  # Fisher values are non-negative
    return xs


def test_the_common_methods_are_elementwise():
    names = {m.name for m in ELEMENTWISE}
    assert {"weighted_sum", "add_difference", "soup"} <= names
    assert "multiply_difference" not in names  # torch's vectorised pow rounds unlike its scalar tail
    assert "geometric_median" not in names  # whole-tensor distances


@pytest.mark.parametrize("method", ELEMENTWISE, ids=lambda m: m.name)
def test_same_bits_at_any_offset(method):
    params = {**method.defaults(), **PARAMS[method.name]}
    mismatches = []
    for n in LENGTHS:
        xs = inputs(method, n, seed=n)
        alone = method.fn(*xs, **params)
        for offset in OFFSETS:
            pads = inputs(method, offset + 11, seed=1000 + offset)
            longer = [torch.cat([p[:offset], x, p[offset:]]) for p, x in zip(pads, xs)]
            inside = method.fn(*longer, **params)[offset : offset + n]
            if not torch.equal(inside, alone):
                mismatches.append((n, offset))
    assert not mismatches, f"{method.name}: bits differ at (length, offset) {mismatches}"


@pytest.mark.parametrize("method", ELEMENTWISE, ids=lambda m: m.name)
def test_pure(method):
    """The executor passes its reused scratch and staging buffers straight in."""
    params = {**method.defaults(), **PARAMS[method.name]}
    xs = inputs(method, 50, seed=3)
    copies = [x.clone() for x in xs]
    method.fn(*xs, **params)
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))
