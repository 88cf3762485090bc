"""Weight matching's mechanics against brute force: each step's assignment (free, and keeping
blocks whole) is the best of all permutations on tiny layers; a one-group matching finds the
global optimum; a permuted copy is found exactly; a fixed seed gives the same permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mergebuild.layouts.blocks import architectures
from mergebuild.layouts.permutations import permutation_groups
from mergebuild.methods.rebasin import apply_permutations, permute, rebasin
from mergebuild.methods.weight_matching import WeightMatching, assign, weight_matching

from test_permutation_specs import permuted, sequential_mlp


class DictReader:
    """What compute() reads with (execute/statistics.StatisticReader), over two dicts."""

    def __init__(self, a: dict, b: dict):
        self.models = (a, b)
        self.loads = 0

    def load(self, i: int, key: str):
        self.loads += 1
        return self.models[i][key]


def value(cost: np.ndarray, perm) -> float:
    return float(cost[np.arange(len(perm)), np.asarray(perm)].sum())


def keeps_blocks(perm, blocks: int, move: bool) -> bool:
    s = len(perm) // blocks
    for g in range(blocks):
        targets = {p // s for p in perm[g * s:(g + 1) * s]}
        if len(targets) != 1 or (not move and targets != {g}):
            return False
    return True


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("blocks, move", [(1, False), (2, False), (2, True), (3, True)])
def test_the_assignment_is_the_best_permutation_of_all(seed, blocks, move):
    n = 6
    cost = np.random.default_rng(seed).normal(size=(n, n))
    allowed = [p for p in itertools.permutations(range(n)) if blocks == 1 or keeps_blocks(p, blocks, move)]
    best = max(value(cost, p) for p in allowed)
    perm = assign(cost, blocks, move)
    assert sorted(perm) == list(range(n))
    assert blocks == 1 or keeps_blocks(list(perm), blocks, move)
    assert value(cost, perm) == pytest.approx(best, abs=1e-12)


def objective(a: dict, b: dict, groups, perms) -> float:
    aligned = permuted(b, groups, perms)
    return sum(float((a[k].double() * aligned[k].double()).sum()) for k in a)


def test_matching_one_hidden_layer_finds_the_global_optimum():
    gen = torch.Generator().manual_seed(0)
    mlp = lambda: {"layers.0.weight": torch.randn(5, 3, generator=gen), "layers.0.bias": torch.randn(5, generator=gen),  # noqa: E731
                   "layers.2.weight": torch.randn(2, 5, generator=gen)}
    a, b = mlp(), mlp()
    groups = permutation_groups(architectures()["generic"], {k: tuple(v.shape) for k, v in a.items()})
    found = WeightMatching(DictReader(a, b), groups).run(10, 0)
    best = max(objective(a, b, groups, {"layers.0": torch.tensor(p)}) for p in itertools.permutations(range(5)))
    assert objective(a, b, groups, found) == pytest.approx(best, rel=1e-9)


def test_a_permuted_copy_is_aligned_exactly():
    a = {k: v.float() for k, v in sequential_mlp(sizes=(6, 20, 14, 9, 3)).items()}
    groups = permutation_groups(architectures()["generic"], {k: tuple(v.shape) for k, v in a.items()})
    gen = torch.Generator().manual_seed(1)
    secret = {name: torch.randperm(g.size, generator=gen) for name, g in groups.items()}
    b = permuted(a, groups, secret)
    perms = weight_matching(DictReader(a, b), groups=[g.as_doc() for g in groups.values()], iterations=100, seed=0)
    aligned = permuted(b, groups, perms)
    for key in a:
        assert torch.equal(aligned[key], a[key]), key


def test_a_fixed_seed_gives_the_same_permutations_and_sweeps_are_capped():
    gen = torch.Generator().manual_seed(2)
    a = {k: v.float() for k, v in sequential_mlp(sizes=(6, 24, 24, 24, 3), seed=3).items()}
    b = {k: v + torch.randn(v.shape, generator=gen) for k, v in a.items()}
    groups = permutation_groups(architectures()["generic"], {k: tuple(v.shape) for k, v in a.items()})
    doc = [g.as_doc() for g in groups.values()]
    first = weight_matching(DictReader(a, b), groups=doc, iterations=100, seed=7)
    again = weight_matching(DictReader(a, b), groups=doc, iterations=100, seed=7)
    assert all(torch.equal(first[n], again[n]) for n in first)
    capped = WeightMatching(DictReader(a, b), groups)
    capped.run(1, 7)
    assert capped.sweeps == 1
    assert objective(a, b, groups, first) >= objective(a, b, groups, capped.perms) - 1e-6


def test_rebasin_is_the_weighted_sum_with_the_aligned_b():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 4, 3, generator=gen), torch.randn(6, 4, 3, generator=gen)
    rows, cols = torch.randperm(3, generator=gen), torch.randperm(4, generator=gen)
    axes = [[0, 2], [1, 1]]  # rows in two equal chunks (GEGLU halves), each permuted alike
    aligned = b.double()[torch.cat([rows, rows + 3])][:, cols]
    expected = 0.7 * a.double() + 0.3 * aligned
    assert torch.equal(permute(b, rows.float(), cols.float(), axes=axes), aligned.float())
    torch.testing.assert_close(rebasin(a, b, rows.float(), cols.float(), alpha=0.3, axes=axes).double(),
                               expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(apply_permutations(b, [], []), b)
