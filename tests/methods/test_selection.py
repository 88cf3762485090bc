"""Exact top-k selection (mergebuild/methods/selection.py) and the chunked task-vector merges
(task_vectors.generalized_task_arithmetic) against straightforward references: a stable
descending argsort for the selection, and the whole-tensor merge as it was written before
selection.py (kept below) for the merges, compared bit for bit.

Chunks, the candidate limit and DARE's draw size are shrunk so that tiny tensors cross chunk
boundaries and take every path (candidates, tie scan, whole-tensor fallback)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergebuild.methods import draws, selection, task_vectors
from mergebuild.methods.common import bernoulli_mask, generator_for, model_weights
from mergebuild.methods.selection import top_k_mask
from mergebuild.methods.task_vectors import (della_sparsify, generalized_task_arithmetic, magnitude_sparsify_mergekit,
                                             rescale_rule)

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def bits(t):
    """A tensor's bytes as integers: equal bits, not merely equal values (-0.0 differs from 0.0)."""
    t = t.contiguous().reshape(-1)
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@contextlib.contextmanager
def small_chunks(chunk: int, candidates: int):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "CHUNK", chunk)
        mp.setattr(selection, "CANDIDATES", candidates)
        mp.setattr(draws, "DRAW", max(1, chunk // 2))
        yield


def ref_top_k(magnitude, k: int):
    """The k largest, equal ones by lower flat index: the first k of a stable descending sort."""
    flat = magnitude.reshape(-1).double().numpy()
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[: max(k, 0)]] = True
    return torch.from_numpy(mask).reshape(magnitude.shape)


# magnitudes: fp16 values (what checkpoints hold), often tied, often zero
VALUES = st.one_of(
    st.floats(0, 65504, width=16),
    st.sampled_from([0.0, 0.0, 1.0, 2.0, 0.5, 6e-8, 1e-4]),
)


@st.composite
def magnitudes(draw):
    n = draw(st.integers(0, 80))
    kind = draw(st.sampled_from(["mixed", "all equal", "two values", "zeros"]))
    if kind == "mixed":
        values = draw(st.lists(VALUES, min_size=n, max_size=n))
    elif kind == "all equal":
        values = [draw(VALUES)] * n
    elif kind == "two values":
        pair = draw(st.lists(VALUES, min_size=2, max_size=2))
        values = [pair[i] for i in draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))]
    else:
        values = [0.0] * n
    dtype = draw(st.sampled_from(FLOATS))
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    if draw(st.booleans()) and n % 4 == 0 and n:
        t = t.reshape(4, -1)
    return t


@HYPOTHESIS
@given(magnitudes(), st.data(), st.integers(1, 9), st.integers(0, 6))
def test_top_k_mask_is_the_stable_sorts_first_k(magnitude, data, chunk, candidates):
    k = data.draw(st.integers(-1, magnitude.numel() + 1))
    with small_chunks(chunk, candidates):
        mask = top_k_mask(magnitude, k)
    assert mask.dtype == torch.bool and mask.shape == magnitude.shape
    assert torch.equal(mask, ref_top_k(magnitude, k))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("candidates", [0, 1 << 21])
def test_top_k_mask_on_a_large_gaussian(dtype, candidates):
    """Many chunks, both ways of finding the ties."""
    g = torch.Generator().manual_seed(3)
    magnitude = torch.randn(12 * 4096 + 17, generator=g).to(dtype).abs()
    with small_chunks(4096, candidates):
        for density in (0.2, 0.5, 0.999):
            k = int(density * magnitude.numel())
            assert torch.equal(top_k_mask(magnitude, k), ref_top_k(magnitude, k))


def test_inf_and_nan_take_the_whole_tensor_rule():
    magnitude = torch.tensor([1.0, float("inf"), 2.0, 2.0, 0.0, float("inf")])
    for k in range(7):
        assert torch.equal(top_k_mask(magnitude, k), ref_top_k(magnitude, k))


# --- the merges, against the whole-tensor implementation they replaced ------------------------


def ref_magnitude(delta, density):
    if density >= 1:
        return delta
    return torch.where(ref_top_k(delta.abs(), max(int(density * delta.numel()), 0)), delta, 0.0)


def ref_breadcrumbs(delta, density, gamma):
    if density >= 1:
        return delta
    n = delta.numel()
    keep = max(int(density * n), 0)
    top = min(max(int(gamma * n), 0), n - keep)
    magnitude = delta.abs()
    mask = ref_top_k(magnitude, top + keep) & ~ref_top_k(magnitude, top)
    return torch.where(mask, delta, torch.zeros_like(delta))


def ref_dare(delta, density, generator, rescale):
    rule = rescale_rule(rescale)
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = bernoulli_mask(delta.shape, density, generator, delta.device)
    if rule == "l1":
        return task_vectors.l1_rescaled(delta, mask)
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    return kept / density if rule == "density" else kept


def ref_elect_sign(weighted, sign):
    if sign == "mass":
        votes = weighted.sum(dim=0)
    else:
        votes = torch.sign(weighted).sum(dim=0)
        if sign == "count":
            return torch.sign(votes).to(weighted.dtype)
    return torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)


def ref_merge(base, *models, sparsify="none", sign="none", normalize=False, rescale="density", weights=(),
              lam=1.0, density=1.0, gamma=0.01, epsilon=0.15, seed=0, key=None, ties_rules="mergebuild"):
    """generalized_task_arithmetic as it was before the chunks: whole tensors throughout."""
    mergekit = ties_rules == "mergekit"
    ws = model_weights(weights, len(models), "fine-tune")
    generator = generator_for(seed, key) if sparsify in ("random", "della") else None
    deltas = []
    for model in models:
        delta = model - base
        if sparsify == "magnitude":
            delta = magnitude_sparsify_mergekit(delta, density) if mergekit else ref_magnitude(delta, density)
        elif sparsify == "random":
            delta = ref_dare(delta, density, generator, rescale)
        elif sparsify == "breadcrumbs":
            delta = ref_breadcrumbs(delta, density, gamma)
        elif sparsify == "della":
            delta = della_sparsify(delta, density, epsilon, generator, rescale)
        deltas.append(delta)
    w = torch.tensor(ws, dtype=base.dtype).reshape((-1,) + (1,) * base.dim())
    weighted = torch.stack(deltas) * w
    if sign == "none":
        mixed = weighted.sum(dim=0)
        total = sum(ws)
        divisor = total if abs(total) >= 1e-8 else 1.0
    else:
        elected = ref_elect_sign(weighted, sign)
        agree = (torch.sign(weighted) == elected) & (elected != 0)
        divisor = torch.where(agree, w, 0.0).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
        mixed = (weighted * agree).sum(dim=0) if mergekit else torch.where(agree, weighted, 0.0).sum(dim=0)
    if normalize:
        mixed = mixed / divisor
    return mixed * lam + base


@st.composite
def families(draw):
    """A base and 1-4 fine-tunes of fp16 values; the deltas often tie, or are zero."""
    shape = draw(st.sampled_from([(), (1,), (5,), (3, 4), (2, 3, 4), (37,)]))
    n = int(np.prod(shape))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn(shape, generator=g).half().to(dtype)
    models = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["noise", "steps", "same"]))
        if kind == "noise":
            step = torch.randn(shape, generator=g) * 0.1
        elif kind == "steps":
            step = torch.randint(-2, 3, shape, generator=g) * 0.25
        else:
            step = torch.zeros(shape)
        models.append((base.double() + step.reshape(shape) if n else base.double()).half().to(dtype))
    if n and draw(st.booleans()):  # signed zeros: base +0.0 where a fine-tune holds -0.0 (delta -0.0)
        zero = torch.rand(shape, generator=g) < 0.4
        base = base.masked_fill(zero, 0.0)
        models = [m.masked_fill(zero, -0.0 if draw(st.booleans()) else 0.0) for m in models]
    return base, models


@HYPOTHESIS
@given(families(), st.sampled_from(["none", "magnitude", "random", "breadcrumbs", "della"]),
       st.sampled_from(["none", "mass", "count", "count_mergekit"]),
       st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9, 1.0]), st.booleans(), st.integers(1, 7), st.data())
def test_chunked_merge_has_the_same_bits(family, sparsify, sign, density, normalize, chunk, data):
    base, models = family
    params = dict(sparsify=sparsify, sign=sign, normalize=normalize, density=density, key="k.weight",
                  seed=data.draw(st.integers(0, 3)), lam=data.draw(st.sampled_from([1.0, 0.7])),
                  weights=data.draw(st.sampled_from([(), tuple(1.0 + 0.5 * i for i in range(len(models)))])))
    if sparsify == "random":
        params["rescale"] = data.draw(st.sampled_from(["density", "none", "l1"]))
    if sparsify == "breadcrumbs":
        params["gamma"] = data.draw(st.sampled_from([0.0, 0.05, 0.3]))
    if sparsify == "magnitude":
        params["ties_rules"] = data.draw(st.sampled_from(["mergebuild", "mergekit"]))
    if sparsify == "della":
        params["density"], params["epsilon"] = 0.5, 0.2
    with small_chunks(chunk, data.draw(st.integers(0, 5))):
        out = generalized_task_arithmetic(base, *models, **params)
    assert same_bits(out, ref_merge(base, *models, **params))


@pytest.mark.parametrize("sparsify", ["magnitude", "random", "breadcrumbs"])
def test_chunked_merge_of_a_large_tensor_has_the_same_bits(sparsify):
    """A tensor of many chunks, 3 fine-tunes."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 170, generator=g).half().float()
    models = [(base + torch.randn(base.shape, generator=g) * 0.01).half().float() for _ in range(3)]
    params = dict(sparsify=sparsify, sign="mass", normalize=True, density=0.2, key="k")
    with small_chunks(4096, 1 << 21):
        out = generalized_task_arithmetic(base, *models, **params)
    assert same_bits(out, ref_merge(base, *models, **params))
