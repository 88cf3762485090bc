"""The integer masks of TIES' trim and sign election (methods/selection.py kept_bits,
methods/task_vectors.py _combine) select exactly what the boolean rules select, bit for bit:
heavy ties, the tie index inside, before and after a chunk, signed zeros, NaN, every sign mode."""

from __future__ import annotations

import pytest
import torch

from mergebuild.methods.selection import kept, kept_bits, select
from mergebuild.methods.task_vectors import _combine

INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def _magnitudes(dtype, n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(dtype)
    x[::3] = x[7]  # many equal magnitudes: the threshold's ties
    x[::11] = 0.0
    x[::13] = -0.0
    return x.abs()


@pytest.mark.parametrize("dtype", list(INTS))
@pytest.mark.parametrize("k", [1, 700, 1700, 2500, 4999])
def test_kept_bits_is_kept_as_integers(dtype, k):
    mag = _magnitudes(dtype)
    n, step = mag.numel(), 512
    threshold = select(lambda i, j: mag[i:j], n, k, step)
    total = 0
    for start in range(0, n, step):
        chunk = mag[start : start + step]
        expected = kept(threshold, chunk, start)
        got = kept_bits(threshold, chunk, start)
        assert got.dtype == INTS[dtype]
        assert torch.equal(got, expected.to(got.dtype).neg()), (start, threshold)
        total += int(expected.sum())
    assert total == k


def _old_combine(weighted, w, ws, base, sign, normalize, lam, mergekit):
    """_combine as it was, with boolean masks and torch.where: the reference."""
    if sign == "mass":
        votes = weighted.sum(dim=0)
    else:
        votes = torch.sign(weighted).sum(dim=0)
    elected = torch.sign(votes) if sign == "count" else torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = (torch.sign(weighted) == elected) & (elected != 0)
    weights = w.expand_as(weighted)
    divisor = torch.where(agree, weights, torch.zeros_like(weights)).sum(dim=0)
    divisor = divisor + (divisor == 0).to(divisor.dtype)
    mixed = (weighted * agree).sum(dim=0) if mergekit else torch.where(agree, weighted, torch.zeros_like(weighted)).sum(dim=0)
    if normalize:
        mixed = mixed / divisor
    return mixed * lam + base


@pytest.mark.parametrize("sign", ["mass", "count", "count_mergekit"])
@pytest.mark.parametrize("mergekit", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_combine_keeps_the_boolean_rules_bits(sign, mergekit, dtype):
    g = torch.Generator().manual_seed(3)
    weighted = torch.randn(3, 4096, generator=g).to(dtype)
    weighted[:, ::5] = 0.0
    weighted[1, ::7] = -0.0
    weighted[0, ::9] = -weighted[1, ::9]  # votes that cancel
    weighted[2, ::17] = float("nan")
    base = torch.randn(4096, generator=g).to(dtype)
    base[::19] = -0.0
    w = torch.tensor([1.0, 0.5, 2.0], dtype=dtype).reshape(-1, 1)
    for normalize in (False, True):
        expected = _old_combine(weighted.clone(), w, [1.0, 0.5, 2.0], base, sign, normalize, 0.7, mergekit)
        got = _combine(weighted.clone(), w, [1.0, 0.5, 2.0], base, sign, normalize, 0.7, mergekit)
        ints = INTS[dtype]
        assert torch.equal(got.view(ints), expected.view(ints)), (sign, mergekit, normalize)
